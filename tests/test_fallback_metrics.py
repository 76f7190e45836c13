"""The fast path's fallback counter reaches vLLM's /metrics: the engine process counts into the folder
PROMETHEUS_MULTIPROC_DIR names, and vLLM's API server serves what prometheus_client's
MultiProcessCollector reads there (`vllm.v1.metrics.prometheus.get_prometheus_registry`). The
launcher gives each blend engine its own such folder in the run dir, emptied at each launch."""

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from helpers import engines, runtime
from helpers.gpu import launch as gpu

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_quality  # noqa: E402 - the GPU tier's reader of /metrics

# An engine process, with the pass faked as in test_fast_blend's fallback test: each argument is a
# prompt; "fits" blends, "no room" does not fit, "boom" raises.
ENGINE = """
import sys, types
from helpers.gpu.fast import FastPath, blender as bl

class Fast:
    def __init__(self, *a):
        pass

    def blend(self, tokens, mask, kvcaches, slot_mapping):
        if tokens == "boom":
            raise RuntimeError("boom")
        return tokens == "fits"

bl.FastBlender = Fast
path = FastPath()
path.use(object())  # as the plugin does once the model is loaded
blend = bl.wrap_blend(lambda self, tokens, mask=None, **kw: None, path)
for tokens in sys.argv[1:]:
    blend(types.SimpleNamespace(), tokens, None, kvcaches=[], slot_mapping=None)
"""


def served(folder: Path) -> str:
    """What vLLM's /metrics serves with PROMETHEUS_MULTIPROC_DIR=folder."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    return generate_latest(registry).decode()


def test_fallbacks_reach_the_metrics_another_process_serves(tmp_path):
    runs = {"fallbacks": ["fits", "no room", "boom", "fits"], "none": ["fits", "fits"]}
    procs = {}
    for name, prompts in runs.items():
        (tmp_path / name).mkdir()
        env = {**os.environ, runtime.METRICS_DIR_ENV: str(tmp_path / name)}
        procs[name] = subprocess.Popen([sys.executable, "-c", ENGINE, *prompts], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for p in procs.values():
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out
    text = served(tmp_path / "fallbacks")
    assert 'kvblend_fast_path_fallbacks_total{reason="no_room"} 1.0' in text
    assert 'kvblend_fast_path_fallbacks_total{reason="error"} 1.0' in text
    assert gpu_quality.fast_fallbacks(text) == {"no_room": 1.0, "error": 1.0}
    # no fallback: both series there, at 0 from the start
    assert gpu_quality.fast_fallbacks(served(tmp_path / "none")) == {"no_room": 0.0, "error": 0.0}
    assert gpu_quality.fast_fallbacks("vllm:num_requests_running 0.0\n") is None


def test_a_blend_engines_metrics_folder_is_its_own_and_emptied_at_launch(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path / "run")
    e = gpu.blend_engine("blend", free_port(), "m", gpu_memory_utilization=0.2, max_model_len=8192)
    other = gpu.blend_engine("blend", free_port(), "m", gpu_memory_utilization=0.2, max_model_len=8192)
    folder = Path(e.env[runtime.METRICS_DIR_ENV])
    assert folder.parent == runtime.RUN_DIR and other.env[runtime.METRICS_DIR_ENV] != str(folder)  # replicas
    folder.mkdir()
    (folder / "counter_1.db").write_text("a previous run's")
    e.cmd = [sys.executable, "-c", "import time; time.sleep(60)"]  # a harmless stand-in for vLLM
    started = engines.launch(e)
    try:
        assert folder.is_dir() and not any(folder.iterdir())
        (folder / "counter_2.db").write_text("the running engine's")
        assert engines.launch(e).pid == started.pid  # already running: reused, its folder kept
        assert (folder / "counter_2.db").exists()
    finally:
        engines.stop_engine(started)
    # a folder outside the run dir, or the run dir itself, is never emptied
    for outside in (tmp_path / "elsewhere", runtime.RUN_DIR):
        outside.mkdir(exist_ok=True)
        (outside / "keep").write_text("not ours")
        engines.fresh_metrics_dir(runtime.Engine("x", 1, "vllm", env={runtime.METRICS_DIR_ENV: str(outside)}))
        assert (outside / "keep").exists()
