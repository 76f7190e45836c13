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
from collections.abc import Callable
from importlib import metadata

from .. import runtime
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


class BlendRefused(RuntimeError):
    """This engine cannot blend right. Raised when the worker loads the model, so that vLLM stops
    the engine at start-up and prints the message, never from `register()` (vLLM's plugin loader
    would let it take down every vLLM process of the environment, blending or not)."""


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_problem(have: dict | None = None, environ=None) -> str | None:
    """Why this vLLM/LMCache pair is not the tested one (None when it is, or when
    KVBLEND_SKIP_VERSION_CHECK=1 asks to try it): the plugin patches exactly that pair."""
    from .launch import SKIP_VERSION_ENV, VERSIONS

    environ = os.environ if environ is None else environ
    have = {name: installed_version(name) for name in VERSIONS} if have is None else have
    off = [f"{name} {have.get(name) or '(not installed)'}" for name, want in VERSIONS.items()
           if have.get(name) != want]
    if not off or runtime.skip_version_check(environ):
        return None
    pins = " ".join(f"'{name}=={want}'" for name, want in VERSIONS.items())
    return (f"this environment has {', '.join(off)}; the kvblend plugin is tested with {pins} only and "
            f"patches exactly that pair. Install it (`pip install {pins}`), or set {SKIP_VERSION_ENV}=1 "
            f"to try this pair anyway.")


# ------------------------------------------------------------------ load-time checks
# Each runs in the worker on vLLM's config (`VllmConfig`) before the model loads, in a blend engine
# only. A check refuses by raising (BlendRefused, or any exception with a clear message: vLLM stops
# the engine at start-up and prints it) and may return warnings (logged).
def check_rope_at_load(config) -> list[str]:
    """Refuse a model whose RoPE blending cannot re-rotate (rope.check_rope names its type)."""
    from .rope import UnsupportedRope, check_rope

    try:
        check_rope(config.model_config.hf_config)
    except UnsupportedRope as err:
        raise BlendRefused(f"kvblend: {err} Serve this model without blending.") from err
    return []


def check_architecture(config) -> list[str]:
    """Refuse a model class LMCache's blender has no layer-wise model for: it looks the class vLLM
    built up by name, and would stop the engine with `NotImplementedError` once its blender is built.
    vLLM builds Mistral checkpoints as its own MistralForCausalLM, whose layers are Llama's: say how
    to serve them as Llama (what the launcher does)."""
    from .launch import SUPPORTED_ARCHS

    arch = getattr(config.model_config, "architecture", None)  # the one vLLM serves
    if arch is None or (arch in SUPPORTED_ARCHS and SUPPORTED_ARCHS[arch] is None):
        return []
    computed = ", ".join(a for a, served_as in SUPPORTED_ARCHS.items() if served_as is None)
    if arch in SUPPORTED_ARCHS:
        served_as = SUPPORTED_ARCHS[arch]
        raise BlendRefused(f"kvblend: vLLM serves this model as {arch}, which LMCache's blender has no "
                           f"model for; its layers are {served_as}'s: pass --hf-overrides "
                           f"'{{\"architectures\": [\"{served_as}\"]}}' to serve it as that.")
    raise BlendRefused(f"kvblend: vLLM serves this model as {arch}; LMCache's blender computes only "
                       f"{computed}. Serve this model without blending.")


def check_parallelism(config) -> list[str]:
    """Refuse tensor and pipeline parallelism. Selection is made to agree across tensor-parallel
    ranks (the deviation is all-reduced before top-k), but no multi-GPU engine has blended yet;
    pipeline stages hold no layers of the others (PPMissingLayer), which the blender walks."""
    parallel = config.parallel_config
    tp = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
    pp = int(getattr(parallel, "pipeline_parallel_size", 1) or 1)
    if tp > 1 or pp > 1:
        raise BlendRefused(
            f"kvblend: blending is refused with --tensor-parallel-size {tp} --pipeline-parallel-size {pp}: "
            f"it has run on one GPU per engine only. Serve the blend engine on one GPU "
            f"(--tensor-parallel-size 1 --pipeline-parallel-size 1; start one engine per GPU for more), "
            f"or start this engine without LMCache's blending.")
    return []


