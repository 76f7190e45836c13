"""The engines under hostile or careless use: a damaged chunk-KV cache, oversized and
malformed requests, abandoned clients, foreign web pages, racing launchers, frozen engines.

Most server checks run against the real app with a stand-in generator (no model: fast); the few
that need the real tokenizer or model use the session's live engines."""

import json
import logging
import os
import time

import httpx
import pytest
import torch

from helpers.embedded.kvstore import ChunkKVStore

from .conftest import free_port


# ---------------------------------------------------------------- chunk KV on disk
def kv_file(d, key):
    return d / f"{key}.safetensors"


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "data flipped", "other model"])
def test_damaged_kv_file_is_deleted_and_never_served(tmp_path, caplog, damage):
    ChunkKVStore(disk_dir=tmp_path, model_id="m").put("k", torch.arange(1000, dtype=torch.float32))
    f = kv_file(tmp_path, "k")
    raw = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "random bytes":
        f.write_bytes(os.urandom(len(raw)))
    elif damage == "data flipped":  # the header stays valid: only the checksum can tell
        f.write_bytes(raw[:-100] + os.urandom(100))
    store = ChunkKVStore(disk_dir=tmp_path, model_id="other" if damage == "other model" else "m")
    with caplog.at_level(logging.WARNING):
        assert store.get("k") is None  # a miss: the caller recomputes
    assert not f.exists() and "damaged chunk KV file" in caplog.text
    assert store.stats()["damaged"] == 1 and store.stats()["misses"] == 1
    store.put("k", torch.ones(3))  # recomputed, written again, served from disk after a restart
    assert torch.equal(ChunkKVStore(disk_dir=tmp_path, model_id=store.model_id).get("k"), torch.ones(3))


def test_kv_files_are_written_atomically(tmp_path):
    store = ChunkKVStore(disk_dir=tmp_path, model_id="m")
    store.put("k", torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]  # no temp file left behind


def test_disk_budget_evicts_least_recently_used(tmp_path):
    one = torch.zeros(1000)  # ~4.1 KB on disk with its header
    store = ChunkKVStore(max_bytes=1, disk_dir=tmp_path, disk_bytes=13_000, model_id="m")  # 3 files fit
    for i, key in enumerate(["a", "b", "c"]):
        store.put(key, one.clone())
        os.utime(kv_file(tmp_path, key), (1000 + i, 1000 + i))  # a clear age order
    store.get("a")  # a is used again: b is now the oldest
    store.put("d", one.clone())
    left = sorted(p.stem for p in tmp_path.glob("*.safetensors"))
    assert left == ["a", "c", "d"] and store.stats()["disk_evictions"] == 1
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 13_000


# ---------------------------------------------------------------- the server, with a stand-in model
class FakeTok:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 1000 for c in text.replace(" ", "")]

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


class FakeGen:
    """Generator's shape without a model: one "x" token every `pace` seconds, cancellable."""

    mode, model_name, context_length = "full", "fake", 2048

    def __init__(self, pace=0.02):
        from helpers.embedded.kvstore import ChunkKVStore

        self.pace, self.tok, self.started = pace, FakeTok(), 0
        self.runner = type("R", (), {"store": ChunkKVStore(), "tokenize": self.tokenize})()

    def tokenize(self, segments, add_bos=False):
        return [self.tok.encode(s) for s in segments]

    def chat_text(self, messages):
        return "".join(m["content"] for m in messages)

    def segments(self, text, chat):
        return self.tokenize([text])

    def cache_chunk(self, text):
        time.sleep(self.pace)
        return {"tokens": len(self.tok.encode(text)), "cached": False, "ms": 1.0}

    def run(self, req):
        from helpers.embedded.generate import Step

        self.started += 1
        for i in range(req.max_tokens):
            if req.cancelled.is_set():
                return
            time.sleep(self.pace)
            last = i == req.max_tokens - 1
            yield Step("x", 1, "x", -0.5, None, "length" if last else None)


JSON = {"content-type": "application/json"}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def client(gen=None, **kw):
    from fastapi.testclient import TestClient

    from helpers.embedded.server import create_app

    return TestClient(create_app(gen or FakeGen(), **kw), base_url="http://127.0.0.1:8000",
                      raise_server_exceptions=False)


def assert_openai_error(r, status, code):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"], err
    assert len(r.text) < 1000  # never echoes a large input


def test_fake_engine_serves():
    r = client().post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "xxx"


