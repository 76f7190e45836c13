"""The GPU backend: vLLM + LMCache's CacheBlend on GPU 0 (`blend`, :8000), plain vLLM on GPU 1
(`full`, :8001), started as subprocesses by `helpers.engines`. Same shape as
`helpers/embedded/launch.py`: `available`, `engines`, `precompute`, `request`.

Both engines run eagerly (LMCache's blending breaks under CUDA graphs, LMCache #2639) with vLLM's
prefix cache off, so the baseline prefills every token and the blend engine reuses only what LMCache
gives it. The blend engine gets an LMCache YAML written into `.engines/` from our settings, and our
vLLM plugin (`helpers/gpu/plugin.py`) closes the two gaps between vLLM 0.26 and LMCache 0.5.3.
Prompts go to both as the same token ids (`helpers.prompts.chat_prompt_ids`): the chat-templated
conversation with the separator ids LMCache's `SegmentTokenDatabase` searches for between its
segments. The tested pair is vllm==0.26.0 + lmcache==0.5.3 (docs/gpu.md).

Nothing heavy is imported at module level: this module imports on a machine without torch or vLLM,
and its checks say what is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .. import runtime
from ..prompts import DEFAULT_SYSTEM, SEP, chat_prompt_ids, chat_segment_ids
from ..runtime import HOST, Engine, EngineError
from ..settings import BLEND, BLEND_PATHS, GPU_BLEND, GpuBlendSettings

DEFAULT_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
VERSIONS = {"vllm": "0.26.0", "lmcache": "0.5.3"}  # the pair validated on H200s (docs/gpu.md)
SHARE_ENV, SKIP_VERSION_ENV = runtime.SHARE_GPU_ENV, runtime.SKIP_VERSION_ENV  # user settings, in runtime
PLUGIN = "kvblend_lmcache"
# The precomputed chunks are the only cache entries: our plugin stores a blend engine's request
# only when it asks (SAVE, what precompute sends), never a question (it would become a cached
# "chunk", blended the next time it is asked). Questions also say so (NO_SAVE), for LMCache itself.
SAVE = {"kv_transfer_params": {"lmcache.save": True}}  # helpers.gpu.plugin.SAVE_KEY
NO_SAVE = {"kv_transfer_params": {"lmcache.skip_save": True}}
DEFAULT_MAX_MODEL_LEN = 32768
# Architectures LMCache 0.5.3's blender has a layer-wise model for (it matches vLLM's class name).
# Mistral's is Llama's with another name: served as LlamaForCausalLM, it loads the same weights.
SUPPORTED_ARCHS = {"LlamaForCausalLM": None, "Qwen2ForCausalLM": None, "Qwen3ForCausalLM": None,
                   "MistralForCausalLM": "LlamaForCausalLM"}
# For every vLLM process: no telemetry, no optional kernels the tested setup does not ship.
BASE_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "LMCACHE_TRACK_USAGE": "false",
            "VLLM_USE_DEEP_GEMM": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


# ------------------------------------------------------------------ checks
def available() -> bool:
    """What `--backend auto` asks: two GPUs and vLLM installed (checked without importing it)."""
    return runtime.gpu_count() >= 2 and importlib.util.find_spec("vllm") is not None


def visible_gpus() -> list[str]:
    """GPU ids the engines may use: those nvidia-smi lists, narrowed by CUDA_VISIBLE_DEVICES if set."""
    if runtime.gpu_count() == 0:
        return []
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return [str(i) for i in range(runtime.gpu_count())]
    ids = []
    for d in (d.strip() for d in cvd.split(",")):
        if not d or d.startswith("-"):  # CUDA ignores everything from the first invalid id on
            break
        ids.append(d)
    return ids


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_gpus() -> tuple[str, str]:
    """(GPU for the blend engine, GPU for the baseline); one GPU twice only with KVBLEND_SHARE_GPU=1."""
    gpus = visible_gpus()
    if not gpus:
        hidden = " or CUDA_VISIBLE_DEVICES hides them" if "CUDA_VISIBLE_DEVICES" in os.environ else ""
        raise EngineError(f"No NVIDIA GPU found (nvidia-smi lists none{hidden}). The vLLM backend needs two "
                          "GPUs, one per engine; on this machine use `--backend embedded` (the CPU engines).")
    if len(gpus) >= 2:
        return gpus[0], gpus[1]
    if runtime.share_gpu():
        return gpus[0], gpus[0]
    raise EngineError(
        f"Only one GPU is visible ({gpus[0]}); the vLLM backend puts the blend engine on one GPU and "
        f"the baseline on another, so each gets the whole GPU. To run both on this one GPU anyway (each "
        f"with ~40% of its memory, timings then share the GPU), set {SHARE_ENV}=1; otherwise use "
        f"`--backend embedded`.")


def check_versions() -> None:
    """vLLM and LMCache must be installed, and be the tested pair unless KVBLEND_SKIP_VERSION_CHECK=1."""
    pins = " ".join(f"'{n}=={v}'" for n, v in VERSIONS.items())
    for name, wanted in VERSIONS.items():
        have = installed_version(name)
        if have is None:
            raise EngineError(
                f"{name} is not installed for {sys.executable}. Install the GPU extra, which pins the "
                f"tested pair (Python 3.12): `pip install -e '.[gpu]'` (or `pip install {pins}`), "
                f"or use `--backend embedded`.")
        if have != wanted and not runtime.skip_version_check():
            raise EngineError(
                f"{name} {have} is installed, but this backend is tested with {pins} only: the plugin "
                f"in helpers/gpu/plugin.py patches exactly that pair. Install it with `pip install "
                f"{pins}`, or set {SKIP_VERSION_ENV}=1 to try {name} {have} anyway.")


def model_config(model: str) -> dict | None:
    """The model's config.json, from its folder or the Hugging Face cache; None if not at hand."""
    path = Path(model) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        cached = try_to_load_from_cache(model, "config.json")
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def served_architecture(config: dict | None, model: str) -> str | None:
    """The architecture to serve the model as (for --hf-overrides), None to keep its own.

    Raises EngineError for an architecture LMCache's blender has no model for, or a RoPE variant
    blending cannot re-rotate (`rope.check_rope`). A config we cannot
    read (model not downloaded yet) passes: LMCache then names the problem in the engine log."""
    archs = (config or {}).get("architectures") or []
    if not archs:
        return None
    for arch in archs:
        if arch in SUPPORTED_ARCHS:
            from .rope import UnsupportedRope, check_rope

            try:  # a RoPE blending cannot move would answer wrong: refused before any engine starts
                check_rope(config)
            except UnsupportedRope as err:
                raise EngineError(f"{model}: {err}") from err
            return SUPPORTED_ARCHS[arch]
    raise EngineError(
        f"{model} is a {', '.join(archs)} model; LMCache {VERSIONS['lmcache']}'s blender only computes "
        f"Llama-family layers ({', '.join(sorted(SUPPORTED_ARCHS))}). Pick such a model with --model "
        f"(e.g. {DEFAULT_MODEL}), or use `--backend embedded`.")


