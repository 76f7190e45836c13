"""Start, find and stop the two engines: `blend` (reuses cached chunk KV) on :8000 and `full` (plain
prefill) on :8001, on either backend.

    python -m helpers.engines start [--backend auto|embedded|vllm] [--model PATH] [--docs DIR]
    python -m helpers.engines status | stop

Each engine is a subprocess in its own process group with its log in `.engines/<name>.log` and a pid
file `.engines/<name>.json`, so a new kernel, a notebook or `launch_engines.sh stop` finds engines
another process started. Errors say what happened and what to do; a dying engine's last log lines
are shown.

Launchers take turns (an flock on `.engines/launch.lock`), so two at once never start duplicates; a
pid file is written atomically and names the process just started; an old log is kept as
`<name>.log.1`, never truncated; `stop` also finds an engine of ours by the port it listens on. An
engine that dies, freezes (SIGSTOP) or times out at start is stopped and reported; the healthy one
keeps running.

This module knows the backends by name only: each is a module with the same few functions
(`available`, `engines`, `precompute`, `request`), imported when an engine of that backend is used.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from types import ModuleType

from . import runtime
from .runtime import (
    PORTS,
    ROOT,
    Engine,
    EngineError,
    alive,
    health,
    launcher_lock,
    log_tail,
    our_engine_on,
    port_in_use,
    port_owner,
    read_pidfile,
    stopped_state,
    write_atomic,
)
from .settings import BLEND

# name -> module; `auto` takes the first one available, so the GPU backend comes first
BACKENDS = {"vllm": "helpers.gpu.launch", "embedded": "helpers.embedded.launch"}


def backend(name: str) -> ModuleType:
    """The backend module called `name`. An engine we did not start and that does not say which it is
    ("unknown") gets plain OpenAI chat requests: the embedded backend's."""
    if name == "unknown":
        name = "embedded"
    if name not in BACKENDS:
        raise EngineError(f"Unknown backend {name!r}: use auto, {' or '.join(BACKENDS)}.")
    return importlib.import_module(BACKENDS[name])


def pick_backend(name: str = "auto") -> str:
    """`auto` is the GPU backend when two GPUs and vLLM are present, else the embedded one."""
    if name == "auto":
        return next(n for n in BACKENDS if backend(n).available())
    backend(name)  # raises for an unknown name
    return name


def engines_for(name: str, model: str | None, blend_port: int, full_port: int, **kw) -> list[Engine]:
    """The blend and full engines of backend `name` (not started); the backend checks its own needs."""
    return backend(name).engines(model, blend_port, full_port, **kw)


# ------------------------------------------------------------------ start / stop / status
def launch(e: Engine) -> Engine:
    """Start one engine in the background (own process group), unless ours already serves there.
    `start` calls it under the launcher lock, so nothing else starts an engine meanwhile."""
    runtime.RUN_DIR.mkdir(parents=True, exist_ok=True)
    old = read_pidfile(e.name)
    if old and alive(old.pid):
        if old.port == e.port and old.backend == e.backend and old.cmd == e.cmd:  # same settings
            return old  # already running: reuse it
        stop_engine(old)
    if port_in_use(e.port, e.host):
        ours = our_engine_on(e.port)
        fix = ("It is one of our engines without a pid file: run `./launch_engines.sh stop` (it finds "
               "it by its port)" if ours else "Stop that process (or run `./launch_engines.sh stop`)")
        raise EngineError(
            f"Port {e.port} is busy: {port_owner(e.port)} holds it, so the {e.name} engine cannot "
            f"start. {fix}, or choose another port with --{e.name}-port."
        )
    if e.log.exists():  # keep the last run's log; a rename never truncates a file still written to
        os.replace(e.log, e.log.with_name(e.log.name + ".1"))
    env = {**os.environ, **e.env}
    with open(e.log, "w") as log:
        proc = subprocess.Popen(e.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=ROOT, start_new_session=True)
    e.pid = proc.pid
    record = {**asdict(e), "env": {k: v for k, v in e.env.items() if "KEY" not in k}}  # no secrets
    write_atomic(e.pidfile, json.dumps(record))
    return e


def startup_problem(e: Engine) -> str | None:
    """Why `e` will never become healthy, when that is already clear (rather than at the timeout)."""
    if not alive(e.pid):
        return "exited during start-up"
    state = stopped_state(e.pid)
    if state:
        return f"is {state} (pid {e.pid}: SIGSTOP or a debugger?) and makes no progress"
    return None


def give_up(failed: list[Engine], engines: list[Engine], why: str) -> EngineError:
    """Stop the engines that failed, keep the healthy ones, and say so with the first one's log."""
    for e in failed:
        stop_engine(e)
    kept = [e.name for e in engines if e not in failed and alive(e.pid)]
    e = failed[0]
    return EngineError(
        f"The {' and '.join(f.name for f in failed)} engine {why}; stopped it"
        + (f" (the {' and '.join(kept)} engine keeps running)" if kept else "")
        + f". Last lines of {e.log}:\n{log_tail(e)}\nFix the cause above and start again."
    )


