"""vLLM 0.26's own plugin loader calling our entry point (`helpers.gpu.plugin:register`, which
`pip install -e .` declares), on the CPU, in a process of its own: run by tests/test_against_vllm.py.
vLLM calls every general plugin in every process it starts and lets an exception of the call
through: a plugin that raises takes every vLLM process of the environment down, blending or not.

    python -m tests.vllm_plugin_loader CASE     # prints one JSON object

CASE:
  plain         a plain engine (no LMCache config): nothing is patched
  no_lmcache    a blend engine where LMCache is not installed
  moved_symbol  a blend engine whose lmcache is 0.5.3 by its metadata, but without the modules the
                plugin patches (what a moved upstream symbol looks like to it)
  raising       the negative control: a plain engine whose plugin raises (ours replaced by one that
                does): vLLM's loader lets it through, and the process dies
Printed: whether vLLM's loader returned, and what `Worker.load_model` (vLLM's GPU worker, where a
blend engine stops when it cannot blend right) now does: "original", or "refused: <message>".
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import vllm_python  # noqa: E402


def fake_lmcache(folder: Path) -> None:
    """A package `lmcache` 0.5.3 by its metadata, with none of LMCache's modules."""
    (folder / "lmcache").mkdir()
    (folder / "lmcache" / "__init__.py").write_text("")
    info = folder / "lmcache-0.5.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmcache\nVersion: 0.5.3\n")


def main(case: str) -> None:
    import os

    vllm_python.use_on_cpu()
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
    else:
        try:
            gpu_worker.Worker.load_model(None)
            out["load_model"] = "ran"
        except Exception as err:
            out["load_model"] = f"refused: {type(err).__name__}: {err}"
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
