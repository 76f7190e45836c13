"""What vLLM builds, exported on the CPU for tests/test_against_vllm.py, which checks our GPU code
against it: vLLM's own Python code (scripts/upstream_python.py installs it; no kernel runs).

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

Commands: `vllm serve` command lines (our launcher's, docs/gpu.md's by-hand one, vLLM's defaults and
a few a user may type; COMMANDS) parsed by vLLM's own `serve` parser into the VllmConfig a worker
gets, and the plugin's load-time checks run on it: per command "ok", "refused: <why>" or
"error: <what vLLM said>", and the architecture vLLM serves. vLLM's CPU platform stands in for CUDA
(scripts/upstream_python.py: use_on_cpu).

    python scripts/vllm_export.py rotary OUT.pt      # rotary embeddings and config fields
    python scripts/vllm_export.py commands OUT.pt    # command lines
"""

from __future__ import annotations

import json
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


def docs_command(model: str, max_model_len: int) -> list[str]:
    """docs/gpu.md's "Starting the blend engine by hand" command, for `model`."""
    import re
    import shlex

    md = (ROOT / "docs" / "gpu.md").read_text()
    block = md.split("**Starting the blend engine by hand.**", 1)[1].split("```", 2)[1]
    line = re.sub(r"\\\n\s*", " ", block).strip()
    return [model if w == "MODEL" else str(max_model_len) if w == "N" else w for w in shlex.split(line)]


def commands(folder: Path) -> dict[str, list[str]]:
    """{case: a `vllm serve` command line} over the tiny checkpoints' configs."""
    import tiny_checkpoints as tc

    from helpers.gpu import launch

    paths = {}
    for arch in (*tc.ARCHS, *tc.REFUSED):
        paths[arch] = folder / arch
        paths[arch].mkdir(parents=True, exist_ok=True)
        tc.write_config(tc.config_of(arch), paths[arch])

    def ours(arch, blend=True, architecture="served", extra=()):
        if architecture == "served":
            config = json.loads((paths[arch] / "config.json").read_text())
            architecture = launch.served_architecture(config, arch)
        return launch.vllm_command(str(paths[arch]), 8000, "127.0.0.1", blend=blend, max_model_len=32768,
                                   gpu_memory_utilization=0.9, architecture=architecture, extra_args=extra)

    cases = {f"launcher {arch}": ours(arch) for arch in tc.ARCHS}
    cases |= {
        "launcher full engine": ours("llama31", blend=False),
        "docs by hand": docs_command(str(paths["llama31"]), 32768),
        "vllm serve defaults": ["vllm", "serve", str(paths["llama31"]), "--kv-transfer-config",
                                '{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}'],
        "mistral without the override": ours("mistral", architecture=None),
        "tensor parallel 2": ours("llama31", extra=("--tensor-parallel-size", "2")),
        "dynamic rope": ours("llama_dynamic", architecture=None),
    }
    return cases


def engine_config(argv: list[str]):
    """The VllmConfig `vllm serve` builds from argv (from `serve MODEL ...` on)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    rest = argv[argv.index("serve") + 1:]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", rest[0], *rest[1:]])  # model_tag
    validate_parsed_serve_args(args)
    return EngineArgs.from_cli_args(args).create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)


def checked_commands(folder: Path) -> dict[str, dict]:
    """{case: {"argv", "result", "architecture"}}: each command's config and the plugin's verdict."""
    from helpers.gpu import plugin

    out = {}
    for case, argv in commands(folder).items():
        row = {"argv": argv, "architecture": None}
        try:
            config = engine_config(argv)
            row["architecture"] = config.model_config.architecture
            plugin.run_load_checks(config)
            row["result"] = "ok"
        except plugin.BlendRefused as e:
            row["result"] = f"refused: {e}"
        except Exception as e:  # what vLLM itself says of the command line
            row["result"] = f"error: {type(e).__name__}: {e}"
        out[case] = row
    return out


def main(what: str, path: str) -> None:
    import tiny_checkpoints as tc
    import upstream_python

    upstream_python.use_on_cpu()
    import vllm
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    saved = {"vllm": vllm.__version__}
    if what == "rotary":
        # vLLM's layers are built under a config (its CustomOp reads the compilation settings)
        with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))), \
                tempfile.TemporaryDirectory() as tmp:
            rows = {arch: export(arch, Path(tmp)) for arch in (*tc.ARCHS, *tc.REFUSED)}
        saved |= {"positions": POSITIONS, "rows": rows, "config_fields": config_fields()}
        for arch, r in rows.items():
            print(f"{arch}: vLLM {r['cls']}, check_rope {r['check_rope']!r:.60}, LMCache's cache "
                  f"{r['lmcache_rows']} positions")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            saved["commands"] = checked_commands(Path(tmp))
        for case, r in saved["commands"].items():
            print(f"{case}: served as {r['architecture']}, {r['result']:.150}")
    torch.save(saved, path)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("rotary", "commands"):
        sys.exit(__doc__)
    main(*sys.argv[1:])
