"""A model folder of a real shape with random weights, for timings (`--load-format dummy`).

    python scripts/dummy_model.py 7b|34b DIR [--tokenizer SRC]

Writes a config of Mistral-7B-Instruct-v0.2's shape or a Yi-34B-like Llama with 60 layers, with
SmolLM2's tokenizer: TTFT is realistic for the shape, the text garbage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # mistralai/Mistral-7B-Instruct-v0.2's config.json, with SmolLM2's vocabulary
    "7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 32768, "rope_theta": 1e6,
           "sliding_window": None},
    # Yi-34B-like: a Llama with 60 layers, GQA with 8 KV heads
    "34b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 7168,
            "intermediate_size": 20480, "num_hidden_layers": 60, "num_attention_heads": 56,
            "num_key_value_heads": 8, "max_position_embeddings": 32768, "rope_theta": 5e6},
}
LABELS = {"7b": "7B (Mistral-7B shape)", "34b": "34B (Yi-34B-like, 60 layers)"}


def make_model(shape: str, out: Path, tokenizer: Path) -> Path:
    config = {**SHAPES[shape], "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2,
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "attention_dropout": 0.0, "initializer_range": 0.02}
    config["rope_parameters"] = {"rope_theta": config["rope_theta"], "rope_type": "default"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    return out




def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".cache" / "smollm2-f32")
    a = ap.parse_args(argv)
    print(make_model(a.shape, a.dir, a.tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
