"""Small things every notebook does: find the two engines (or start them), and write the results
file that `tests/test_notebooks.py` reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import engines as eng


def connect(backend: str = "auto", blend_port: int = eng.BLEND_PORT, full_port: int = eng.FULL_PORT,
            start: bool = True, timeout: float = 600) -> tuple[eng.Engine, eng.Engine]:
    """The blend and full engines: the ones already answering on these ports (`make lab` and
    `./launch_engines.sh` start them), else started now in the background when `start` is set."""
    found = [_running(name, port) for name, port in (("blend", blend_port), ("full", full_port))]
    if all(found):
        for e in found:
            print(f"connected: {e.name:5s} engine ({e.backend}) at {e.url}/v1")
        return tuple(found)
    missing = [n for n, e in zip(("blend", "full"), found, strict=True) if e is None]
    if not start:
        raise eng.EngineError(
            f"No {' and no '.join(missing)} engine answers on :{blend_port} / :{full_port}. Start both "
            "with `./launch_engines.sh` (or `make lab`), or set START_ENGINES = True in the parameters.")
    print(f"starting the engines ({', '.join(missing)} not running); the first start takes a minute")
    engines = eng.start(backend, blend_port=blend_port, full_port=full_port, timeout=timeout)
    for e in engines:
        print(f"started:   {e.name:5s} engine ({e.backend}) at {e.url}/v1, log {e.log}")
    return tuple(engines)


def _running(name: str, port: int) -> eng.Engine | None:
    """The engine answering on `port`, with its backend from its pid file or its /health."""
    e = eng.read_pidfile(name)
    if not (e and e.port == port and eng.alive(e.pid)):
        e = eng.Engine(name, port, "unknown")
    h = eng.health(e)
    if h is None:
        return None
    if h.get("mode") not in (None, name):
        raise eng.EngineError(f"The engine on :{port} runs in '{h['mode']}' mode, but the {name} engine "
                              "belongs there: swap the ports, or restart with `./launch_engines.sh`.")
    if e.backend == "unknown":  # only the embedded server reports its mode
        e.backend = "embedded" if "mode" in h else "vllm"
    return e


def save_results(path: str | Path, results: dict) -> Path:
    """Write `results` as JSON (NaN and inf as null), for tests and for comparing runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(results), indent=2, default=str) + "\n")
    return path


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x
