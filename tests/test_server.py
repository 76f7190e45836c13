"""The two embedded engines behind the OpenAI API, driven by the official `openai` client."""

import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from helpers import client as kvclient
from helpers import corpus, engines, runtime
from helpers.embedded import launch as embedded
from helpers.prompts import build_messages

from .conftest import free_port

MODEL = "smollm2"


@pytest.fixture(scope="module")
def blend(live_engines):
    return live_engines["blend"]


@pytest.fixture(scope="module")
def full(live_engines):
    return live_engines["full"]


def oai(e):
    return openai.OpenAI(base_url=e.url + "/v1", api_key="x", timeout=120, max_retries=0)


def test_health_and_models(blend, full):
    assert httpx.get(blend.url + "/health").json()["mode"] == "blend"
    assert httpx.get(full.url + "/health").json()["mode"] == "full"
    models = oai(blend).models.list().data
    assert [m.id for m in models] == [MODEL]


def test_chat_streams_text_and_usage(blend):
    msgs = build_messages([corpus.load_chunk("filter_scale")], "What does the scale filter do?")
    stream = oai(blend).chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
    events = list(stream)
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text.strip()
    assert events[0].choices[0].delta.role == "assistant"
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] in ("stop", "length")
    usage = events[-1].usage
    assert usage.completion_tokens > 0 and usage.prompt_tokens > 300
    assert events[-1].model_extra["x_blend"]["mode"] == "blend"


def test_chat_non_streaming_and_greedy_is_deterministic(full):
    msgs = [{"role": "user", "content": "Name a video codec."}]
    a, b = (oai(full).chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                              seed=s) for s in (1, 2))
    assert a.choices[0].message.content == b.choices[0].message.content != ""
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_completion_logprobs(full):
    r = oai(full).completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                     temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) == 3 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert lp.token_logprobs[0] == pytest.approx(max(lp.top_logprobs[0].values()), abs=1e-5)


