"""What vLLM builds, exported on the CPU for tests/test_against_vllm.py, which checks our GPU code
against it: vLLM's own Python code (scripts/vllm_python.py installs it; no kernel runs).

Rotary embeddings. Each tiny checkpoint's config.json (scripts/tiny_checkpoints.py) is read by vLLM's
own config reader; `get_rope` is called as vLLM's Llama, Mistral, Qwen2 and Qwen3 attention layers
call it (head_dim, max_position_embeddings, the config's rope_parameters). Per checkpoint:
  cls         vLLM's rotary class
  check_rope  helpers/gpu/rope.check_rope on vLLM's config (the rope type, or the refusal's message)
  served      the cos|sin cache the model rotates Q and K with, float32
  rotation    helpers/gpu/rope.rotation_cache of that layer: what the GPU path re-rotates with
  bf16_gap    the largest difference of that to rotation_cache of the layer built in bfloat16, as
              vLLM serves a bf16 model (0: the cache is recomputed in float32)
  lmcache     the cache LMCache's fused_rotary_emb re-rotates with (lmcache/v1/compute/models/base.py:
              get_rope with rope_theta alone, at the layer's max_position_embeddings)
  lmcache_rows  how many positions that cache has
Caches are saved at POSITIONS only, rows [len(POSITIONS), head_dim]: the first 1K positions and 1K
from 4K and 16K on, where the tests move chunks to.

Config fields: the attribute names of vLLM's VllmConfig ("") and of each of its sub-configs
("model_config", ...), which the plugin's load-time checks read.

    python scripts/vllm_export.py OUT.pt     # needs vllm importable (scripts/vllm_python.py)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
POSITIONS = torch.cat([torch.arange(start, start + 1024) for start in (0, 4000, 16000)])


def vllm_rope(config, dtype=torch.float32):
    """The layer's rotary embedding, as vLLM's model files build it."""
    from vllm.model_executor.layers.rotary_embedding import get_rope

    return get_rope(config.head_dim, max_position=config.max_position_embeddings,
                    rope_parameters=config.rope_parameters, is_neox_style=True, dtype=dtype)


def lmcache_rope(emb):
    """LMCache 0.5.3's re-rotation embedding for a served layer (get_fused_rope with rope_scaling=None)."""
    from vllm.model_executor.layers.rotary_embedding import get_rope

    return get_rope(head_size=emb.head_size, max_position=emb.max_position_embeddings,
                    is_neox_style=emb.is_neox_style, dtype=emb.dtype,
                    rope_parameters={"rope_theta": emb.base, "partial_rotary_factor": 1.0})


def export(arch: str, folder: Path) -> dict:
    import tiny_checkpoints as tc
    from vllm.transformers_utils.config import get_config

    from helpers.gpu import rope

    out = folder / arch
    out.mkdir(parents=True, exist_ok=True)
    tc.write_config(tc.config_of(arch), out)
    config = get_config(str(out), trust_remote_code=False)  # what the plugin sees as hf_config
    try:
        checked = rope.check_rope(config)
    except rope.UnsupportedRope as e:
        checked = f"refused: {e}"
    emb = vllm_rope(config)
    row = {"cls": type(emb).__name__, "check_rope": checked,
           "served": emb.cos_sin_cache[POSITIONS].float()}
    try:
        rotation = rope.rotation_cache(emb)
        bf16 = rope.rotation_cache(vllm_rope(config, torch.bfloat16))
        row["rotation"] = rotation[POSITIONS]
        row["bf16_gap"] = float((bf16 - rotation).abs().max())
    except rope.UnsupportedRope as e:
        row["rotation"] = f"refused: {e}"
    wrong = lmcache_rope(emb)
    n = wrong.cos_sin_cache.shape[0]  # LMCache's kernel reads past it unchecked: NaN rows here
    row["lmcache"] = torch.full((len(POSITIONS), wrong.cos_sin_cache.shape[1]), float("nan"))
    row["lmcache"][POSITIONS < n] = wrong.cos_sin_cache[POSITIONS[POSITIONS < n]].float()
    row["lmcache_rows"] = int(wrong.cos_sin_cache.shape[0])
    return row


def config_fields() -> dict[str, list[str]]:
    """{"": VllmConfig's attribute names, "model_config": ModelConfig's, ...} (fields and properties)."""
    import dataclasses
    import typing

    from vllm.config import VllmConfig

    def names(cls):
        props = {n for n in dir(cls) if isinstance(getattr(cls, n, None), property)}
        return sorted({f.name for f in dataclasses.fields(cls)} | props)

    out = {"": names(VllmConfig)}
    for name, hint in typing.get_type_hints(VllmConfig).items():
        for cls in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(cls):
                out[name] = names(cls)
    return out


def main(path: str) -> None:
    import tiny_checkpoints as tc

    try:
        import vllm  # noqa: F401  (a GPU install has it in the venv)
    except ImportError:
        from vllm_python import TARGET

        sys.path.append(str(TARGET))  # after the venv's own packages
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    # vLLM's layers are built under a config (its CustomOp reads the compilation settings)
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))), \
            tempfile.TemporaryDirectory() as tmp:
        rows = {arch: export(arch, Path(tmp)) for arch in (*tc.ARCHS, *tc.REFUSED)}
    import vllm

    torch.save({"vllm": vllm.__version__, "positions": POSITIONS, "rows": rows,
                "config_fields": config_fields()}, path)
    for arch, r in rows.items():
        print(f"{arch}: vLLM {r['cls']}, check_rope {r['check_rope']!r:.60}, LMCache's cache "
              f"{r['lmcache_rows']} positions")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
