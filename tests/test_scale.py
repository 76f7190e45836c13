"""Scale out without a model: what `--blend-replicas` / `--kv-store` plan (router on the usual port,
replicas on their own, every blend replica pointed at one Redis), the command line's checks, and the
managed `redis-server`: started bound to 127.0.0.1 with LRU eviction, found by `status --json`,
stopped by `stop`, and a stale pid file never leads to a stranger being signalled."""

import json
import shutil
import subprocess
import sys
import time

import pytest

from helpers import engines, launcher, runtime, scale
from helpers.runtime import EngineError
from tests.conftest import free_port

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed: `make setup` as root installs it "
                                        "(or apt-get install redis-server)")


@pytest.fixture
def own_run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path)
    monkeypatch.setenv("KVBLEND_RUN_DIR", str(tmp_path))
    yield tmp_path
    engines.stop()


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_replicas_sit_behind_a_router_on_the_usual_port():
    url = "redis://127.0.0.1:6390"
    todo = engines.plan("embedded", None, 8000, 8001, {"blend": 2, "full": 1}, kv_store=url, kv_dir=None)
    by = {e.name: e for e in todo}
    assert [e.name for e in todo] == ["blend", "full", "blend-1", "blend-2"]
    assert (by["blend"].role, by["blend"].port, by["full"].role) == ("router", 8000, "engine")
    router = by["blend"].cmd
    assert router[0].endswith("vllm-router") and flag(router, "--port") == "8000"
    assert router[router.index("--worker-urls") + 1:][:2] == ["http://127.0.0.1:8100", "http://127.0.0.1:8110"]
    assert flag(router, "--policy") == scale.DEFAULT_POLICY
    for name, port in (("blend-1", "8100"), ("blend-2", "8110")):
        assert by[name].role == "replica" and flag(by[name].cmd, "--port") == port
        assert flag(by[name].cmd, "--mode") == "blend" and flag(by[name].cmd, "--kv-store") == url
    assert flag(by["full"].cmd, "--kv-store") is None  # the full engine has no chunk KV to share


def test_two_routers_get_metrics_ports_of_their_own():
    todo = engines.plan("embedded", None, 8000, 8001, {"blend": 2, "full": 2})
    routers = [e for e in todo if e.role == "router"]
    assert [flag(e.cmd, "--prometheus-port") for e in routers] == ["8090", "8091"]
    assert all(flag(e.cmd, "--prometheus-host") == "127.0.0.1" for e in routers)


def test_without_new_flags_the_plan_is_the_two_engines():
    todo = engines.plan("embedded", None, 8000, 8001)
    assert [(e.name, e.role, e.port) for e in todo] == [("blend", "engine", 8000), ("full", "engine", 8001)]
    assert "--kv-store" not in todo[0].cmd


def test_colliding_replica_ports_are_refused_before_anything_starts():
    with pytest.raises(EngineError, match="collide"):
        engines.plan("embedded", None, 8000, 8010, {"blend": 2, "full": 2})


@pytest.mark.parametrize("argv,words", [(["--kv-store", "memcached://x"], "--kv-store takes"),
                                        (["--blend-replicas", "0"], "from 1 to 16")])
def test_bad_scale_flags_exit_2_in_one_line(argv, words, capsys):
    assert launcher.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_launcher_passes_the_scale_flags(monkeypatch, capsys):
    got = {}

    def fake_start(backend, model, blend_port, full_port, timeout, **kw):
        got.update(kw)
        raise EngineError("stop here")

    monkeypatch.setattr(engines, "start", fake_start)
    launcher.main(["--backend", "embedded", "--blend-replicas", "2", "--kv-store", "redis",
                   "--router-policy", "cache_aware", "--no-precompute"])
    assert got["replicas"] == {"blend": 2, "full": 1} and got["kv_store"] == "redis"
    assert got["policy"] == "cache_aware"
    got.clear()
    launcher.main(["--backend", "embedded", "--no-precompute"])
    assert not {"replicas", "kv_store", "policy"} & set(got)  # no new flags: as before


@needs_redis
def test_the_managed_redis_is_ours_healthy_listed_and_stopped(own_run_dir, capsys):
    import redis

    e = engines.launch(scale.redis_engine(free_port()))
    engines.wait_healthy([e], 30, progress=False)
    assert runtime.owns(runtime.read_pidfile("redis"))
    r = redis.Redis(port=e.port)
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    assert r.config_get("bind")["bind"] == "127.0.0.1" and int(r.config_get("maxmemory")["maxmemory"]) > 0
    assert launcher.main(["status", "--json"]) == 1  # no blend/full engine: not all healthy
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["redis"] == {"name": "redis", "role": "redis", "url": f"redis://127.0.0.1:{e.port}",
                               "pid": e.pid, "healthy": True, "log": str(own_run_dir / "redis.log")}
    stopped = engines.stop()
    assert any(s.startswith("redis") for s in stopped)
    time.sleep(0.2)
    assert not runtime.alive(e.pid) and not (own_run_dir / "redis.json").exists()


@needs_redis
def test_a_stale_redis_pid_file_never_signals_a_stranger(own_run_dir):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake = scale.redis_engine(free_port())
        fake.pid, fake.started, fake.run_dir = stranger.pid, 12345.0, str(own_run_dir)  # a recycled pid
        runtime.write_atomic(fake.pidfile, json.dumps(fake.__dict__))
        assert not runtime.owns(runtime.read_pidfile("redis"))
        engines.stop()
        time.sleep(0.2)
        assert stranger.poll() is None and not fake.pidfile.exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_managed_names_are_the_fronts_the_replicas_and_redis(own_run_dir):
    for name in ("blend-2", "blend-1", "full-1", "blend-fast", "fixed_0.15", "docs"):
        (own_run_dir / f"{name}.json").write_text("{}")
    assert scale.managed_names() == ["blend", "full", "blend-1", "blend-2", "full-1", "redis"]


@needs_redis
def test_a_busy_redis_port_says_what_to_do(own_run_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(EngineError, match=r"Redis cannot start.*--kv-store redis://127\.0\.0\.1:\d+"):
            engines.launch(scale.redis_engine(s.getsockname()[1]))
    assert not (own_run_dir / "redis.json").exists()


def test_no_redis_server_says_what_to_do(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EngineError, match="apt-get install redis-server"):
        scale.redis_engine()