DEEP = b'{"model": "fake", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
HOSTILE = [
    ("nested 10,000 deep", "/v1/chat/completions", DEEP, 400, "invalid_json"),
    ("lone surrogate", "/v1/chat/completions",
     b'{"model": "fake", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "invalid_value"),
    ("seed 2**70", "/v1/chat/completions", {**CHAT, "seed": 2**70}, 400, "invalid_value"),
    ("20 MB model name", "/v1/chat/completions", {**CHAT, "model": "m" * 5_000_000}, 413,
     "request_too_large"),
    ("long model name", "/v1/chat/completions", {**CHAT, "model": "m" * 100_000}, 404, "model_not_found"),
    ("long bad value", "/v1/chat/completions", {**CHAT, "temperature": "t" * 100_000}, 400, "invalid_type"),
    ("five stops", "/v1/chat/completions", {**CHAT, "stop": list("abcde")}, 400, "invalid_value"),
    ("huge stop", "/v1/chat/completions", {**CHAT, "stop": "s" * 1000}, 400, "invalid_value"),
    ("prompt over the context, untokenized", "/v1/completions",
     {"model": "fake", "prompt": "a" * 2_000_000}, 400, "context_length_exceeded"),
    ("precompute text over the context", "/v1/kv/precompute", {"texts": ["ab" * 2100]}, 400,
     "context_length_exceeded"),
    ("precompute 500 texts", "/v1/kv/precompute", {"texts": ["a"] * 500}, 400, "invalid_value"),
    ("precompute no texts", "/v1/kv/precompute", {"texts": []}, 400, "invalid_value"),
]


@pytest.mark.parametrize("what,path,body,status,code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_a_short_openai_error(what, path, body, status, code):
    c = client()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert_openai_error(c.post(path, content=data, headers=JSON), status, code)
    assert c.post("/v1/chat/completions", json=CHAT).status_code == 200  # still serving


def test_404_405_and_unexpected_errors_are_openai_json():
    gen = FakeGen()
    c = client(gen)
    assert_openai_error(c.get("/nope"), 404, "not_found")
    r = c.get("/v1/chat/completions")
    assert_openai_error(r, 405, "method_not_allowed")
    assert "POST" in r.json()["error"]["message"] and r.headers["allow"] == "POST"
    gen.runner.store.stats = lambda: 1 / 0  # a bug anywhere: still JSON, with a 500
    assert_openai_error(c.get("/v1/kv/stats"), 500, "engine_error")


def test_non_finite_logprobs_never_reach_json():
    from helpers.embedded.generate import LOGPROB_FLOOR, Generator, Request

    g = Generator.__new__(Generator)
    g.tok = FakeTok()
    logits = torch.tensor([0.0, float("-inf"), 1.0])
    _, lp, top = g.sample(logits, Request([[1]], logprobs=3, temperature=0), None)
    assert min(top.values()) == LOGPROB_FLOOR and lp > LOGPROB_FLOOR
    with pytest.raises(RuntimeError, match="NaN"):
        g.sample(torch.tensor([0.0, float("nan")]), Request([[1]]), None)


# ---------------------------------------------------------------- local-server hygiene
FOREIGN = [
    ("foreign Origin", {"origin": "https://evil.example", **JSON}, 403, "forbidden_origin"),
    ("null Origin", {"origin": "null", **JSON}, 403, "forbidden_origin"),
    ("foreign Host", {"host": "evil.example:8000", **JSON}, 403, "forbidden_host"),
    ("rebinding Host", {"host": "127.0.0.1.evil.example", **JSON}, 403, "forbidden_host"),
    ("text/plain", {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ("no content type", {}, 415, "unsupported_media_type"),
]


@pytest.mark.parametrize("what,headers,status,code", FOREIGN, ids=[f[0] for f in FOREIGN])
def test_web_pages_cannot_drive_the_engine(what, headers, status, code):
    gen = FakeGen()
    gen.runner.store.put("k", torch.ones(1))
    c = client(gen)
    assert_openai_error(c.post("/v1/kv/clear", content=b"{}", headers=headers), status, code)
    assert c.get("/v1/kv/stats").json()["entries"] == 1  # nothing was cleared


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "[::1]:9", "LOCALHOST:1"])
def test_loopback_hosts_and_origins_are_served(host):
    r = client().post("/v1/kv/clear", json={}, headers={"host": host, "origin": f"http://{host}"})
    assert r.status_code == 200, r.text


def test_api_key():
    c = client(api_key="s3cret")
    assert_openai_error(c.get("/v1/models"), 401, "invalid_api_key")
    assert_openai_error(c.get("/v1/models", headers={"authorization": "Bearer nope"}), 401, "invalid_api_key")
    assert c.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/health").status_code == 200  # as vLLM: /health needs no key


def test_a_chunked_body_is_cut_at_the_limit():
    def body():
        yield b'{"model": "fake", "prompt": "'
        for _ in range(100):
            yield b"a" * 100_000  # 10 MB, no Content-Length

    r = client(max_body=1 << 20).post("/v1/completions", content=body(), headers=JSON)
    assert_openai_error(r, 413, "request_too_large")


# ---------------------------------------------------------------- queue and abandoned clients
@pytest.fixture
def served():
    """Serve a FakeGen app on a real socket (disconnects are real); returns a starter."""
    import threading

    import uvicorn

    from helpers.embedded.server import create_app

    servers = []

    def start(gen, **kw):
        server = uvicorn.Server(uvicorn.Config(create_app(gen, **kw), host="127.0.0.1", port=free_port(),
                                               log_level="critical"))
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{server.config.port}"

    yield start
    for s in servers:
        s.should_exit = True


def test_abandoned_non_streaming_requests_free_the_model(served):
    gen = FakeGen(pace=0.05)  # 1000 tokens: 50 s each if nobody cancels
    url = served(gen)
    for _ in range(2):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 1000}, timeout=1.0)
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=20)
    assert r.status_code == 200 and time.perf_counter() - t0 < 5