# ------------------------------------------------------------------ engines
def lmcache_yaml(ratio: float = BLEND.ratio, check_layer: int = BLEND.check_layer, chunk_size: int = 256,
                 cpu_cache_gb: float = 16.0, remote_url: str | None = None) -> str:
    """LMCache's config for the blend engine. Both blend lists must be set: 0.5.3 defaults them to None.
    `remote_url` (redis://HOST:PORT, `--kv-store`): LMCache's Redis remote backend behind its local
    CPU store, so chunk KV one engine computed can load into another. UNTESTED ON GPUs: the config is
    what LMCache documents; whether the fast path's GPU store is fed from it has not been measured."""
    if not 0 < ratio <= 1:
        raise EngineError(f"The recompute ratio must be in (0, 1], got {ratio}.")
    if check_layer < 0:
        raise EngineError(f"The check layer must be >= 0, got {check_layer}.")
    return (
        "# Written by helpers.gpu.launch for the blend engine: change the settings there, not here.\n"
        f"chunk_size: {chunk_size}\n"
        "local_cpu: true\n"
        f"max_local_cpu_size: {cpu_cache_gb}\n"
        "use_layerwise: true\n"
        "enable_blending: true\n"
        f'blend_special_str: "{SEP}"\n'
        f"blend_recompute_ratios: [{ratio}]\n"
        f"blend_check_layers: [{check_layer}]\n"
        + (f'remote_url: "{remote_url}"\nremote_serde: "naive"\n' if remote_url else "")
    )


