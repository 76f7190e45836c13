"""Scale out: several replicas of an engine behind vLLM's router, and one Redis their chunk KV is
shared through. `helpers.engines.start` builds on these; this module only describes the processes
(not started), as `Engine` records with a role:

    clients --> vllm-router :8000 --> blend-1 :8100 --+
                                  --> blend-2 :8110 --+--> redis :6390 (chunk KV, shared)
    clients --> vllm-router :8001 --> full-1  :8101
                                  --> full-2  :8111

A replica's port is its front port + 100 + 10 * (i - 1); a router's metrics (Prometheus) port, its
front port + 90. The router takes the engine's usual port,
so notebooks and clients are unchanged. The managed Redis listens on 127.0.0.1 only, keeps nothing
on disk and evicts the least recently used chunks when it reaches its memory limit.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from . import runtime
from .runtime import HOST, Engine, EngineError

REDIS_PORT = 6390  # not Redis's usual 6379: a system Redis there is left alone
REDIS_MAXMEMORY = "4gb"  # the whole corpus's chunk KV for SmolLM2 is 1.7 GB
POLICIES = ("round_robin", "power_of_two", "cache_aware", "consistent_hash")
DEFAULT_POLICY = "round_robin"


def replica_port(front_port: int, i: int) -> int:
    """The port of replica i (1-based) of the engine whose router listens on `front_port`."""
    return front_port + 100 + 10 * (i - 1)


def metrics_port(front_port: int) -> int:
    """The router's Prometheus port (each router needs its own): its front port + 90."""
    return front_port + 90


def redis_engine(port: int = REDIS_PORT, maxmemory: str = REDIS_MAXMEMORY) -> Engine:
    """A local redis-server for chunk KV: loopback only, no persistence, LRU eviction when full."""
    exe = shutil.which("redis-server")
    if not exe:
        raise EngineError("`--kv-store redis` starts a local redis-server, but none is installed: run `make "
                          "setup` as root or `sudo apt-get install redis-server` (macOS: `brew install "
                          "redis`), or point at a running Redis with --kv-store redis://HOST:PORT.")
    cmd = [exe, "--bind", HOST, "--port", str(port), "--protected-mode", "yes", "--maxmemory", maxmemory,
           "--maxmemory-policy", "allkeys-lru", "--save", "", "--appendonly", "no",
           "--dir", str(runtime.RUN_DIR)]
    return Engine("redis", port, "redis", cmd, role="redis", title=exe)


def router_exe() -> str:
    exe = Path(sys.executable).with_name("vllm-router")
    found = str(exe) if exe.exists() else shutil.which("vllm-router")
    if not found:
        raise EngineError("Replicas need vLLM's router (`vllm-router`), which is not installed: run `make "
                          "setup` (or `pip install -e '.[cpu]'`) and start again.")
    return found


def router_engine(front: Engine, workers: list[Engine], policy: str = DEFAULT_POLICY,
                  startup_timeout: float = 600) -> Engine:
    """vllm-router on the front engine's port, in front of `workers`. It checks them every second and
    takes one out after three failed checks (a dead one fails each at once)."""
    cmd = [router_exe(), "--host", front.host, "--port", str(front.port),
           "--worker-urls", *[w.url for w in workers], "--policy", policy,
           "--health-check-interval-secs", "1", "--health-failure-threshold", "3",
           "--health-success-threshold", "1", "--health-check-timeout-secs", "5",
           "--worker-startup-timeout-secs", str(int(startup_timeout)), "--worker-startup-check-interval", "1",
           "--request-timeout-secs", "600", "--prometheus-host", HOST,
           "--prometheus-port", str(metrics_port(front.port))]
    label = front.env.get(runtime.LABEL_ENV)
    env = {runtime.LABEL_ENV: label} if label else {}
    return Engine(front.name, front.port, front.backend, cmd, env, host=front.host, model=front.model,
                  role="router", title="vllm::router")


def as_replica(e: Engine, i: int) -> Engine:
    e.name, e.role = f"{e.name}-{i}", "replica"
    return e


def managed_names() -> list[str]:
    """Every process name this run dir may hold a pid file for: the two fronts, replicas, Redis."""
    replicas = sorted({p.stem for pat in ("blend-*.json", "full-*.json") for p in runtime.RUN_DIR.glob(pat)
                       if p.stem.split("-", 1)[1].isdigit()})  # blend-1, full-2: never other engines' files
    return ["blend", "full", *replicas, "redis"]