def wait_healthy(engines: list[Engine], timeout: float = 300, progress: bool = True) -> None:
    """Block until every engine answers /health. One that dies, freezes or is not ready in `timeout`
    seconds is stopped and reported with its log tail; the healthy ones keep running."""
    t0 = time.time()
    pending = list(engines)
    bar = _progress(progress, len(engines))
    while pending:
        for e in list(pending):
            problem = startup_problem(e)
            if problem:
                if bar:
                    bar.close()
                raise give_up([e], engines, problem)
            if health(e):
                pending.remove(e)
                if bar:
                    bar.update(1)
                    bar.set_postfix_str(f"{e.name} ready on :{e.port}")
        if pending and time.time() - t0 > timeout:
            if bar:
                bar.close()
            raise give_up(pending, engines, f"was not ready after {timeout:.0f} s")
        if pending:
            if bar:
                bar.set_description(f"starting engines ({time.time() - t0:.0f} s)")
            time.sleep(0.5)
    if bar:
        bar.close()


def start_all(engines: list[Engine], timeout: float = 600) -> dict[str, str]:
    """Start many engines at once (comparisons on one GPU, `scripts/gpu_*.py`) and wait for them.
    vLLM's start-up memory profiling can fail when several start together: those are retried one
    at a time. Returns {name: error} of the engines that still did not start (the rest run)."""
    t0, failed = time.time(), {}
    for e in engines:
        launch(e)
    retry = []
    for e in engines:
        try:
            wait_healthy([e], max(30.0, timeout - (time.time() - t0)), progress=False)
        except EngineError:
            retry.append(e)
    for e in retry:
        try:
            launch(e)
            wait_healthy([e], 300, progress=False)
        except EngineError as err:
            failed[e.name] = str(err)[-2000:]
    return failed


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="starting engines", unit="engine")


def start(backend: str = "auto", model: str | None = None, blend_port: int = PORTS["blend"],
          full_port: int = PORTS["full"], timeout: float = 300, progress: bool = True, **kw) -> list[Engine]:
    """Start (or find running) blend and full engines and wait until both are healthy. One launcher
    at a time; a launch that fails or is interrupted before both run stops what it started (a
    healthy engine stays when only the other one fails to come up)."""
    with launcher_lock(timeout):
        started = []
        try:
            engines = []
            for e in engines_for(pick_backend(backend), model, blend_port, full_port, **kw):
                engines.append(launch(e))
                if engines[-1] is e:
                    started.append(e)
        except (EngineError, KeyboardInterrupt):
            for e in started:
                stop_engine(e)
            raise
        try:
            wait_healthy(engines, timeout, progress)
        except KeyboardInterrupt:
            for e in started:
                stop_engine(e)
            raise
    return engines


def signal_engine(pid: int, sig: int) -> None:
    """Signal the engine's process group (ours lead one), or the process alone if it leads none."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_engine(e: Engine, grace: float = 10.0) -> None:
    """TERM the engine's process group, KILL it after `grace` seconds, remove its pid file."""
    if e.pid and alive(e.pid):
        signal_engine(e.pid, signal.SIGTERM)
        signal_engine(e.pid, signal.SIGCONT)  # a stopped (SIGSTOP) engine must run to see the TERM
        deadline = time.time() + grace
        while alive(e.pid) and time.time() < deadline:
            time.sleep(0.1)
        if alive(e.pid):
            signal_engine(e.pid, signal.SIGKILL)
        try:  # reap it if it was our child
            os.waitpid(e.pid, os.WNOHANG)
        except ChildProcessError:
            pass
    e.pidfile.unlink(missing_ok=True)


def stop(names=("blend", "full"), ports: dict | None = None) -> list[str]:
    """Stop our engines: the ones the pid files name, and any of ours still listening on their
    ports or on `ports` ({name: port}), e.g. one whose pid file was lost."""
    stopped = []
    with launcher_lock():
        for name in names:
            e = read_pidfile(name)
            if e:
                stop_engine(e)
                stopped.append(f"{name} (pid {e.pid}, :{e.port})")
            for port in {p for p in (e and e.port, (ports or {}).get(name)) if p}:
                pid = our_engine_on(port)
                if pid:
                    stop_engine(Engine(name, port, "unknown", pid=pid))
                    stopped.append(f"{name} (pid {pid}, :{port}, found by its port)")
    return stopped


def status() -> dict:
    out = {}
    for name in ("blend", "full"):
        e = read_pidfile(name)
        if e is None:
            out[name] = {"running": False}
        else:
            h = health(e) if alive(e.pid) else None
            out[name] = {"running": alive(e.pid), "healthy": bool(h), "url": e.url, "pid": e.pid,
                         "backend": e.backend, "log": str(e.log), **({"health": h} if h else {})}
    return out


