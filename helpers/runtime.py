"""The neutral core every other module may import: where things live, the `Engine` record, the
error users see, and small process and port helpers.

It imports nothing of ours, so the launcher (`helpers.engines`) and both backends
(`helpers.embedded.launch`, `helpers.gpu.launch`) can share it without importing each other.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = Path(os.environ.get("KVBLEND_RUN_DIR", ROOT / ".engines"))  # pid files, logs, engine configs
HOST = "127.0.0.1"
PORTS = {"blend": 8000, "full": 8001}  # the two engines' default ports


class EngineError(RuntimeError):
    """Something a user can act on: the message says what happened and what to do."""


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

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
    """The engine's /health answer ({"status": "ok"} for an empty one), None if it does not answer."""
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