def check_serving_settings(config) -> list[str]:
    """Refuse the vLLM settings the blend paths were never run under (what a hand-started
    `vllm serve` gets by default). Each is refused, not warned about, since each can serve a wrong
    blend or fail mid-request rather than at start-up:
    - prefix caching: vLLM hands LMCache prompts whose leading blocks it already holds; the blend
      writes every token's KV, rewriting blocks that other requests share;
    - CUDA graphs (no --enforce-eager): LMCache's layer-wise blending breaks under vLLM's graphs
      (LMCache #2639), and no blend path has run so;
    - a token budget below the context: a longer prompt is prefilled in chunks, which LMCache's
      blender does not blend as one prompt, and its blend would run beyond the memory vLLM profiled;
    - vLLM's own copy of LMCache's connector (`use_native`): the save policy is not applied there."""
    model, cache, scheduler = config.model_config, config.cache_config, config.scheduler_config
    problems = []
    if getattr(cache, "enable_prefix_caching", False):
        problems.append("prefix caching is on (pass --no-enable-prefix-caching)")
    if not getattr(model, "enforce_eager", False):
        problems.append("vLLM's CUDA graphs are on (pass --enforce-eager)")
    budget = getattr(scheduler, "max_num_batched_tokens", None)
    context = getattr(model, "max_model_len", None)
    if budget is not None and context is not None and budget < context:
        problems.append(f"--max-num-batched-tokens {budget} is below --max-model-len {context}, so longer "
                        f"prompts would be prefilled in chunks (pass --max-num-batched-tokens {context})")
    transfer = getattr(config, "kv_transfer_config", None)
    if (getattr(transfer, "kv_connector_extra_config", None) or {}).get("use_native"):
        # vLLM's in-tree copy of LMCache's connector: the save policy patches LMCache's own
        problems.append('the KV connector is vLLM\'s copy of LMCache\'s ("use_native": true; drop it)')
    if problems:
        raise BlendRefused("kvblend: this blend engine's settings were never run with blending: "
                           + "; ".join(problems) + ". docs/gpu.md, \"Starting the blend engine by hand\", "
                           "has the command.")
    return []


LOAD_CHECKS: list[Callable] = [check_architecture, check_rope_at_load, check_parallelism,
                               check_serving_settings]


def run_load_checks(config) -> None:
    """Every LOAD_CHECKS check on vLLM's config: warnings logged, the first refusal raised."""
    for check in LOAD_CHECKS:
        for warning in check(config) or ():
            log.warning("kvblend: %s", warning)


