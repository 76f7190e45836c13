"""vLLM 0.26's own plugin loader calling our entry point (`helpers.gpu.plugin:register`, which
`pip install -e .` declares), on the CPU, with LMCache 0.5.3's own Python code where a case has it,
in a process of its own: run by tests/test_against_vllm.py.
vLLM calls every general plugin in every process it starts and lets an exception of the call
through: a plugin that raises takes every vLLM process of the environment down, blending or not.

    python -m tests.vllm_plugin_loader CASE     # prints one JSON object

CASE:
  pinned_pair   a blend engine with the pair the plugin patches (LMCache's compiled modules stand in by
                ones that raise: scripts/upstream_python.py): every patch applies. Also printed:
                whether LMCache's connector would store a request's segments (`RequestTracker` and
                `ReqMeta`, as its scheduler side builds them), for a plain client's request and for
                our precompute's (`kv_transfer_params: {"lmcache.save": true}`)
  plain         a plain engine (no LMCache config): nothing is patched
  no_lmcache    a blend engine where LMCache is not installed
  moved_symbol  a blend engine whose lmcache is 0.5.3 by its metadata, but without the modules the
                plugin patches (what a moved upstream symbol looks like to it)
  raising       the negative control: a plain engine whose plugin raises (ours replaced by one that
                does): vLLM's loader lets it through, and the process dies
Printed: whether vLLM's loader returned, and what `Worker.load_model` (vLLM's GPU worker, where a
blend engine stops when it cannot blend right) now is: "original", "wrapped" (the plugin's checks,
then the model registered for LMCache) or "refused: <message>".
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import upstream_python  # noqa: E402


def fake_lmcache(folder: Path) -> None:
    """A package `lmcache` 0.5.3 by its metadata, with none of LMCache's modules."""
    (folder / "lmcache").mkdir()
    (folder / "lmcache" / "__init__.py").write_text("")
    info = folder / "lmcache-0.5.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmcache\nVersion: 0.5.3\n")


def saved(kv_transfer_params: dict | None) -> bool:
    """Would LMCache's connector store this request's segments? Its scheduler side: the request's
    tracker (reading `kv_transfer_params` through `extract_request_configs`), then its metadata."""
    import types

    from lmcache.integration.vllm.vllm_v1_adapter import ReqMeta, RequestTracker
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": kv_transfer_params}
                            if kv_transfer_params else None)
    ids = list(range(1000, 1600))
    blocks = (list(range(len(ids) // 16 + 1)),)  # vLLM's block ids of the request, 16 tokens each
    request = types.SimpleNamespace(req_id="r", block_ids=blocks, prompt_token_ids=ids,
                                    sampling_params=params, mm_features=None)
    tracker = RequestTracker.from_new_request(None, request, len(ids), 0, skip_save=False)
    meta = ReqMeta.from_request_tracker(tracker, block_size=16, lmcache_chunk_size=256,
                                        discard_partial_chunks=False)
    return meta is not None and meta.save_spec is not None and meta.save_spec.can_save


def main(case: str) -> None:
    import os

    upstream_python.use_on_cpu(lmcache=case == "pinned_pair")
    tmp = Path(tempfile.mkdtemp())
    if case != "plain":
        config = tmp / "lmcache.yaml"
        config.write_text("chunk_size: 256\nenable_blending: true\n")
        os.environ["LMCACHE_CONFIG_FILE"] = str(config)
    if case == "moved_symbol":
        fake_lmcache(tmp)
        sys.path.insert(0, str(tmp))
    if case == "raising":
        from helpers.gpu import plugin

        def register():
            raise RuntimeError("a plugin that raises")

        plugin.register = register  # what vLLM's loader then finds behind our entry point
    from vllm.plugins import load_general_plugins
    from vllm.v1.worker import gpu_worker

    original = gpu_worker.Worker.load_model
    out = {"case": case}
    load_general_plugins()  # raises here if a plugin raises
    out["loader_returned"] = True
    if gpu_worker.Worker.load_model is original:
        out["load_model"] = "original"
    elif getattr(gpu_worker.Worker.load_model, "_kvblend", False):
        out["load_model"] = "wrapped"
    else:
        try:
            gpu_worker.Worker.load_model(None)
            out["load_model"] = "ran"
        except Exception as err:
            out["load_model"] = f"refused: {type(err).__name__}: {err}"
    if case == "pinned_pair":
        from lmcache.integration.vllm import vllm_v1_adapter
        from lmcache.v1.compute.blend import blender

        out["save_wrapped"] = getattr(vllm_v1_adapter.extract_request_configs, "_kvblend", False)
        out["blend_wrapped"] = getattr(blender.LMCBlender.blend, "_kvblend", False)
        out["saved"] = {"plain client": saved(None), "another lmcache key": saved({"lmcache.tag.user": "a"}),
                        "precompute": saved({"lmcache.save": True})}
        # the negative control: LMCache's own reading of the request, without the plugin's
        vllm_v1_adapter.extract_request_configs = vllm_v1_adapter.extract_request_configs.__wrapped__
        out["saved_unpatched"] = {"plain client": saved(None)}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
