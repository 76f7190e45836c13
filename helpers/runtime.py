"""The neutral core every other module may import: where things live, the `Engine` record, the
error users see, and small process and port helpers.

It imports nothing of ours, so the launcher (`helpers.engines`) and both backends
(`helpers.embedded.launch`, `helpers.gpu.launch`) can share it without importing each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = Path(os.environ.get("KVBLEND_RUN_DIR", ROOT / ".engines")).resolve()  # pid files, logs, configs
HOST = "127.0.0.1"
PORTS = {"blend": 8000, "full": 8001}  # the two engines' default ports
ENGINE_MARKERS = ("helpers.embedded.server", "vllm serve", "vllm.entrypoints")  # our engine commands


def cache_dir() -> Path:
    """Where the converted model and chunk KV live: KVBLEND_CACHE, default `.cache/` in the checkout."""
    return Path(os.environ.get("KVBLEND_CACHE") or ROOT / ".cache").expanduser().resolve()


SHARE_GPU_ENV = "KVBLEND_SHARE_GPU"  # =1: vLLM backend, both engines on one GPU
SKIP_VERSION_ENV = "KVBLEND_SKIP_VERSION_CHECK"  # =1: try a vLLM/LMCache pair other than the tested one


def share_gpu(environ=None) -> bool:
    """KVBLEND_SHARE_GPU=1: the vLLM backend runs both engines on one GPU."""
    return (os.environ if environ is None else environ).get(SHARE_GPU_ENV, "") == "1"


def skip_version_check(environ=None) -> bool:
    """KVBLEND_SKIP_VERSION_CHECK=1: the launcher and the plugin try an untested vLLM/LMCache pair."""
    return (os.environ if environ is None else environ).get(SKIP_VERSION_ENV, "") == "1"


def api_key() -> str | None:
    """The key the engines require (KVBLEND_API_KEY), if any: clients send it as a Bearer token."""
    return os.environ.get("KVBLEND_API_KEY") or None


def auth_headers() -> dict:
    key = api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def key_tag(key: str | None) -> str | None:
    """What a pid file records of the engine's API key: a short hash, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else None


class EngineError(RuntimeError):
    """Something a user can act on: the message says what happened and what to do."""


def run_cli(ap, argv, check, run) -> int:
    """A command line's life: parse `argv` with the ArgumentParser `ap`, `check(args)` (a message for
    bad input: printed in one line, exit 2), then `run(args)` (an EngineError: one line, exit 1).
    Never a traceback for what a user can fix."""
    args = ap.parse_args(argv)
    problem = check(args)
    if problem:
        print(f"{ap.prog}: error: {problem}", file=sys.stderr)  # one line, no usage screen
        return 2
    try:
        return run(args) or 0
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `status | head`: the reader left
        return 1
    except KeyboardInterrupt:
        return 130


@dataclass
class Engine:
    """One engine process, as started (its pid file holds this record) or as found on a port."""

    name: str  # "blend" or "full"
    port: int
    backend: str  # a key of helpers.engines.BACKENDS, or "unknown" for an engine we did not start
    cmd: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    pid: int | None = None
    host: str = HOST
    model: str | None = None
    # who started it, so that no other process is ever taken for it (see `owns`):
    started: float | None = None  # the process's start time (psutil's create_time)
    run_dir: str | None = None  # the RUN_DIR its pid file lives in
    checkout: str | None = None  # the repository it was started from (ROOT)
    key: str | None = None  # key_tag() of the API key it requires, None for none
    # what it is: "engine" (blend or full, alone), "replica" (one of several behind a router),
    # "router" (vllm-router on the engine's port) or "redis" (the shared chunk KV store)
    role: str = "engine"
    title: str | None = None  # the process title the program gives itself (redis-server, vllm-router)

    @property
    def url(self) -> str:
        return f"{'redis' if self.role == 'redis' else 'http'}://{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return RUN_DIR / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return RUN_DIR / f"{self.name}.json"


