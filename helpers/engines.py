"""Start, find and stop the two engines: `blend` (reuses cached chunk KV) on :8000 and `full` (plain
prefill) on :8001, on either backend.

    start(backend, model, blend_port, full_port, ...), stop(), status(), find(name, port)

(`launch_engines.sh`'s command line is `helpers/launcher.py`.)

Each engine is a subprocess in its own process group with its log in `.engines/<name>.log` and a pid
file `.engines/<name>.json`, so a new kernel, a notebook or `launch_engines.sh stop` finds engines
another process started. Errors say what happened and what to do; a dying engine's last log lines
are shown.

Launchers take turns (an flock on `.engines/launch.lock`), so two at once never start duplicates; a
pid file is written atomically and records the process's start time, command line, run dir and
checkout, and start, stop and status act only on a process that still matches it (`runtime.owns`):
a stale pid file never leads to a stranger being signalled. An old log is kept as `<name>.log.1`,
never truncated; `stop` also finds an engine of this checkout and run dir by the port it listens on,
and leaves another's alone. An
engine that dies, freezes (SIGSTOP) or times out at start is stopped and reported; the healthy one
keeps running.

This module knows the backends by name only: each is a module with the same few functions
(`available`, `engines`, `precompute`, `request`), imported when an engine of that backend is used.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from types import ModuleType

from . import runtime, scale
from .runtime import (
    PORTS,
    ROOT,
    Engine,
    EngineError,
    alive,
    health,
    launcher_lock,
    log_tail,
    owns,
    port_in_use,
    port_owner,
    read_pidfile,
    stopped_state,
    write_atomic,
)

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
    """Start one engine in the background (own process group), unless ours already serves there with
    the same settings (port, backend, command line and API key). `start` calls it under the launcher
    lock, so nothing else starts an engine meanwhile."""
    runtime.RUN_DIR.mkdir(parents=True, exist_ok=True)
    e.key = runtime.key_tag(runtime.api_key())
    old = read_pidfile(e.name)
    if old and owns(old):
        if (old.port, old.backend, old.cmd, old.key) == (e.port, e.backend, e.cmd, e.key):
            return old  # already running with these settings: reuse it
        stop_engine(old)  # other settings (or another API key): restart it
    elif old:  # a stale pid file: its process is gone or is some other program now; never signal it
        old.pidfile.unlink(missing_ok=True)
    if port_in_use(e.port, e.host):
        what = "Redis" if e.role == "redis" else "engine"
        raise EngineError(f"Port {e.port} is busy: {port_owner(e.port)} holds it, so the {e.name} {what} "
                          f"cannot start. {runtime.busy_port_fix(e.port)}, or {runtime.another_port(e)}.")
    if e.log.exists():  # keep the last run's log; a rename never truncates a file still written to
        os.replace(e.log, e.log.with_name(e.log.name + ".1"))
    e.run_dir, e.checkout = str(runtime.RUN_DIR), str(ROOT)
    fresh_metrics_dir(e)
    env = {**os.environ, **e.env, "KVBLEND_RUN_DIR": e.run_dir}  # marks the process as this run dir's
    with open(e.log, "w") as log:
        proc = subprocess.Popen(e.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=ROOT, start_new_session=True)
    e.pid = proc.pid
    info = runtime.process_info(proc.pid)
    e.started = info["started"] if info else None
    record = {**asdict(e), "env": {k: v for k, v in e.env.items() if "KEY" not in k}}  # no secrets
    try:
        write_atomic(e.pidfile, json.dumps(record))
    except EngineError:
        proc.kill()  # an engine nobody could find again must not outlive this launch
        proc.wait()
        raise
    return e


def fresh_metrics_dir(e: Engine) -> None:
    """Empty the folder of Prometheus samples that `e`'s environment names (runtime.METRICS_DIR_ENV):
    a previous run's files would add to its counters. Only a folder inside RUN_DIR is touched."""
    folder = e.env.get(runtime.METRICS_DIR_ENV)
    if not folder:
        return
    path, run_dir = (ROOT / folder).resolve(), runtime.RUN_DIR.resolve()  # relative: to the engine cwd
    if path != run_dir and path.is_relative_to(run_dir):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)


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
    kept = [e.name for e in engines if e not in failed and owns(e)]
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