def test_sampling_with_seed_and_stop(full):
    c = oai(full).completions
    kw = {"model": MODEL, "prompt": "List three colours:", "max_tokens": 20, "temperature": 1.0,
          "top_p": 0.9}
    assert c.create(seed=7, **kw).choices[0].text == c.create(seed=7, **kw).choices[0].text
    r = c.create(model=MODEL, prompt="Count: 1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 6"])
    assert " 6" not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_stream_completion_ends_with_done(blend):
    with httpx.stream("POST", blend.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


BAD = [
    ("malformed json", "/v1/completions", b"{not json", 400, "invalid_json"),
    ("body not an object", "/v1/completions", [1, 2], 400, "invalid_json"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "missing_required_parameter"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model_not_found"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "missing_required_parameter"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": "   "}, 400, "invalid_value"),
    ("prompt ids", "/v1/completions", {"model": MODEL, "prompt": [1, 2]}, 400, "invalid_type"),
    ("negative max_tokens", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": -1}, 400,
     "invalid_value"),
    ("absurd max_tokens", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 10**9}, 400,
     "invalid_value"),
    ("max_tokens as text", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400,
     "invalid_type"),
    ("temperature out of range", "/v1/completions", {"model": MODEL, "prompt": "a", "temperature": 5},
     400, "invalid_value"),
    ("logprobs too many", "/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 21}, 400,
     "invalid_value"),
    ("n > 1", "/v1/completions", {"model": MODEL, "prompt": "a", "n": 2}, 400, "invalid_value"),
    ("bad stop", "/v1/completions", {"model": MODEL, "prompt": "a", "stop": [1]}, 400, "invalid_value"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "missing_required_parameter"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_value"),
    ("unknown role", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ("content not text", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400, "invalid_type"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "invalid_value"),
]


@pytest.mark.parametrize("what,path,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(blend, what, path, body, status, code):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(blend.url + path, content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert httpx.get(blend.url + "/health").status_code == 200  # still serving


def test_prompt_longer_than_context_says_how_long(blend):
    with pytest.raises(openai.BadRequestError) as info:
        oai(blend).completions.create(model=MODEL, prompt="word " * 9000, max_tokens=5)
    msg = info.value.body["message"]
    assert "8192" in msg and "prompt:" in msg and info.value.body["code"] == "context_length_exceeded"


def test_precompute_and_stats(blend):
    text = corpus.load_chunk(corpus.load_manifest()[-1]["name"])
    first = httpx.post(blend.url + "/v1/kv/precompute", json={"texts": [text]}, timeout=120).json()
    again = httpx.post(blend.url + "/v1/kv/precompute", json={"texts": [text]}, timeout=120).json()
    assert first["results"][0]["tokens"] > 300
    assert again["results"][0]["cached"] is True
    stats = httpx.get(blend.url + "/v1/kv/stats").json()
    assert stats["entries"] >= 1 and stats["bytes"] > 0 and stats["hits"] >= 1


def test_health_answers_while_busy_and_disconnect_frees_the_model(full):
    """A long stream keeps the model busy; /health must still answer at once. Closing the stream
    must free the model: the next request is served promptly rather than after 2000 tokens."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", full.url + "/v1/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        next(ln for ln in it if ln.startswith("data:"))
        t0 = time.perf_counter()
        h = httpx.get(full.url + "/health", timeout=5).json()
        assert time.perf_counter() - t0 < 2 and h["busy"]
    t0 = time.perf_counter()
    r = oai(full).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert r.choices[0].text is not None and time.perf_counter() - t0 < 30


@pytest.mark.slow
def test_blend_is_faster_on_reordered_chunks(live_engines):
    """Chunks seen once in one order, asked about in another: the blend engine answers sooner."""
    names = corpus.pick_chunks(2000, seed=3)
    chunks = [corpus.load_chunk(n) for n in names]
    pair = (live_engines["blend"], live_engines["full"])
    kvclient.ask_one_by_one(chunks, "What is described here?", engines=pair)  # warm both
    res = kvclient.ask_one_by_one(chunks[::-1], "Which options are listed?", engines=pair)
    assert not res["blend"].error and not res["full"].error
    assert res["full"].ttft_s / res["blend"].ttft_s > 1.5, res
    assert res["blend"].info["chunk_hits"] == len(chunks) + 1  # every chunk and the system prefix


# ---------------------------------------------------------------- lifecycle: ports, stop, crashes
def test_busy_port_names_the_holder(run_dir):
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        e = embedded.engines(None, port, free_port())[0]
        e.name = "busy-test"
        with pytest.raises(runtime.EngineError, match=f"Port {port} is busy: pid {os.getpid()}"):
            engines.launch(e)


def test_killed_engine_mid_stream_errors_and_stop_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path)
    e = embedded.engines(None, free_port(), free_port())[1]  # one `full` engine
    engines.launch(e)
    engines.wait_healthy([e], timeout=240, progress=False)
    result = {}

    def ask():
        result["answer"] = kvclient.stream_answer(e, [], "Write a long story.", max_tokens=3000)

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.time() + 60
    while not httpx.get(e.url + "/health").json()["busy"] and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(e.pid, signal.SIGKILL)
    t.join(timeout=60)
    assert not t.is_alive(), "the client hung after the engine died"
    assert result["answer"].error, result["answer"]
    assert engines.status()["full"]["running"] is False
    engines.stop()
    assert not runtime.alive(e.pid) and not e.pidfile.exists()
    assert not runtime.port_in_use(e.port)


def test_start_reports_an_engine_that_dies(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path)
    e = embedded.engines("/nonexistent/model", free_port(), free_port())[0]
    engines.launch(e)
    with pytest.raises(runtime.EngineError, match="exited during start-up(.|\n)*no config.json"):
        engines.wait_healthy([e], timeout=120, progress=False)
    engines.stop()