def read_pidfile(name: str) -> Engine | None:
    try:
        return Engine(**json.loads((RUN_DIR / f"{name}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename: a reader sees the old file or the new one, never half. A
    failed write (a full disk, a read-only folder) leaves no temp file and raises EngineError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise unusable_run_dir(err) from err


def unusable_run_dir(err: OSError) -> EngineError:
    return EngineError(f"Cannot write to the run folder {RUN_DIR} ({err.strerror or err}). Free some space "
                       "or make it writable, or set KVBLEND_RUN_DIR to a writable folder.")


@contextlib.contextmanager
def launcher_lock(timeout: float = 600, notify=print):
    """One launcher (start or stop) at a time across processes: an flock on .engines/launch.lock.
    A second launcher waits for the first, then finds its engines running instead of racing it."""
    try:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        f = open(RUN_DIR / "launch.lock", "a+")  # noqa: SIM115 - closed by the `with` below
    except OSError as err:
        raise unusable_run_dir(err) from err
    with f:
        deadline, told = time.time() + timeout, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    f.seek(0)
                    notify(f"waiting for another launcher ({f.read().strip() or 'pid unknown'}) to finish")
                    told = True
                if time.time() > deadline:
                    raise EngineError(f"Another launcher held {RUN_DIR / 'launch.lock'} for {timeout:.0f} s. "
                                      "Wait for it to finish, or end it and run `./launch_engines.sh` again."
                                      ) from None
                time.sleep(0.2)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gpu_count() -> int:
    """NVIDIA GPUs on this machine, as nvidia-smi lists them (0 without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


# ------------------------------------------------------------------ processes and ports
def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_owner(port: int) -> str:
    """A description of the process listening on `port`, as far as we can tell."""
    try:
        import psutil

        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                p = psutil.Process(c.pid)
                return f"pid {c.pid} ({' '.join(p.cmdline())[:120]})"
    except Exception:  # noqa: BLE001 - best effort: no permission to list other users' sockets
        pass
    return "another process"


def process_info(pid: int | None) -> dict | None:
    """What identifies a running process: its start time, command line, working folder and run dir
    (our engines carry KVBLEND_RUN_DIR in their environment). None if it is gone or a zombie."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        info = {"started": p.create_time(), "cmd": p.cmdline()}
        try:
            info["cwd"], info["run_dir"] = p.cwd(), p.environ().get("KVBLEND_RUN_DIR")
        except psutil.Error:  # another user's process: we cannot tell whose it is
            info["cwd"] = info["run_dir"] = None
        return info
    except (psutil.Error, TypeError, ValueError):
        return None


def same_process(e: Engine) -> bool:
    """e.pid still runs (not a zombie) and started when e did: a recycled pid is another process."""
    import psutil

    try:
        p = psutil.Process(e.pid)
        return p.status() != psutil.STATUS_ZOMBIE and abs(p.create_time() - e.started) <= 0.05
    except (psutil.Error, TypeError, ValueError):
        return False


def is_engine_command(cmd: list[str]) -> bool:
    line = " ".join(cmd)
    return any(m in line for m in ENGINE_MARKERS)


def owns(e: Engine) -> bool:
    """True when e.pid is still the process our launcher started for this run dir: the same start
    time (a recycled pid never matches), the same command line (or one vLLM renamed) and this run
    dir. A stranger's process, even one a stale pid file names, is never ours."""
    info = process_info(e.pid) if e.pid and e.started is not None else None
    if info is None or not same_process(e):
        return False
    same_cmd = info["cmd"] == e.cmd or is_engine_command(info["cmd"]) or "VLLM" in " ".join(info["cmd"])
    renamed = bool(e.title and info["cmd"] and info["cmd"][0].startswith(e.title))
    return (same_cmd or renamed) and e.run_dir == str(RUN_DIR)


def engine_on(port: int) -> tuple[int, dict] | None:
    """(pid, process_info) of the process listening on `port` if it runs one of our engine commands
    with this --port; whether it belongs to this checkout and run dir is for the caller to judge
    (`ours_here`)."""
    try:
        import psutil

        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                info = process_info(c.pid)
                if info and is_engine_command(info["cmd"]) and f"--port {port}" in " ".join(info["cmd"]):
                    return c.pid, info
    except Exception:  # noqa: BLE001 - best effort: no permission to list other users' sockets
        pass
    return None


def ours_here(info: dict) -> bool:
    """An engine process started by this checkout's launcher for this run dir."""
    return info.get("run_dir") == str(RUN_DIR) and info.get("cwd") == str(ROOT)


def our_engine_on(port: int) -> int | None:
    """The pid of an engine of this checkout and run dir listening on `port` (one whose pid file was
    lost is still found); None for nothing there or for another checkout's or run dir's engine."""
    found = engine_on(port)
    return found[0] if found and ours_here(found[1]) else None


def another_port(e: Engine) -> str:
    """How to give `e` another port, by its role."""
    if e.role == "redis":
        return f"use the Redis there with --kv-store redis://{e.host}:{e.port}"
    if e.role == "replica":
        return "move the replicas with --blend-port / --full-port (they take the front port + 100, + 110...)"
    return f"choose another port with --{e.name}-port"


def busy_port_fix(port: int) -> str:
    """What to do about a busy port, depending on whose process holds it."""
    found = engine_on(port)
    if found and ours_here(found[1]):
        return ("It is one of our engines without a pid file: run `./launch_engines.sh stop` (it finds it "
                "by its port)")
    if found:
        return (f"It is an engine of another checkout or run dir ({owner(found[1])}): stop it there "
                "with its own `./launch_engines.sh stop`")
    return "Stop that process"


def owner(info: dict) -> str:
    return f"started in {info.get('cwd') or '?'}, run dir {info.get('run_dir') or '?'}"


def stopped_state(pid: int | None) -> str | None:
    """"stopped" or "tracing-stop" (SIGSTOP, a debugger): a process that makes no progress."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().split(") ")[-1][0]
    except (OSError, IndexError, TypeError):
        return None
    return {"T": "stopped", "t": "tracing-stop"}.get(state)


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return True


def health(e: Engine, timeout: float = 2.0) -> dict | None:
    """The engine's /health answer ({"status": "ok"} for an empty or plain-text one, as vllm-router
    gives), None if it does not answer. A Redis is asked PING."""
    if e.role == "redis":
        return redis_ping(e.host, e.port, timeout)
    try:
        r = httpx.get(e.url + "/health", timeout=timeout, headers=auth_headers())
    except httpx.HTTPError:
        return None
    try:
        body = r.json() if r.status_code == 200 and r.content else None
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"status": "ok"}


def redis_ping(host: str, port: int, timeout: float = 2.0) -> dict | None:
    """{"status": "ok"} when a Redis answers PING at host:port, else None (no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return {"status": "ok"} if s.recv(64).startswith(b"+PONG") else None
    except OSError:
        return None


LABEL_ENV = "KVBLEND_BLEND_LABEL"  # a blend engine's settings in words, as its launcher recorded them
# A folder where an engine's processes write their Prometheus samples, summed on its API server's
# /metrics (prometheus_client's multiprocess mode); `engines.launch` empties it if it is in RUN_DIR.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def blend_settings(e: Engine) -> str:
    """"ratio R, check layer L" (and the blend path on vLLM) of a blend engine; "" when unknown.
    The embedded engine reports them on /health; the GPU launcher records them with the engine."""
    h = health(e) or {}
    if "ratio" in h:
        return f"ratio {h['ratio']}, check layer {h['check_layer']}"
    return (e.env or {}).get(LABEL_ENV, "")


def log_tail(e: Engine, n: int = 25) -> str:
    try:
        return "\n".join(e.log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