# ------------------------------------------------------------------ patches
def _register_model_after_load() -> None:
    """Wrap `Worker.load_model`: the load-time checks first, then the loaded model is registered for
    LMCache's blender (and, on the fast path, gets its GPU chunk store)."""
    from vllm.v1.worker import gpu_worker

    original = gpu_worker.Worker.load_model
    if getattr(original, "_kvblend", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        run_load_checks(self.vllm_config)
        result = original(self, *args, **kwargs)
        from lmcache.integration.vllm.utils import ENGINE_NAME
        from lmcache.v1.compute.models.utils import VLLMModelTracker

        model = self.model_runner.get_model()
        VLLMModelTracker.register_model(ENGINE_NAME, model)
        if FAST.settings.path == "fast":
            from .fast.store import make_store

            FAST.use(make_store(self, model, FAST.settings.store_gb))
        return result

    load_model._kvblend = True
    gpu_worker.Worker.load_model = load_model


def _refuse_blending(reason: str) -> None:
    """Log why blending is refused, once, and make the engine stop with it when its model loads
    (a blend engine must not serve LMCache's blender unpatched: wrong answers)."""
    log.error("kvblend plugin inactive, blending refused: %s", reason)
    try:
        from vllm.v1.worker import gpu_worker

        def load_model(self, *args, **kwargs):
            raise BlendRefused(f"kvblend: blending refused: {reason}")

        gpu_worker.Worker.load_model = load_model
    except Exception as err:  # no vLLM worker to stop: vLLM (or LMCache) will fail on its own
        log.error("kvblend plugin: cannot stop the engine at load either (%s: %s)", type(err).__name__, err)


SAVE_KEY = "lmcache.save"  # kv_transfer_params {"lmcache.save": true}: this request's segments are stored


def save_only_on_request(original):
    """Wrap LMCache's `extract_request_configs` (its connector's reading of a request's
    `kv_transfer_params`): a request that does not ask to be saved gets `lmcache.skip_save`.

    LMCache saves every request's segments unless it sends `lmcache.skip_save`. In a blend engine
    that stores every question and every chunk computed after other chunks (a plain OpenAI client
    sends nothing): the next prompt would blend KV that carries other chunks' context. Only the
    precompute (`helpers.gpu.launch.precompute`), which computes each chunk alone, asks. The keys of
    what is stored stay the same: LMCache keys by tokens and `lmcache.tag.*` only."""

    @functools.wraps(original)
    def extract_request_configs(sampling_params):
        configs = original(sampling_params)
        if (configs or {}).get(SAVE_KEY) is True:
            return configs
        return {**(configs or {}), "lmcache.skip_save": True}

    extract_request_configs._kvblend = True
    return extract_request_configs


def _save_only_on_request() -> None:
    from lmcache.integration.vllm import vllm_v1_adapter

    original = vllm_v1_adapter.extract_request_configs
    if not getattr(original, "_kvblend", False):
        vllm_v1_adapter.extract_request_configs = save_only_on_request(original)


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


def _patch() -> GpuBlendSettings:
    """Check the pair, read the settings and apply the patches they ask for (raises on anything)."""
    problem = version_problem()
    if problem:
        raise BlendRefused(problem)
    settings = FAST.settings = GpuBlendSettings.from_env()
    from .kv_transfer import route_4d_kv_transfer
    from .mended import mend_blender

    _register_model_after_load()
    _save_only_on_request()
    route_4d_kv_transfer()
    if settings.path in ("fixed", "fast"):
        mend_blender(settings)  # the fast path falls back to the mended blender
    if settings.path == "fast":
        _use_fast_path()
    lmcache_memory = logging.getLogger("lmcache.v1.memory_management")
    if not any(isinstance(f, FirstOnly) for f in lmcache_memory.filters):
        lmcache_memory.addFilter(FirstOnly("Double unpin"))
    return settings


def register() -> None:
    """vLLM's entry point: in a blend engine, apply the patches its settings ask for.

    Never raises: vLLM calls it in every process of the environment and lets an exception through
    (its loader catches only failures to import the plugin), which would take down plain engines too.
    Not a blend engine, or blending not readable from LMCache's config: nothing is patched. A blend
    engine whose pair is untested, whose settings are bad, or whose patches fail (an upstream
    symbol moved) gets one log line and stops when its model loads, saying why."""
    try:
        if not blending_enabled():
            return
    except Exception as err:
        log.warning("kvblend plugin inactive: cannot read LMCache's config (%s: %s)", type(err).__name__, err)
        return
    try:
        settings = _patch()
    except BlendRefused as err:
        _refuse_blending(str(err))
        return
    except Exception as err:  # an upstream symbol moved, a bad setting, vLLM or LMCache missing
        _refuse_blending(f"{type(err).__name__}: {err} (the plugin patches vllm==0.26.0 with lmcache==0.5.3)")
        return
    log.info("kvblend plugin active: model registered for LMCache's blender, 4-D KV transfer in PyTorch, "
             "%s", settings)