def plugin_path() -> list[str]:
    """Where vLLM can find our plugin's entry point: nothing extra once the package is pip-installed.

    vLLM finds general plugins through installed entry points only. From a checkout that was never
    installed (e.g. `python3 -m helpers.engines` on a fresh machine) we write a minimal dist-info that
    declares the same entry point into `.engines/plugin/` and put that folder on the engines' path."""
    if any(ep.name == PLUGIN for ep in metadata.entry_points(group="vllm.general_plugins")):
        return []
    info = runtime.RUN_DIR / "plugin" / "kvblend_tutorial_plugin-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvblend-tutorial-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        f"[vllm.general_plugins]\n{PLUGIN} = helpers.gpu.plugin:register\n")
    return [str(info.parent)]


def vllm_command(model: str, port: int, host: str, *, blend: bool, gpu_memory_utilization: float,
                 max_model_len: int, load_format: str | None = None, dtype: str = "auto",
                 architecture: str | None = None, extra_args: tuple = ()) -> list[str]:
    """`vllm serve` for one engine. Both: eager, no prefix cache, whole prompt in one prefill step
    (LMCache blends a prompt in one step), HF tokenizer (the ids we send are built with it)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--host", host,
           "--port", str(port), "--dtype", dtype, "--gpu-memory-utilization", str(gpu_memory_utilization),
           "--max-model-len", str(max_model_len), "--max-num-batched-tokens", str(max_model_len),
           "--enforce-eager", "--no-enable-prefix-caching", "--tokenizer-mode", "hf"]
    if load_format:
        cmd += ["--load-format", load_format]
    if architecture:
        cmd += ["--hf-overrides", json.dumps({"architectures": [architecture]})]
    if blend:
        connector = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
        cmd += ["--kv-transfer-config", json.dumps(connector)]
    return cmd + list(extra_args)


def engines(model: str | None, blend_port: int, full_port: int, host: str = HOST,
            ratio: float = BLEND.ratio, check_layer: int = BLEND.check_layer, load_format: str | None = None,
            gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
            dtype: str = "auto", chunk_size: int = 256, cpu_cache_gb: float = 16.0,
            blend_path: str = GPU_BLEND.path, gpu_kv_store_gb: float = GPU_BLEND.store_gb,
            kv_store: str | None = None, **embedded_only) -> list[Engine]:
    """The blend and full engines (not started). Checks GPUs, versions and the model first.
    `blend_path`: `fast` (the default: our one-pass blender, chunk KV kept in `gpu_kv_store_gb` GB
    of GPU memory, 2x plain vLLM at 8K tokens on an H200), `fixed` (LMCache's blender, mended: the
    same answers, slower) or `upstream` (LMCache's, as shipped: wrong answers); both correct paths
    checked on real weights (docs/gpu.md, helpers/gpu/plugin.py).
    `kv_store`: a Redis URL for LMCache's remote backend (`lmcache_yaml`; untested on GPUs).
    `embedded_only`: the embedded backend's options (`kv_dir`), ignored: LMCache keeps its own store."""
    if blend_path not in BLEND_PATHS:
        raise EngineError(f"--blend-path must be one of {', '.join(BLEND_PATHS)}, got {blend_path!r}.")
    if gpu_kv_store_gb < 0 or (blend_path == "fast" and gpu_kv_store_gb == 0):
        raise EngineError(f"--gpu-kv-store-gb must be > 0 on the fast path, got {gpu_kv_store_gb}.")
    blend_gpu, full_gpu = check_gpus()
    check_versions()
    model = model or DEFAULT_MODEL
    config = model_config(model)
    architecture = served_architecture(config, model)
    if gpu_memory_utilization is None:
        gpu_memory_utilization = 0.4 if blend_gpu == full_gpu else 0.9
    if max_model_len is None:
        max_model_len = min(int((config or {}).get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN),
                            DEFAULT_MAX_MODEL_LEN)

    opts = dict(gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                load_format=load_format, dtype=dtype, architecture=architecture)
    settings = GpuBlendSettings(path=blend_path, store_gb=gpu_kv_store_gb)
    blend = blend_engine("blend", blend_port, model, host=host, settings=settings, ratio=ratio,
                         check_layer=check_layer, chunk_size=chunk_size,
                         cpu_cache_gb=cpu_cache_gb, env={"CUDA_VISIBLE_DEVICES": blend_gpu},
                         remote_url=kv_store, **opts)
    return [blend, full_engine("full", full_port, model, host=host, env={"CUDA_VISIBLE_DEVICES": full_gpu},
                               **opts)]


def engine_env(extra: dict) -> dict:
    """Environment of a vLLM engine: ours (no telemetry, the plugin on the path, the API key) + extra."""
    path = os.pathsep.join([str(runtime.ROOT), *plugin_path(), *filter(None, [os.environ.get("PYTHONPATH")])])
    key = {"VLLM_API_KEY": runtime.api_key()} if runtime.api_key() else {}  # vllm serve's --api-key
    return {**BASE_ENV, **key, "PYTHONPATH": path, **extra}


def full_engine(name: str, port: int, model: str, host: str = HOST, env: dict | None = None,
                **opts) -> Engine:
    """A plain vLLM engine (`opts`: vllm_command's); LMCache off."""
    return Engine(name, port, "vllm", vllm_command(model, port, host, blend=False, **opts),
                  engine_env({"LMCACHE_CONFIG_FILE": "", **(env or {})}), host=host, model=model)


def blend_engine(name: str, port: int, model: str, host: str = HOST, settings: GpuBlendSettings = GPU_BLEND,
                 ratio: float = BLEND.ratio, check_layer: int = BLEND.check_layer,
                 chunk_size: int = 256, cpu_cache_gb: float = 16.0, env: dict | None = None,
                 remote_url: str | None = None, **opts) -> Engine:
    """A vLLM + LMCache blend engine, with its own LMCache YAML in `.engines/` (and, for any name but
    `blend`, its own folder for LMCache's lookup sockets, so several can run side by side) and its
    own folder of Prometheus samples in `.engines/` (emptied at each launch).
    `settings` reach our plugin in the engine's processes through `settings.to_env()`, its one
    channel; benchmarks pass their variants here."""
    runtime.RUN_DIR.mkdir(parents=True, exist_ok=True)
    yaml_path = runtime.RUN_DIR / ("lmcache-blend.yaml" if name == "blend" else f"lmcache-{name}.yaml")
    yaml_path.write_text(lmcache_yaml(ratio, check_layer, chunk_size, cpu_cache_gb, remote_url))
    label = f"ratio {ratio}, check layer {check_layer}, {settings.path} path"  # runtime.blend_settings'
    extra = {"LMCACHE_CONFIG_FILE": str(yaml_path), **settings.to_env(), runtime.LABEL_ENV: label,
             # the engine process's counters (the fast path's fallbacks) on the API server's /metrics
             runtime.METRICS_DIR_ENV: str(runtime.RUN_DIR / f"prometheus-{name}-{port}")}
    if name != "blend":
        rpc = Path("/tmp") / f"kvb{port}"  # short: LMCache's socket paths in it must fit in 107 bytes
        rpc.mkdir(parents=True, exist_ok=True)
        extra["VLLM_RPC_BASE_PATH"] = str(rpc)
    return Engine(name, port, "vllm", vllm_command(model, port, host, blend=True, **opts),
                  engine_env({**extra, **(env or {})}), host=host, model=model)


# ------------------------------------------------------------------ prompts
@lru_cache(maxsize=4)
def tokenizer_for(model: str):
    """The model's Hugging Face tokenizer (the one vLLM serves with --tokenizer-mode hf)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


PRIME_QUESTION = "Got it?"  # asked after each chunk to load it into the fast path's GPU store


def storing_prompts(tok, texts: list[str], system: str = DEFAULT_SYSTEM) -> list[list[int]]:
    """What precompute stores: the chat prefix, then every chunk, each segment alone from position 0
    (no prefix, no separator: one segment, which LMCache keys by its ids alone), as the embedded
    engine computes chunk KV. A chunk's KV computed after the chat prefix, as precompute stored it
    at first, blends worse: top-20 KL 0.0329 against 0.0237 at ratio 0.15 on 121 QA prompts,
    the GPU's conditions (bf16, separators, K deviation) replayed on the CPU
    (`scripts/blend_gap_study.py`; the H200 measured 0.0322 the old way)."""
    segments = [chat_segment_ids(tok, [text], None, system) for text in texts]
    return segments[:1] and [segments[0][0]] + [s[1] for s in segments]


def precompute(engine: Engine, texts: list[str], progress: bool = True, system: str = DEFAULT_SYSTEM) -> dict:
    """Store the KV of the chat prefix and of every chunk in LMCache once, each computed alone
    (`storing_prompts`), max_tokens 1.
    On the fast path a second round asks each chunk after the chat prefix, followed by a short
    question, without storing: they blend, which loads every chunk into the GPU chunk store (as far
    as it holds them), so the first question is fast too. (The question matters: asked alone, a
    wholly cached prompt is looked up without its last token, so its chunk segment no longer matches
    and only the prefix loads.)"""
    import httpx
    from tqdm.auto import tqdm

    t0, tokens = time.perf_counter(), 0
    with httpx.Client(timeout=600, headers=runtime.auth_headers()) as client:
        model = engine.model or client.get(engine.url + "/v1/models").json()["data"][0]["id"]
        tok = tokenizer_for(model)
        rounds = [("precomputing chunk KV", SAVE, storing_prompts(tok, texts, system))]
        if GpuBlendSettings.ENV in engine.env and GpuBlendSettings.from_env(engine.env).path == "fast":
            rounds.append(("loading chunk KV into GPU memory", NO_SAVE,
                           [chat_prompt_ids(tok, [text], PRIME_QUESTION, system) for text in texts]))
        for desc, extra, prompts in rounds:
            for ids in tqdm(prompts, desc=desc, unit="prompt", disable=not progress):
                try:
                    r = client.post(engine.url + "/v1/completions", json={
                        "model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, **extra})
                except httpx.HTTPError as err:
                    raise EngineError(f"The blend engine at {engine.url} did not answer ({err}); see "
                                      f"{engine.log}.") from err
                if r.status_code != 200:
                    raise EngineError(f"The blend engine refused a precompute request ({r.status_code}): "
                                      f"{r.text[:300]}. See {engine.log}.")
                if extra is SAVE:  # the storing round
                    tokens += len(ids)
    return {"tokens": tokens, "computed": len(texts), "seconds": round(time.perf_counter() - t0, 2)}


def request(engine: Engine, model: str, chunks: list[str], question: str,
            system: str = DEFAULT_SYSTEM) -> tuple[str, dict]:
    """The completions request for one RAG question, as ("completions", kwargs for the openai SDK):
    token ids of the chat conversation, since LMCache matches chunks by the separator's ids. Both
    engines get the same ids, so the side-by-side differs in blending only."""
    ids = chat_prompt_ids(tokenizer_for(model), chunks, question, system)  # identical for both engines
    # ids go in extra_body: as `prompt=ids` the SDK walks the list item by item, which
    # costs ~0.3 s at 32K tokens on both engines (measured on H200) and hides the gap
    extra = NO_SAVE if engine.name == "blend" else {}
    return "completions", {"prompt": "", "extra_body": {"prompt": ids, **extra}}