def test_full_queue_gets_429_with_retry_after(served):
    url = served(FakeGen(pace=0.05), max_queue=2)
    body = {**CHAT, "max_tokens": 60, "stream": True}
    with httpx.Client(timeout=10) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as a, \
            c.stream("POST", url + "/v1/chat/completions", json=body) as b:
        assert a.status_code == b.status_code == 200
        r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert_openai_error(r, 429, "queue_full")
        assert int(r.headers["retry-after"]) > 0
    deadline = time.time() + 10  # both streams closed: room again
    while httpx.get(url + "/health", timeout=5).json()["busy"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200


def test_health_says_busy_during_precompute(served):
    import threading

    url = served(FakeGen(pace=0.1))
    t = threading.Thread(target=lambda: httpx.post(url + "/v1/kv/precompute", json={"texts": ["a"] * 20},
                                                   timeout=30))
    t.start()
    time.sleep(0.5)
    h = httpx.get(url + "/health", timeout=5).json()
    t.join(timeout=30)
    assert h["busy"] and h["task"] == "precompute"
    assert httpx.get(url + "/health", timeout=5).json()["busy"] is False


# ---------------------------------------------------------------- the launcher
FAKE_ENGINE = r"""
import http.server, json, os, signal, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
print("fake engine starting", flush=True)
if "--freeze" in sys.argv:
    os.kill(os.getpid(), signal.SIGSTOP)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "backend": "embedded"}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def fake_engines(tmp_path, monkeypatch):
    """helpers.engines with a backend whose engines are tiny HTTP servers named like ours."""
    import sys

    from helpers import engines, runtime

    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path)
    ports = {"blend": free_port(), "full": free_port()}
    freeze = set()

    def fake(backend, model, blend_port, full_port, **kw):
        def cmd(name):
            extra = ["--freeze"] if name in freeze else []
            return [sys.executable, "-c", FAKE_ENGINE, "helpers.embedded.server", "--port", str(ports[name]),
                    *extra]
        return [runtime.Engine(n, ports[n], "embedded", cmd(n)) for n in ("blend", "full")]

    monkeypatch.setattr(engines, "engines_for", fake)
    yield engines, ports, freeze
    engines.stop(ports=ports)


def test_two_launches_at_once_start_one_engine_each(fake_engines):
    import threading

    from helpers import runtime

    engines, ports, _ = fake_engines
    results, errors = [], []

    def launch():
        try:
            results.append(engines.start("embedded", timeout=30, progress=False))
        except Exception as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 2
    for name in ("blend", "full"):
        pids = {r.pid for run in results for r in run if r.name == name}
        assert len(pids) == 1  # the second launcher found the first one's engine
        assert runtime.read_pidfile(name).pid == pids.pop() == runtime.our_engine_on(ports[name])


def test_stop_finds_an_engine_by_its_port(fake_engines):
    from helpers import runtime

    engines, ports, _ = fake_engines
    started = engines.start("embedded", timeout=30, progress=False)
    for e in started:
        e.pidfile.unlink()  # the pid file is lost: only the port tells
    with pytest.raises(runtime.EngineError, match="one of our engines without a pid file"):
        engines.start("embedded", timeout=30, progress=False)
    stopped = engines.stop(ports=ports)
    assert len(stopped) == 2 and all("found by its port" in s for s in stopped)
    assert not any(runtime.alive(e.pid) for e in started)
    assert not any(runtime.port_in_use(p) for p in ports.values())


def test_a_running_engines_log_is_never_truncated(fake_engines):
    engines, ports, _ = fake_engines
    blend = engines.start("embedded", timeout=30, progress=False)[0]
    before = blend.log.read_text()
    assert "fake engine starting" in before
    assert engines.start("embedded", timeout=30, progress=False)[0].pid == blend.pid  # reused
    assert blend.log.read_text().startswith(before)
    engines.stop(ports=ports)
    engines.start("embedded", timeout=30, progress=False)
    assert (blend.log.parent / "blend.log.1").read_text().startswith(before)  # the last run's log kept


def test_a_frozen_engine_fails_fast_and_the_healthy_one_keeps_running(fake_engines):
    from helpers import runtime

    engines, ports, freeze = fake_engines
    freeze.add("full")
    t0 = time.perf_counter()
    with pytest.raises(runtime.EngineError, match=r"full engine is stopped(.|\n)*blend engine keeps "
                                                  r"running(.|\n)*fake engine starting"):
        engines.start("embedded", timeout=60, progress=False)
    assert time.perf_counter() - t0 < 20  # not the whole timeout
    assert runtime.read_pidfile("full") is None and not runtime.port_in_use(ports["full"])
    blend = runtime.read_pidfile("blend")
    assert runtime.alive(blend.pid) and runtime.health(blend)


def test_precompute_errors_are_engine_errors(served):
    from helpers.embedded import launch
    from helpers.runtime import Engine, EngineError

    down = Engine("blend", free_port(), "embedded")
    with pytest.raises(EngineError, match="did not answer"):
        launch.precompute(down, ["text"], progress=False)
    gen = FakeGen()
    gen.cache_chunk = lambda text: 1 / 0
    url = served(gen)
    up = Engine("blend", int(url.rsplit(":", 1)[1]), "embedded")
    with pytest.raises(EngineError, match=r"refused POST /v1/kv/precompute \(500\): The engine failed"):
        launch.precompute(up, ["text"], progress=False)


# ---------------------------------------------------------------- the real engine (model, tokenizer)
def test_a_damaged_kv_file_is_recomputed_to_the_same_kv(model, tmp_path):
    from helpers.embedded.blend import ModelRunner

    mdl, tok, path = model
    ids = tok.encode("FFmpeg scales video with the scale filter.", add_special_tokens=False)
    first, hit = ModelRunner(mdl, tok, ChunkKVStore(disk_dir=tmp_path, model_id=str(path)),
                             model_id=str(path)).chunk_kv(ids)
    f = next(tmp_path.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-64] + os.urandom(64))  # damage the data, keep the header
    runner = ModelRunner(mdl, tok, ChunkKVStore(disk_dir=tmp_path, model_id=str(path)), model_id=str(path))
    again, hit = runner.chunk_kv(ids)
    assert not hit and torch.equal(first, again) and runner.store.stats()["damaged"] == 1


@pytest.mark.slow
def test_live_engine_refuses_hostile_input_and_keeps_serving(live_engines):
    e = live_engines["blend"]
    post = {"headers": {"content-type": "application/json"}, "timeout": 60}
    r = httpx.post(e.url + "/v1/chat/completions", **post,
                   content=b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert_openai_error(r, 400, "invalid_value")
    t0 = time.perf_counter()
    for words, status, code in [(700_000, 400, "context_length_exceeded"),  # refused untokenized
                                (4_000_000, 413, "request_too_large")]:  # 20 MB
        r = httpx.post(e.url + "/v1/completions", **post,
                       content=json.dumps({"model": "smollm2", "prompt": "word " * words}).encode())
        assert_openai_error(r, status, code)
    r = httpx.post(e.url + "/v1/kv/precompute", **post, content=json.dumps({"texts": ["word " * 9000]}))
    assert_openai_error(r, 400, "context_length_exceeded")
    assert time.perf_counter() - t0 < 10
    body = {"model": "smollm2", "prompt": "Hi", "max_tokens": 2, "seed": 2**64 - 1}  # the largest seed
    r = httpx.post(e.url + "/v1/completions", **post, content=json.dumps(body))
    assert r.status_code == 200, r.text
    assert httpx.get(e.url + "/health", timeout=5).json()["status"] == "ok"


def test_client_helpers_send_the_api_key(served, monkeypatch):
    from helpers import client as kvclient
    from helpers.runtime import Engine

    url = served(FakeGen(), api_key="s3cret")
    e = Engine("full", int(url.rsplit(":", 1)[1]), "embedded")
    monkeypatch.delenv("KVBLEND_API_KEY", raising=False)
    assert "401" in kvclient.stream_answer(e, [], "hi", max_tokens=2, model="fake").error
    monkeypatch.setenv("KVBLEND_API_KEY", "s3cret")
    assert kvclient.model_id(e) == "fake"
    assert kvclient.stream_answer(e, [], "hi", max_tokens=2).text == "xx"
