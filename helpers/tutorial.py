"""Small things every notebook does: find the two engines (or start them), and show the results the
tests read from the executed notebook."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import engines as eng
from . import library
from .runtime import PORTS, Engine, EngineError, auth_headers, blend_settings, health


def connect(backend: str = "auto", blend_port: int = PORTS["blend"], full_port: int = PORTS["full"],
            start: bool = True, timeout: float = 600,
            docs: str | Path | None = None) -> tuple[Engine, Engine]:
    """The blend and full engines: the ones already answering on these ports (`make lab` and
    `./launch_engines.sh` start them), else started now in the background when `start` is set.

    With `docs`, a folder of your own .txt/.md files, their chunks' KV is precomputed on the blend
    engine, and pickers made after this offer them next to ffmpeg/ (`library.current()`). A folder
    that gives no chunks raises `DocumentsError` before any engine is touched."""
    lib = library.load(docs) if docs is not None else None
    if lib is not None:
        library.check_docs(lib.docs)  # running engines that hold another folder: refused
    engines = _find_or_start(backend, blend_port, full_port, start, timeout)
    if lib is not None:
        mine = lib.doc_names()
        print(f"your documents: {len(mine)} chunks from {lib.docs}")
        eng.precompute(engines[0], [lib.texts[n] for n in mine])
        library.record_docs(lib.docs)
    return engines


def _find_or_start(backend: str, blend_port: int, full_port: int, start: bool,
                   timeout: float) -> tuple[Engine, Engine]:
    found = [_answering(name, port) for name, port in (("blend", blend_port), ("full", full_port))]
    if all(found):
        for e in found:
            print(f"connected: {e.name:5s} engine ({e.backend}) at {e.url}/v1")
        return tuple(found)
    missing = [n for n, e in zip(("blend", "full"), found, strict=True) if e is None]
    if not start:
        raise EngineError(
            f"No {' and no '.join(missing)} engine answers on :{blend_port} / :{full_port}. Start both "
            "with `./launch_engines.sh` (or `make lab`), or set START_ENGINES = True in the parameters.")
    print(f"starting the engines ({', '.join(missing)} not running); the first start takes a minute")
    engines = eng.start(backend, blend_port=blend_port, full_port=full_port, timeout=timeout)
    for e in engines:
        print(f"started:   {e.name:5s} engine ({e.backend}) at {e.url}/v1, log {e.log}")
    return tuple(engines)


def _answering(name: str, port: int) -> Engine | None:
    """The engine `name` if one answers on `port` in the right mode, else None."""
    e = eng.find(name, port)
    h = health(e)
    if h is None:
        return None
    if h.get("mode") not in (None, name):
        raise EngineError(f"The engine on :{port} runs in '{h['mode']}' mode, but the {name} engine "
                          "belongs there: swap the ports, or restart with `./launch_engines.sh`.")
    return e


# The sample question's context per backend. On the CPU engine blending wins at any length; on
# the GPU, for a 7B model, the default fast path wins past about 1.9K tokens and LMCache's own
# blender past about 5.6K (H200, docs/benchmarks/gpu_ttft.csv, read in docs/gpu.md), so the GPU
# engines get a context well past both crossovers where the model's context allows it.
SAMPLE_CHUNKS = ["encoder_flac", "protocol_rtmp", "filter_crop"]
CONTEXT_TOKENS = {"embedded": 2_000, "vllm": 14_000}


def default_chunks(engine: Engine, question_room: int = 512) -> list[str]:
    """The sample chunks, topped up with other corpus chunks to the backend's default context
    (`CONTEXT_TOKENS`), never past the model's context length minus `question_room`."""
    from . import corpus

    target = CONTEXT_TOKENS.get(engine.backend, CONTEXT_TOKENS["embedded"])
    limit = _context_length(engine)
    if limit:
        target = min(target, limit - question_room)
    tokens = {m["name"]: m["tokens"] for m in corpus.load_manifest()}
    have = sum(tokens[n] for n in SAMPLE_CHUNKS)
    if target - have < 300:
        return list(SAMPLE_CHUNKS)
    more = [n for n in corpus.pick_chunks(target - have, seed=0, exclude=SAMPLE_CHUNKS)
            if tokens[n] + have <= target]
    picked = [*SAMPLE_CHUNKS]
    for n in more:
        if have + tokens[n] <= target:
            picked.append(n)
            have += tokens[n]
    return picked


def _context_length(engine: Engine) -> int | None:
    """The served model's context length, from /v1/models (both backends report max_model_len)."""
    import httpx

    try:
        r = httpx.get(engine.url + "/v1/models", timeout=5, headers=auth_headers())
        return int(r.json()["data"][0]["max_model_len"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


def describe(engine: Engine) -> str:
    """Which backend and model answer, and the blend settings, in one line."""
    h = health(engine) or {}
    model = h.get("model") or engine.model or "?"
    settings = blend_settings(engine)
    line = f"{engine.name} engine: {engine.backend} backend, model {model}"
    return f"{line}, {settings}" if settings else line


def report(results: dict):
    """`results` as a JSON output of the cell (NaN and inf as null): the last cell of each notebook
    shows it, and tests/test_notebooks.py reads it from the executed notebook."""
    from IPython.display import JSON

    return JSON(json.loads(json.dumps(_clean(results), default=str)), expanded=True)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x