def find(name: str, port: int | None = None) -> Engine:
    """The engine `name` on `port` (default: wherever ours runs, else its default port): ours, from
    its pid file, while it runs; otherwise one someone else started, its backend told by its /health
    ("unknown" when nothing answers there)."""
    e = read_pidfile(name)
    if e and alive(e.pid) and port in (None, e.port):
        return e
    e = Engine(name, port or PORTS[name], "unknown")
    h = health(e)
    if h is not None:  # our embedded server names its backend; vLLM's /health has no body
        e.backend = h.get("backend", "vllm")
    return e


def precompute(e: Engine, texts: list[str], progress: bool = True) -> dict:
    """Compute the KV of every chunk on the blend engine once, so later prompts hit the cache."""
    return backend(e.backend).precompute(e, texts, progress=progress)


def warm(e: Engine, texts: list[str]) -> None:
    """Precompute the chunks' KV; a failure leaves the (healthy) engines running and says so."""
    try:
        res = precompute(e, texts)
    except EngineError as err:
        raise EngineError(f"{err}\nThe engines are running but the chunk KV cache is not warm: run "
                          "`./launch_engines.sh` again to retry, or `./launch_engines.sh stop`.") from err
    print(f"chunk KV ready: {res['tokens']} tokens, {res['computed']} chunks computed now")


def load_library(docs: str | None):
    """The chunks to precompute: ffmpeg/ plus the documents in `docs`, with skipped files as notes.
    Raises DocumentsError for a folder that gives no chunks."""
    import warnings

    from . import library
    from .documents import DocumentsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DocumentsWarning)
        lib = library.load(docs)
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch_engines.sh", description="Start/stop the two engines.")
    ap.add_argument("action", nargs="?", default="start", choices=["start", "stop", "status"])
    ap.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2 on CPU, Mistral-7B on GPU)")
    ap.add_argument("--blend-port", type=int, default=PORTS["blend"])
    ap.add_argument("--full-port", type=int, default=PORTS["full"])
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--no-precompute", action="store_true", help="skip warming the chunk KV cache")
    ap.add_argument("--docs", metavar="DIR", default=None,
                    help="also serve your own .txt/.md files in DIR: chunked, precomputed on the blend "
                         "engine, offered in the notebooks' picker and retriever next to ffmpeg/")
    ap.add_argument("--load-format", default=None, help="vLLM only: 'dummy' for random weights")
    ap.add_argument("--blend-path", default=None,  # checked by the vLLM backend (helpers/gpu/launch.py)
                    help="vLLM only: 'fast' (default: our one-pass blender, chunks kept in GPU memory), "
                         "'fixed' (LMCache's blender, mended) or 'upstream' (LMCache's, as shipped)")
    ap.add_argument("--gpu-kv-store-gb", type=float, default=None,
                    help="vLLM fast path only: GPU memory for chunk KV, taken from the blend engine's "
                         "--gpu-memory-utilization share (default 4)")
    ap.add_argument("--ratio", type=float, default=BLEND.ratio,
                    help=f"share of cached tokens the blend engine recomputes (default {BLEND.ratio})")
    ap.add_argument("--check-layer", type=int, default=BLEND.check_layer,
                    help=f"layer where tokens are selected; layers below it are recomputed for all tokens "
                         f"(default {BLEND.check_layer})")
    ap.add_argument("--no-disk-cache", action="store_true",
                    help="embedded only: keep chunk KV in memory only (default: also in .cache/chunk-kv)")
    args = ap.parse_args(argv)
    if args.action == "stop":
        from .library import record_docs

        record_docs(None)
        stopped = stop(ports={"blend": args.blend_port, "full": args.full_port})
        print("stopped: " + ", ".join(stopped) if stopped else "no engines were running")
        return 0
    if args.action == "status":
        st = status()
        print(json.dumps(st, indent=2))
        return 0 if all(s.get("healthy") for s in st.values()) else 1
    if not 0 < args.ratio <= 1 or args.check_layer < 0:
        print("error: --ratio must be in (0, 1] and --check-layer >= 0", file=sys.stderr)
        return 2
    from .documents import DocumentsError
    from .library import record_docs

    try:  # a bad folder stops here, before any engine is touched
        lib = load_library(args.docs)
    except DocumentsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kw = {"ratio": args.ratio, "check_layer": args.check_layer}
    for opt in ("load_format", "blend_path", "gpu_kv_store_gb"):  # vLLM's: passed only when given
        if getattr(args, opt) is not None:
            kw[opt] = getattr(args, opt)
    if args.no_disk_cache:
        kw["kv_dir"] = None
    try:
        engines = start(args.backend, args.model, args.blend_port, args.full_port, args.timeout, **kw)
        record_docs(lib.docs)
        if args.docs:
            print(f"your documents: {len(lib.doc_names())} chunks from {lib.docs}")
        if not args.no_precompute:
            warm(engines[0], list(lib.texts.values()))
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: engines this launch started were stopped", file=sys.stderr)
        return 130
    for e in engines:
        print(f"{e.name:5s} engine ({e.backend}): {e.url}/v1   log: {e.log}")
    settings = (runtime.blend_settings(engines[0]) if engines else "") or \
        f"ratio {args.ratio}, check layer {args.check_layer}"
    print(f"blend settings: {settings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