def plan(backend_name: str, model: str | None, blend_port: int, full_port: int, replicas: dict | None = None,
         policy: str = scale.DEFAULT_POLICY, timeout: float = 300, **kw) -> list[Engine]:
    """The processes of one launch, not started: the blend and full fronts first (an engine, or a
    router in front of its replicas when `replicas[name]` > 1), then the replicas."""
    fronts = engines_for(backend_name, model, blend_port, full_port, **kw)
    out, reps = [], []
    for k, front in enumerate(fronts):
        n = (replicas or {}).get(front.name, 1)
        if n <= 1:
            out.append(front)
            continue
        workers = []
        for i in range(1, n + 1):
            p = scale.replica_port(front.port, i)
            ports = (p, full_port) if front.name == "blend" else (blend_port, p)
            workers.append(scale.as_replica(engines_for(backend_name, model, *ports, **kw)[k], i))
        out.append(scale.router_engine(front, workers, policy, timeout))
        reps += workers
    taken = [e.port for e in out + reps] + [scale.metrics_port(e.port) for e in out if e.role == "router"]
    if len(set(taken)) < len(taken):
        raise EngineError(f"The engines' ports collide ({sorted(taken)}): choose --blend-port and "
                          "--full-port further apart (replicas take the front port + 100, + 110, ...; "
                          "a router's metrics, + 90).")
    return out + reps


def start(backend: str = "auto", model: str | None = None, blend_port: int = PORTS["blend"],
          full_port: int = PORTS["full"], timeout: float = 300, progress: bool = True,
          docs: str | None = None, kv_store: str | None = None, replicas: dict | None = None,
          policy: str = scale.DEFAULT_POLICY, **kw) -> list[Engine]:
    """Start (or find running) blend and full engines and wait until both are healthy. One launcher
    at a time; a launch that fails or is interrupted before both run stops what it started (a
    healthy engine stays when only the other one fails to come up).

    `docs`: the documents folder this launch serves (resolved), recorded for the notebooks. Running
    engines that hold another folder are refused, so a notebook never offers the wrong chunks.
    `kv_store`: "redis" starts a local Redis (managed like the engines) that the blend engines share
    chunk KV through; "redis://HOST:PORT" uses that one. `replicas` ({"blend": N, "full": M}): N
    engines behind vllm-router on the engine's port (`helpers/scale.py`). Returns the fronts first
    (blend, full), then replicas, then the managed Redis."""
    from .library import check_docs, record_docs, recorded_docs

    with launcher_lock(timeout):
        check_docs(docs)
        started, engines = [], []
        try:
            extra = [scale.redis_engine()] if kv_store == "redis" else []
            if extra:
                kv_store = extra[0].url
            todo = plan(pick_backend(backend), model, blend_port, full_port, replicas, policy, timeout,
                        **({"kv_store": kv_store} if kv_store else {}), **kw)
            stop_others({e.name for e in todo + extra})
            for e in extra + todo[2:] + todo[:2]:  # Redis, replicas, then what listens on :8000/:8001
                engines.append(launch(e))
                if engines[-1] is e:
                    started.append(e)
                if e.role == "redis":
                    wait_healthy([e], 30, progress=False)
        except (EngineError, KeyboardInterrupt):
            for e in reversed(started):
                stop_engine(e)
            raise
        try:
            wait_healthy(engines, timeout, progress)
        except KeyboardInterrupt:
            for e in reversed(started):
                stop_engine(e)
            raise
        fronts = [e for e in engines if e.name in ("blend", "full")]
        if docs or fronts[0] in started:  # a fresh blend engine holds only what this launch gives it
            record_docs(docs)
        elif recorded_docs():
            print(f"note: the running engines also hold the documents of {recorded_docs()}",
                  file=sys.stderr)
    return fronts + [e for e in engines if e not in fronts and e.role != "redis"] + \
        [e for e in engines if e.role == "redis"]


