"""Tiny, deterministic Hugging Face checkpoints of the architectures and RoPE variants the GPU path
accepts (and of those it refuses), built from real configs through transformers' own classes.

Each has the real attention shape of its family (head_dim 128, grouped KV heads, its rope_theta and
RoPE scaling, Qwen2's qkv bias, Qwen3's q/k norms) at a small width and 4 layers, SmolLM2's
tokenizer (vocabulary 49152, copied from the converted model), and weights in bfloat16 so vLLM and
the float32 CPU reference read the same numbers. Weights are random with a scale chosen so that
attention is sharp enough for a RoPE error to show (`tests/test_conformance.py` measures it).

    python scripts/tiny_checkpoints.py OUT_DIR            # every checkpoint, OUT_DIR/<arch>/
    python scripts/tiny_checkpoints.py OUT_DIR llama31    # one
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The weights' scale makes the conformance test sensitive. Measured on the Llama-3.1 checkpoint,
# chunks re-rotated with unscaled frequencies (what LMCache does) against the right ones, top-20 KL
# of the next token at ratio 0 on two QA prompts, and the bf16 floor (bf16 vs float32 full prefill):
#   std 0.02 (transformers' default), embedding 0.02: 0.0001-0.0003, floor 0.00001: RoPE hardly shows
#   std 0.06, embedding 0.06: 0.01-0.06, floor 0.0005 (next-token entropy 9.9 nats: nearly uniform)
#   std 0.06, embedding 0.2:  0.14-0.68, floor 0.002 (entropy 2.9 nats): chosen, 70x the floor or more
#   std 0.08, embedding 0.5:  up to 6, but a floor of 0.01 and a near one-hot answer (0.15 nats)
INIT_STD = 0.06
EMBED_STD = 0.2  # the tied embedding (and so the output head)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
# SmolLM2's tokenizer_config.json, for a folder that carries only tokenizer.json
TOKENIZER_CONFIG = {"backend": "tokenizers", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                    "pad_token": "<|im_end|>", "tokenizer_class": "TokenizersBackend",
                    "unk_token": "<|endoftext|>", "model_max_length": 1 << 20}
COMMON = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=128, vocab_size=49152, bos_token_id=1, eos_token_id=2,
              pad_token_id=2, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=INIT_STD)
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# name: (config class's model_type, architecture, extra config, what it stands for)
ARCHS: dict[str, tuple[str, str, dict, str]] = {
    "llama2": ("llama", "LlamaForCausalLM",
               dict(max_position_embeddings=32768,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
               "Llama-2 style: no scaling (context widened to move chunks far)"),
    "llama31": ("llama", "LlamaForCausalLM",
                dict(max_position_embeddings=131072, rope_parameters=LLAMA31_ROPE),
                "Llama-3.1/3.2/3.3: llama3 scaling"),
    "llama_linear": ("llama", "LlamaForCausalLM",
                     dict(max_position_embeddings=32768,
                          rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
                     "Llama-2 with linear scaling (position interpolation, factor 4)"),
    "mistral": ("mistral", "MistralForCausalLM",
                dict(max_position_embeddings=32768, sliding_window=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
                "Mistral-7B-v0.2 style: theta 1e6, no sliding window (served as LlamaForCausalLM)"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM",
              dict(max_position_embeddings=32768, use_sliding_window=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
              "Qwen2/2.5: qkv bias"),
    "qwen2_yarn": ("qwen2", "Qwen2ForCausalLM",
                   dict(max_position_embeddings=32768, use_sliding_window=False,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 8192}),
                   "Qwen2.5 with YaRN (factor 4): cos/sin carry an attention factor"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM",
              dict(max_position_embeddings=32768,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
              "Qwen3: q/k norm"),
}
# refused at load (helpers/gpu/rope.py: check_rope); written only on request, to test the refusal
REFUSED: dict[str, tuple[str, str, dict, str]] = {
    "llama_dynamic": ("llama", "LlamaForCausalLM",
                      dict(max_position_embeddings=32768,
                           rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
                      "dynamic NTK scaling: frequencies change with the length"),
}


def rope_of(arch: str) -> dict:
    return (ARCHS.get(arch) or REFUSED[arch])[2]["rope_parameters"]


def smollm2_dir() -> Path:
    """Where SmolLM2's tokenizer files are: the converted model, or on a GPU machine the tokenizer
    alone (scripts/device_env.sh links either there)."""
    from helpers.embedded.model import resolve_model_dir
    from helpers.runtime import cache_dir

    here = cache_dir() / "smollm2-f32"
    return here if (here / "tokenizer.json").exists() else resolve_model_dir(None)


def build(arch: str, seed: int = 0):
    """The model (float32, eval) of `arch`, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_of(arch), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.copy_(EMBED_STD * torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.weight"):  # RMSNorm weights 1 +- 0.1 (q/k norms included)
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):  # Qwen2's qkv bias: not zero, so it matters
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


def config_of(arch: str):
    """The transformers config of `arch` (no weights)."""
    from transformers import AutoConfig

    model_type, architecture, extra, _ = ARCHS.get(arch) or REFUSED[arch]
    config = AutoConfig.for_model(model_type, **COMMON, **extra)
    config.architectures = [architecture]
    return config


def rotary_of(arch: str):
    """(config, transformers' rotary embedding of `arch`): the RoPE the CPU reference rotates with."""
    import importlib

    config = config_of(arch)
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    return config, cls(config)


def write_config(config, out: Path) -> None:
    """out/config.json of a checkpoint, as the checkpoints of its family spell it."""
    config.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    rope = dict(data["rope_parameters"])
    # older readers (vLLM's own config parsing, transformers 4) look for these at the top level
    data.update(torch_dtype="bfloat16", dtype="bfloat16", rope_theta=rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        data["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True))


def write(arch: str, out_dir: Path | str, seed: int = 0) -> Path:
    """Write checkpoint `arch` into out_dir/arch (config.json, model.safetensors in bf16, SmolLM2's
    tokenizer) and return that folder. The same seed writes the same bytes."""
    from helpers.embedded.model import save_checkpoint

    out = Path(out_dir) / arch
    out.mkdir(parents=True, exist_ok=True)
    model = build(arch, seed)
    write_config(model.config, out)
    save_checkpoint(model, out / "model.safetensors", torch.bfloat16)
    src = smollm2_dir()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    if not (out / "tokenizer_config.json").exists():  # a bare tokenizer.json (scripts/pack_for_device.sh)
        (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    return out


def write_all(out_dir: Path | str, names=None, seed: int = 0) -> list[Path]:
    return [write(a, out_dir, seed) for a in (names or ARCHS)]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in write_all(sys.argv[1], sys.argv[2:] or None):
        print(path)
