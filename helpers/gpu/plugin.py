"""vLLM general plugin that lets LMCache 0.5.3's CacheBlend run on vLLM 0.26, and blend right.

vLLM calls `register()` in every process it starts, through the entry point
`vllm.general_plugins: kvblend_lmcache` (pyproject.toml). It does nothing unless LMCache's config
enables blending, so a plain vLLM engine, such as our baseline, runs untouched. In a blend engine it
reads the launcher's `GpuBlendSettings` once and patches at start-up, never on disk: the model is
registered for LMCache's blender, vLLM's 4-D KV layout gets a transfer (`kv_transfer`), the
blender's two faults are mended (`mended`; not on the `upstream` path, kept to compare) and, on the
`fast` path, LMCache's blend and lookup go through our one-pass blender (`fast`). docs/gpu.md
tells the faults and their measurements.
"""

from __future__ import annotations

import functools
import logging
import os
import re

from ..settings import GpuBlendSettings
from .fast import FastPath

log = logging.getLogger("vllm.kvblend_plugin")  # a child of vLLM's logger: lands in the engine log
FAST = FastPath()  # this process's fast path: register() sets its settings, the loaded model its store


def blending_enabled(environ=None) -> bool:
    """True when this vLLM process is a blend engine: LMCache's config enables blending."""
    environ = os.environ if environ is None else environ
    if environ.get("LMCACHE_ENABLE_BLENDING", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    path = environ.get("LMCACHE_CONFIG_FILE", "")
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return False
    match = re.search(r"^enable_blending\s*:\s*(\S+)", text, re.MULTILINE)
    return bool(match) and match.group(1).strip("'\"").lower() in ("true", "yes", "on", "1")


class FirstOnly(logging.Filter):
    """Lets the first record that contains `text` through and drops the rest (counted in `dropped`).

    LMCache 0.5.3's layer-wise blending unpins each retrieved memory object twice and warns
    "Double unpin occurred ... Setting pin count back to 0" for every layer of every chunk: some
    1,500 lines per 32K-token request, written in the engine's step, on the time to first token."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.dropped = text, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        self.dropped += 1
        return self.dropped == 1


def _register_model_after_load() -> None:
    """Wrap `Worker.load_model` so the loaded model is registered for LMCache's blender (and, on the
    fast path, gets its GPU chunk store)."""
    from vllm.v1.worker import gpu_worker

    original = gpu_worker.Worker.load_model
    if getattr(original, "_kvblend", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        from lmcache.integration.vllm.utils import ENGINE_NAME
        from lmcache.v1.compute.models.utils import VLLMModelTracker

        model = self.model_runner.get_model()
        VLLMModelTracker.register_model(ENGINE_NAME, model)
        if FAST.settings.path == "fast":
            from .fast.store import make_store

            FAST.store = make_store(self, model, FAST.settings.store_gb)
        return result

    load_model._kvblend = True
    gpu_worker.Worker.load_model = load_model


def _use_fast_path() -> None:
    """LMCache's blend and lookup through the fast path (each wrapped once per process)."""
    from lmcache.v1.cache_engine import LMCacheEngine
    from lmcache.v1.compute.blend import blender

    from .fast.blender import wrap_blend
    from .fast.lookup import store_first_lookup

    if not getattr(blender.LMCBlender.blend, "_kvblend", False):
        blender.LMCBlender.blend = wrap_blend(blender.LMCBlender.blend, FAST)
    if FAST.settings.lookup and not getattr(LMCacheEngine.lookup, "_kvblend", False):
        LMCacheEngine.lookup = store_first_lookup(LMCacheEngine.lookup, FAST)


def register() -> None:
    """vLLM's entry point: in a blend engine, apply the patches its settings ask for."""
    if not blending_enabled():
        return
    settings = FAST.settings = GpuBlendSettings.from_env()  # a bad value stops the engine, with its message
    try:
        from .kv_transfer import route_4d_kv_transfer
        from .mended import mend_blender

        _register_model_after_load()
        route_4d_kv_transfer()
        if settings.path in ("fixed", "fast"):
            mend_blender(settings)  # the fast path falls back to the mended blender
        if settings.path == "fast":
            _use_fast_path()
    except ImportError as err:  # vLLM or LMCache missing: the engine itself will say so
        log.warning("kvblend plugin inactive, cannot import %s", err.name or err)
        return
    lmcache_memory = logging.getLogger("lmcache.v1.memory_management")
    if not any(isinstance(f, FirstOnly) for f in lmcache_memory.filters):
        lmcache_memory.addFilter(FirstOnly("Double unpin"))
    log.info("kvblend plugin active: model registered for LMCache's blender, 4-D KV transfer in PyTorch, "
             "%s", settings)