def stop_others(keep: set[str]) -> None:
    """Stop the replicas, routers and Redis of an earlier launch that this one does not plan."""
    for name in scale.managed_names():
        old = read_pidfile(name)
        if name not in keep and old is not None:
            stop_engine(old)


def signal_engine(pid: int, sig: int) -> None:
    """Signal the process group our launcher created for the engine (it leads it), or the process
    alone if it leads none (a group we did not create is never signalled)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_engine(e: Engine, grace: float = 10.0) -> None:
    """TERM the engine's process group, KILL it after `grace` seconds, remove its pid file. Only an
    engine `owns` recognizes is signalled: a pid that now names another process is left alone."""
    if owns(e):
        signal_engine(e.pid, signal.SIGTERM)
        signal_engine(e.pid, signal.SIGCONT)  # a stopped (SIGSTOP) engine must run to see the TERM
        deadline = time.time() + grace
        while runtime.same_process(e) and time.time() < deadline:  # exiting: its command line is gone
            time.sleep(0.1)
        if runtime.same_process(e):
            signal_engine(e.pid, signal.SIGKILL)
        try:  # reap it if it was our child
            os.waitpid(e.pid, os.WNOHANG)
        except ChildProcessError:
            pass
    e.pidfile.unlink(missing_ok=True)


def stop(names=None, ports: dict | None = None) -> list[str]:
    """Stop our engines (routers, replicas and the managed Redis too): the ones the pid files name,
    and any of this checkout and run dir still listening on their ports or on `ports` ({name:
    port}), e.g. one whose pid file was lost. An engine of another checkout or run dir on those
    ports is named, never stopped."""
    stopped = []
    with launcher_lock():
        for name in names or scale.managed_names():
            e = read_pidfile(name)
            if e:
                if owns(e):
                    stopped.append(f"{name} (pid {e.pid}, :{e.port})")
                else:
                    print(f"note: removed a stale pid file for the {name} engine (pid {e.pid} is not our "
                          "engine any more; left alone)", file=sys.stderr)
                stop_engine(e)
            for port in {p for p in (e and e.port, (ports or {}).get(name)) if p}:
                found = runtime.engine_on(port)
                if found and runtime.ours_here(found[1]):
                    pid, info = found
                    stop_engine(Engine(name, port, "unknown", info["cmd"], pid=pid, started=info["started"],
                                       run_dir=str(runtime.RUN_DIR)))
                    stopped.append(f"{name} (pid {pid}, :{port}, found by its port)")
                elif found:
                    print(f"note: left alone: the engine on :{port} (pid {found[0]}) is not this checkout's "
                          f"({runtime.owner(found[1])})", file=sys.stderr)
    return stopped


def status() -> dict:
    """{name: state} of the blend and full engines (always named) and of every replica, router and
    managed Redis this run dir holds a pid file for."""
    out = {}
    for name in scale.managed_names():
        e = read_pidfile(name)
        if e is None or not owns(e):
            if e or name in ("blend", "full"):
                out[name] = {"running": False, **({"stale_pid_file": str(e.pidfile)} if e else {})}
        else:
            h = health(e)
            out[name] = {"running": True, "healthy": bool(h), "role": e.role, "url": e.url, "pid": e.pid,
                         "backend": e.backend, "log": str(e.log), **({"health": h} if h else {})}
    return out


def find(name: str, port: int | None = None) -> Engine:
    """The engine `name` on `port` (default: wherever ours runs, else its default port): ours, from
    its pid file, while it runs; otherwise one someone else started, its backend told by its /health
    ("unknown" when nothing answers there)."""
    e = read_pidfile(name)
    if e and owns(e) and port in (None, e.port):
        return e
    e = Engine(name, port or PORTS[name], "unknown")
    h = health(e)
    if h is not None:  # our embedded server names its backend; vLLM's /health has no body
        e.backend = h.get("backend", "vllm")
    return e


def precompute(e: Engine, texts: list[str], progress: bool = True) -> dict:
    """Compute the KV of every chunk on the blend engine once, so later prompts hit the cache."""
    return backend(e.backend).precompute(e, texts, progress=progress)
