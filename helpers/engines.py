"""Start, find and stop the two engines: `blend` (reuses cached chunk KV) on :8000 and `full` (plain
prefill) on :8001, on either backend.

    python -m helpers.engines start [--backend auto|embedded|vllm] [--model PATH]
    python -m helpers.engines status | stop

Each engine is a subprocess in its own process group with its log in `.engines/<name>.log` and a pid
file `.engines/<name>.json`, so a new kernel, a notebook or `launch_engines.sh stop` finds engines
another process started. Errors say what happened and what to do; a dying engine's last log lines
are shown.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = Path(os.environ.get("KVBLEND_RUN_DIR", ROOT / ".engines"))
HOST = "127.0.0.1"
BLEND_PORT, FULL_PORT = 8000, 8001


class EngineError(RuntimeError):
    """Something a user can act on: the message says what happened and what to do."""


@dataclass
class Engine:
    name: str  # "blend" or "full"
    port: int
    backend: str
    cmd: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    pid: int | None = None
    host: str = HOST
    model: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return RUN_DIR / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return RUN_DIR / f"{self.name}.json"


# ------------------------------------------------------------------ backends
def gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def pick_backend(backend: str = "auto") -> str:
    """`auto` is the GPU backend when two GPUs and vLLM are present, else the embedded one."""
    if backend not in ("auto", "embedded", "vllm"):
        raise EngineError(f"Unknown backend {backend!r}: use auto, embedded or vllm.")
    if backend != "auto":
        return backend
    return "vllm" if gpu_count() >= 2 and importlib.util.find_spec("vllm") else "embedded"


KV_DIR = ROOT / ".cache" / "chunk-kv"


def embedded_engines(model: str | None, blend_port: int, full_port: int, host: str = HOST,
                     ratio: float = 0.15, check_layer: int = 1, kv_dir: str | Path | None = KV_DIR,
                     ) -> list[Engine]:
    """The two embedded servers. The blend engine keeps chunk KV in `kv_dir` too (about 46 KB per
    token for SmolLM2, 1.8 GB for the whole corpus), so a restarted engine starts warm: computing
    every chunk's KV costs minutes on 2 cores, loading it back seconds. None keeps it in memory only."""
    def cmd(mode: str, port: int) -> list[str]:
        c = [sys.executable, "-m", "helpers.embedded.server", "--mode", mode, "--host", host,
             "--port", str(port), "--ratio", str(ratio), "--check-layer", str(check_layer)]
        if mode == "blend" and kv_dir:
            c += ["--cache-dir", str(kv_dir)]
        return c + (["--model", model] if model else [])

    # Two engines share 2 cores; each gets them all (only one runs at a time in a fair comparison).
    env = {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return [Engine("blend", blend_port, "embedded", cmd("blend", blend_port), env, host=host, model=model),
            Engine("full", full_port, "embedded", cmd("full", full_port), env, host=host, model=model)]


def engines_for(backend: str, model: str | None, blend_port: int, full_port: int, **kw) -> list[Engine]:
    if backend == "vllm":
        from . import gpu_backend  # imports nothing heavy; checks GPUs and versions

        kw.pop("kv_dir", None)  # LMCache keeps its own chunk store
        return gpu_backend.vllm_engines(model, blend_port, full_port, **kw)
    return embedded_engines(model, blend_port, full_port, **kw)


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
    except Exception:  # noqa: BLE001 - best effort: psutil missing or no permission
        pass
    return "another process"


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
    try:
        r = httpx.get(e.url + "/health", timeout=timeout)
        return r.json() if r.status_code == 200 and r.content else {"status": "ok"}
    except (httpx.HTTPError, ValueError):
        return None


def log_tail(e: Engine, n: int = 25) -> str:
    try:
        return "\n".join(e.log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def read_pidfile(name: str) -> Engine | None:
    path = RUN_DIR / f"{name}.json"
    try:
        return Engine(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------ start / stop / status
def launch(e: Engine) -> Engine:
    """Start one engine in the background (own process group), unless ours already serves there."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    old = read_pidfile(e.name)
    if old and alive(old.pid):
        if old.port == e.port and old.backend == e.backend and old.model == e.model:
            return old  # already running: reuse it
        stop_engine(old)
    if port_in_use(e.port, e.host):
        raise EngineError(
            f"Port {e.port} is busy: {port_owner(e.port)} holds it, so the {e.name} engine cannot "
            f"start. Stop that process (or run `./launch_engines.sh stop`), or choose another port "
            f"with --{e.name}-port."
        )
    env = {**os.environ, **e.env}
    with open(e.log, "w") as log:
        proc = subprocess.Popen(e.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=ROOT, start_new_session=True)
    e.pid = proc.pid
    e.pidfile.write_text(json.dumps(asdict(e)))
    return e


def wait_healthy(engines: list[Engine], timeout: float = 300, progress: bool = True) -> None:
    """Block until every engine answers /health; raise with its log tail if one dies or times out."""
    t0 = time.time()
    pending = list(engines)
    bar = _progress(progress, len(engines))
    while pending:
        for e in list(pending):
            if health(e):
                pending.remove(e)
                if bar:
                    bar.update(1)
                    bar.set_postfix_str(f"{e.name} ready on :{e.port}")
            elif not alive(e.pid):
                if bar:
                    bar.close()
                raise EngineError(
                    f"The {e.name} engine exited during start-up. Last lines of {e.log}:\n"
                    f"{log_tail(e)}\nFix the cause above and start again."
                )
        if pending and time.time() - t0 > timeout:
            for e in engines:
                stop_engine(e)
            raise EngineError(
                f"Engines not ready after {timeout:.0f} s ({', '.join(e.name for e in pending)}); "
                f"stopped them. Last lines of {pending[0].log}:\n{log_tail(pending[0])}"
            )
        if pending:
            if bar:
                bar.set_description(f"starting engines ({time.time() - t0:.0f} s)")
            time.sleep(0.5)
    if bar:
        bar.close()


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="starting engines", unit="engine")


def start(backend: str = "auto", model: str | None = None, blend_port: int = BLEND_PORT,
          full_port: int = FULL_PORT, timeout: float = 300, progress: bool = True, **kw) -> list[Engine]:
    """Start (or find running) blend and full engines and wait until both are healthy."""
    backend = pick_backend(backend)
    engines = [launch(e) for e in engines_for(backend, model, blend_port, full_port, **kw)]
    wait_healthy(engines, timeout, progress)
    return engines


def stop_engine(e: Engine, grace: float = 10.0) -> None:
    """TERM the engine's process group, KILL it after `grace` seconds, remove its pid file."""
    if e.pid and alive(e.pid):
        try:
            os.killpg(e.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.time() + grace
        while alive(e.pid) and time.time() < deadline:
            time.sleep(0.1)
        if alive(e.pid):
            try:
                os.killpg(e.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:  # reap it if it was our child
            os.waitpid(e.pid, os.WNOHANG)
        except ChildProcessError:
            pass
    e.pidfile.unlink(missing_ok=True)


def stop(names=("blend", "full")) -> list[str]:
    stopped = []
    for name in names:
        e = read_pidfile(name)
        if e:
            stop_engine(e)
            stopped.append(f"{name} (pid {e.pid}, :{e.port})")
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
    """The running engine `name` (from its pid file), or one on the default port we did not start."""
    e = read_pidfile(name)
    if e and alive(e.pid):
        return e
    port = port or (BLEND_PORT if name == "blend" else FULL_PORT)
    return Engine(name, port, "unknown")


def precompute(e: Engine, texts: list[str], progress: bool = True) -> dict:
    """Compute the KV of every chunk on the blend engine once, so later prompts hit the cache."""
    if e.backend == "vllm":
        from . import gpu_backend

        return gpu_backend.precompute(e, texts, progress=progress)
    from tqdm.auto import tqdm

    done = {"tokens": 0, "computed": 0}
    with httpx.Client(timeout=600) as client:
        for text in tqdm(texts, desc="precomputing chunk KV", unit="chunk", disable=not progress):
            r = client.post(e.url + "/v1/kv/precompute", json={"texts": [text]})
            r.raise_for_status()
            res = r.json()["results"][0]
            done["tokens"] += res["tokens"]
            done["computed"] += not res["cached"]
        # The chat template's prefix (system prompt, user header) is a segment of its own too:
        # one tiny request caches it, so the first real question pays for no segment at all.
        from .prompts import build_messages

        model = client.get(e.url + "/v1/models").json()["data"][0]["id"]
        client.post(e.url + "/v1/chat/completions", json={
            "model": model, "messages": build_messages([], "Hello"), "max_tokens": 1}).raise_for_status()
        done["stats"] = client.get(e.url + "/v1/kv/stats").json()
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch_engines.sh", description="Start/stop the two engines.")
    ap.add_argument("action", nargs="?", default="start", choices=["start", "stop", "status"])
    ap.add_argument("--backend", default="auto", choices=["auto", "embedded", "vllm"])
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2 on CPU, Mistral-7B on GPU)")
    ap.add_argument("--blend-port", type=int, default=BLEND_PORT)
    ap.add_argument("--full-port", type=int, default=FULL_PORT)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--no-precompute", action="store_true", help="skip warming the chunk KV cache")
    ap.add_argument("--load-format", default=None, help="vLLM only: 'dummy' for random weights")
    ap.add_argument("--no-disk-cache", action="store_true",
                    help="embedded only: keep chunk KV in memory only (default: also in .cache/chunk-kv)")
    args = ap.parse_args(argv)
    if args.action == "stop":
        stopped = stop()
        print("stopped: " + ", ".join(stopped) if stopped else "no engines were running")
        return 0
    if args.action == "status":
        st = status()
        print(json.dumps(st, indent=2))
        return 0 if all(s.get("healthy") for s in st.values()) else 1
    kw = {"load_format": args.load_format} if args.load_format else {}
    if args.no_disk_cache:
        kw["kv_dir"] = None
    try:
        engines = start(args.backend, args.model, args.blend_port, args.full_port, args.timeout, **kw)
        if not args.no_precompute:
            from .corpus import load_chunks

            res = precompute(engines[0], list(load_chunks().values()))
            print(f"chunk KV ready: {res['tokens']} tokens, {res['computed']} chunks computed now")
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for e in engines:
        print(f"{e.name:5s} engine ({e.backend}): {e.url}/v1   log: {e.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
