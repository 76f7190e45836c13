"""The embedded backend's launch side: two `helpers.embedded.server` processes on this machine's CPU,
`blend` (reuses cached chunk KV) and `full` (plain prefill), started by `helpers.engines`. Same shape
as `helpers/gpu/launch.py`: `available`, `engines`, `precompute`, `request`.

Imports no torch: the launcher and the notebooks' clients use it without loading a model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from ..prompts import DEFAULT_SYSTEM, build_messages
from ..runtime import HOST, ROOT, Engine, EngineError, auth_headers, cache_dir
from ..settings import BLEND

DEFAULT = "default"  # kv_dir's default: chunk-kv/ in the cache folder (KVBLEND_CACHE, else .cache/)


def available() -> bool:
    """Always: the CPU is enough (`--backend auto` falls back to it)."""
    return True


def engines(model: str | None, blend_port: int, full_port: int, host: str = HOST,
            ratio: float = BLEND.ratio, check_layer: int = BLEND.check_layer,
            kv_dir: str | Path | None = DEFAULT, kv_store: str | None = None, **vllm_only) -> list[Engine]:
    """The two embedded servers (not started). The blend engine keeps chunk KV in `kv_dir` too (about
    46 KB per token for SmolLM2, 1.8 GB for the whole corpus), so a restarted engine starts warm:
    computing every chunk's KV costs minutes on 2 cores, loading it back seconds. None keeps it in
    memory only. `kv_store` (redis://HOST:PORT): a Redis the blend engine shares chunk KV through,
    behind its memory and disk tiers."""
    if vllm_only:
        flags = ", ".join("--" + k.replace("_", "-") for k in vllm_only)
        raise EngineError(f"{flags}: options of the vllm backend; the embedded engines do not take them.")
    if kv_dir == DEFAULT:
        kv_dir = cache_dir() / "chunk-kv"

    def cmd(mode: str, port: int) -> list[str]:
        c = [sys.executable, "-m", "helpers.embedded.server", "--mode", mode, "--host", host,
             "--port", str(port), "--ratio", str(ratio), "--check-layer", str(check_layer)]
        if mode == "blend" and kv_dir:
            c += ["--cache-dir", str(kv_dir)]
        if mode == "blend" and kv_store:
            c += ["--kv-store", kv_store]
        return c + (["--model", model] if model else [])

    # Two engines share 2 cores; each gets them all (only one runs at a time in a fair comparison).
    env = {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return [Engine("blend", blend_port, "embedded", cmd("blend", blend_port), env, host=host, model=model),
            Engine("full", full_port, "embedded", cmd("full", full_port), env, host=host, model=model)]


def precompute(engine: Engine, texts: list[str], progress: bool = True) -> dict:
    """Compute the KV of every chunk on the blend engine once, so later prompts hit the cache.
    Raises EngineError (never a raw httpx error) when the engine fails or refuses."""
    from tqdm.auto import tqdm

    done = {"tokens": 0, "computed": 0}
    try:
        with httpx.Client(timeout=600, headers=auth_headers()) as client:
            for text in tqdm(texts, desc="precomputing chunk KV", unit="chunk", disable=not progress):
                res = answer(engine, client.post(engine.url + "/v1/kv/precompute", json={"texts": [text]}))
                done["tokens"] += res["results"][0]["tokens"]
                done["computed"] += not res["results"][0]["cached"]
            # The chat template's prefix (system prompt, user header) is a segment of its own too:
            # one tiny request caches it, so the first real question pays for no segment at all.
            model = answer(engine, client.get(engine.url + "/v1/models"))["data"][0]["id"]
            answer(engine, client.post(engine.url + "/v1/chat/completions", json={
                "model": model, "messages": build_messages([], "Hello"), "max_tokens": 1}))
            done["stats"] = answer(engine, client.get(engine.url + "/v1/kv/stats"))
    except httpx.HTTPError as err:
        raise EngineError(f"The {engine.name} engine at {engine.url} did not answer ({type(err).__name__}: "
                          f"{err}); see {engine.log}.") from err
    return done


def answer(engine: Engine, r: httpx.Response) -> dict:
    """The JSON of a 200 answer; anything else as an EngineError with the engine's own message."""
    if r.status_code == 200:
        return r.json()
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text[:300]
    raise EngineError(f"The {engine.name} engine refused {r.request.method} {r.request.url.path} "
                      f"({r.status_code}): {message} See {engine.log}.")


def request(engine: Engine, model: str, chunks: list[str], question: str,
            system: str = DEFAULT_SYSTEM) -> tuple[str, dict]:
    """The chat request for one RAG question, as ("chat", kwargs for the openai SDK): plain OpenAI
    chat messages with SEP in the text; the server cuts them into segments."""
    return "chat", {"messages": build_messages(chunks, question, system)}
