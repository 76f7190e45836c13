"""The launcher and the engines used carelessly: they never harm what is not theirs, never fail open,
and take a documents folder safely. Each test reproduces one way a user broke them.

Launcher tests use tiny stand-in engines (HTTP servers named like ours, honouring KVBLEND_API_KEY as
ours do); server tests use a stand-in generator; a few need the session's live engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import free_port
from .test_reliability import FakeGen, client, served  # noqa: F401 - `served` is a fixture

ROOT = Path(__file__).resolve().parents[1]

FAKE_ENGINE = """
import http.server, json, os, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
key = os.environ.get("KVBLEND_API_KEY")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        given = self.headers.get("authorization")
        ok = not self.path.startswith("/v1/") or not key or given == f"Bearer {key}"
        body = json.dumps({"status": "ok", "backend": "embedded", "mode": sys.argv[-1]}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def fake_engines(tmp_path, monkeypatch):
    """helpers.engines with a backend whose engines are tiny HTTP servers named like ours."""
    from helpers import engines, runtime

    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path / "run")
    monkeypatch.delenv("KVBLEND_API_KEY", raising=False)
    ports = {"blend": free_port(), "full": free_port()}

    def fake(backend, model, blend_port, full_port, **kw):
        cmd = [sys.executable, "-c", FAKE_ENGINE, "helpers.embedded.server", "--port"]
        return [runtime.Engine(n, ports[n], "embedded", [*cmd, str(ports[n]), n]) for n in ("blend", "full")]

    monkeypatch.setattr(engines, "engines_for", fake)
    yield engines, ports
    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path / "run")
    engines.stop(ports=ports)


@pytest.fixture
def stranger():
    """An unrelated process in a session (and process group) of its own, as `setsid sleep 600`."""
    p = subprocess.Popen(["setsid", "sleep", "600"])  # setsid execs sleep: same pid, a group of its own
    time.sleep(0.2)
    yield p
    p.kill()
    p.wait()


def alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


# ---------------------------------------------------------------- whose process is it?
def test_a_stale_pid_file_never_kills_a_stranger(fake_engines, stranger):
    from helpers import runtime

    engines, ports = fake_engines
    runtime.RUN_DIR.mkdir(parents=True)
    for name in ("blend", "full"):  # pid files naming the stranger, as a stale one would after a reboot
        (runtime.RUN_DIR / f"{name}.json").write_text(json.dumps(
            {"name": name, "port": ports[name], "backend": "embedded", "cmd": ["x"], "pid": stranger.pid,
             "started": time.time() - 3600, "run_dir": str(runtime.RUN_DIR)}))
    assert not any(s["running"] for s in engines.status().values())
    engines.stop(ports=ports)
    assert alive(stranger)
    for name in ("blend", "full"):
        (runtime.RUN_DIR / f"{name}.json").write_text(json.dumps(
            {"name": name, "port": ports[name], "backend": "embedded", "cmd": ["x"], "pid": stranger.pid}))
    started = engines.start("embedded", timeout=30, progress=False)  # not "reused": started anew
    assert all(e.pid != stranger.pid for e in started) and alive(stranger)
    engines.stop(ports=ports)
    assert alive(stranger)


def test_stop_spares_another_run_dirs_engines(fake_engines, tmp_path, monkeypatch, capsys):
    from helpers import runtime

    engines, ports = fake_engines
    started = engines.start("embedded", timeout=30, progress=False)
    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path / "other")  # another checkout's or user's run dir
    assert engines.stop(ports=ports) == []
    assert "is not this checkout's" in capsys.readouterr().err
    assert all(runtime.same_process(e) for e in started)
    with pytest.raises(runtime.EngineError, match="another checkout or run dir"):
        engines.start("embedded", timeout=30, progress=False)
    assert all(runtime.same_process(e) for e in started)


def test_a_key_over_keyless_engines_restarts_them(fake_engines, monkeypatch):
    from helpers import runtime

    engines, ports = fake_engines
    before = engines.start("embedded", timeout=30, progress=False)
    url = f"http://127.0.0.1:{ports['full']}/v1/models"
    assert httpx.get(url).status_code == 200
    monkeypatch.setenv("KVBLEND_API_KEY", "s3cret")
    after = engines.start("embedded", timeout=30, progress=False)
    assert [e.pid for e in after] != [e.pid for e in before]  # not reused: they did not ask for the key
    assert not any(runtime.same_process(e) for e in before)
    assert httpx.get(url).status_code == 401  # fails closed
    assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert "s3cret" not in runtime.read_pidfile("full").pidfile.read_text()  # a hash, never the key
    assert [e.pid for e in engines.start("embedded", timeout=30, progress=False)] == [e.pid for e in after]


def test_two_launchers_with_different_documents(fake_engines, tmp_path):
    from helpers.documents import DocumentsError
    from helpers.library import recorded_docs

    engines, ports = fake_engines
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    engines.start("embedded", timeout=30, progress=False, docs=a)
    with pytest.raises(DocumentsError, match="hold the documents of .*/a, not .*/b"):
        engines.start("embedded", timeout=30, progress=False, docs=b)
    engines.start("embedded", timeout=30, progress=False)  # no --docs: the running engines keep a's
    assert recorded_docs() == a


# ---------------------------------------------------------------- the command line
def launcher(*args, cwd, run_dir, timeout=120):
    env = {**os.environ, "KVBLEND_RUN_DIR": str(run_dir)}
    env.pop("KVBLEND_API_KEY", None)
    return subprocess.run([str(ROOT / "launch_engines.sh"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_relative_docs_path_is_the_callers(tmp_path):
    # `docs` exists in the checkout (docs/*.md) but not here: it must not be the checkout's folder
    r = launcher("--docs", "docs", "--backend", "embedded", cwd=tmp_path, run_dir=tmp_path / "run")
    assert r.returncode == 2 and f"{tmp_path}/docs does not exist" in r.stderr, r.stderr


@pytest.mark.parametrize("args, says", [
    (["--blend-port", "0"], "--blend-port must be a port number"),
    (["--blend-port", "8000", "--full-port", "8000"], "must differ"),
    (["--timeout", "-1"], "--timeout must be positive"),
    (["--ratio", "0"], "--ratio must be in"),
])
def test_launcher_bad_arguments_in_one_line(tmp_path, args, says):
    r = launcher(*args, cwd=tmp_path, run_dir=tmp_path / "run")
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_unusable_run_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")  # a run dir "inside" a file can never be created
    for action in ("stop", "start"):
        r = launcher(action, "--backend", "embedded", cwd=tmp_path, run_dir=tmp_path / "file" / "run")
        assert r.returncode == 1 and "Cannot write to the run folder" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_failed_pid_file_write_leaves_nothing_behind(fake_engines, monkeypatch):
    import errno

    from helpers import runtime

    engines, ports = fake_engines

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(runtime.EngineError, match="No space left on device"):
        engines.start("embedded", timeout=30, progress=False)
    monkeypatch.undo()
    assert not list(runtime.RUN_DIR.glob("*.tmp")) and not list(runtime.RUN_DIR.glob(".*.tmp"))
    assert not any(runtime.port_in_use(p) for p in ports.values())  # the engine it started is gone


@pytest.mark.parametrize("args, says", [
    (["rag", "--questions", "0"], "--questions must be from 1"),
    (["rag", "--questions", "-1"], "--questions must be from 1"),
    (["rag", "--max-tokens", "0"], "--max-tokens must be from 1"),
    (["rag", "-k", "100000"], "-k must be from 1"),
    (["rag", "--blend-port", "70000"], "port numbers"),
    (["engines", "--sizes", "1k"], "--sizes must be"),
    (["blend", "--deviation", "q"], "--deviation must be"),
])
def test_bench_bad_arguments_in_one_line(args, says):
    r = subprocess.run([sys.executable, "-m", "helpers.bench", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bench_without_engines_is_one_line():
    r = subprocess.run([sys.executable, "-m", "helpers.bench", "rag", "--questions", "1", "--blend-port",
                        str(free_port()), "--full-port", str(free_port())], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "No blend engine answers" in r.stderr and "Traceback" not in r.stderr


def test_retrieval_bad_k_in_one_line():
    r = subprocess.run([sys.executable, "-m", "helpers.retrieval", "x264 preset", "-k", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "-k must be at least 1" in r.stderr and "Traceback" not in r.stderr


def test_lab_options_override_the_defaults():
    from helpers.lab import lab_command

    cmd = lab_command("nb.ipynb", 8888, "--ServerApp.port_retries=0", "--ServerApp.port=9999")
    assert [c for c in cmd if "port_retries" in c] == ["--ServerApp.port_retries=0"]
    assert [c for c in cmd if "ServerApp.port=" in c] == ["--ServerApp.port=9999"]
    assert "--allow-root" in cmd


def test_swapped_ports_are_refused(served):  # noqa: F811 - the fixture
    from helpers.rag import check_roles
    from helpers.runtime import Engine, EngineError
    from helpers.settings import BLEND

    gens = {m: FakeGen() for m in ("blend", "full")}
    gens["blend"].mode, gens["blend"].blend = "blend", BLEND
    port = {m: int(served(g).rsplit(":", 1)[1]) for m, g in gens.items()}
    check_roles([Engine("blend", port["blend"], "embedded"), Engine("full", port["full"], "embedded")])
    with pytest.raises(EngineError, match="is a full engine, not the blend engine"):
        check_roles([Engine("blend", port["full"], "embedded"), Engine("full", port["blend"], "embedded")])


def test_context_length_is_read_with_the_key(served, monkeypatch):  # noqa: F811 - the fixture
    from helpers import tutorial
    from helpers.runtime import Engine

    url = served(FakeGen(), api_key="s3cret")
    monkeypatch.setenv("KVBLEND_API_KEY", "s3cret")
    assert tutorial._context_length(Engine("blend", int(url.rsplit(":", 1)[1]), "embedded")) == 2048


# ---------------------------------------------------------------- documents
@pytest.fixture
def tok():
    from helpers.documents import default_tokenizer

    return default_tokenizer()


def test_links_out_of_the_folder_are_not_followed(tmp_path, tok):
    from helpers.documents import DocumentsWarning, load_documents

    (tmp_path / "notes.txt").write_text("Our own note about x264 presets.\n")
    (tmp_path / "passwd.txt").symlink_to("/etc/passwd")
    (tmp_path / "status.md").symlink_to("/proc/self/status")
    (tmp_path / "alias.txt").symlink_to(tmp_path / "notes.txt")  # inside the folder: fine
    with pytest.warns(DocumentsWarning, match="passwd.txt: a link to /etc/passwd"):
        chunks = load_documents(tmp_path, tokenizer=tok)
    assert sorted(chunks) == ["alias_0", "notes_0"]
    assert not any("root:" in t for t in chunks.values())


def test_size_caps_are_checked_before_reading(tmp_path, tok, monkeypatch):
    from helpers import documents

    big = tmp_path / "huge.txt"
    with open(big, "wb") as f:  # 3 GB, sparse: reading it whole would take the machine's memory
        f.truncate(3 << 30)
    t0 = time.perf_counter()
    with pytest.raises(documents.DocumentsError, match="huge.txt is 3221.2 MB, over the 2.1 MB"):
        documents.load_documents(tmp_path, tokenizer=tok)
    assert time.perf_counter() - t0 < 2
    big.unlink()
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text("word " * 200)
    monkeypatch.setattr(documents, "MAX_TOTAL_BYTES", 2500)
    with pytest.raises(documents.DocumentsError, match=r"over 0.0 MB of .txt/.md text \(at d2.txt\)"):
        documents.load_documents(tmp_path, tokenizer=tok)


def test_binary_is_recognized_from_its_first_bytes(tmp_path, tok, monkeypatch):
    from helpers import documents

    (tmp_path / "blob.txt").write_bytes(b"\x00\x01" + b"a" * (1 << 20))
    (tmp_path / "ok.txt").write_text("plain text")
    read = []
    real_open = open

    class Counting:  # a binary file that counts the bytes read from it
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

    def spy(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Counting(f) if "blob" in str(path) else f

    monkeypatch.setattr("builtins.open", spy)
    with pytest.warns(documents.DocumentsWarning, match="blob.txt: binary"):
        assert list(documents.load_documents(tmp_path, tokenizer=tok)) == ["ok_0"]
    assert 0 < sum(read) <= documents.SNIFF_BYTES  # stopped at the first bytes


def test_a_separator_inside_a_document_keeps_its_chunk_whole(tmp_path, tok):
    from helpers.documents import load_documents
    from helpers.prompts import SEP, build_user_message, split_segments

    (tmp_path / "shell.md").write_text("Comments in this config look like a # # b, and ### headers.\n")
    chunks = load_documents(tmp_path, tokenizer=tok)
    text = chunks["shell_0"]
    assert SEP not in text and " ## " in text
    assert split_segments(build_user_message([text, "other chunk"], "q?")) == [text, "other chunk", "q?"]


@pytest.mark.parametrize("chunk", ["a # # b", "x # # # # y", "ends with #", "ends # #", " # # ",
                                   "# # starts", "a #  # b"])
def test_no_chunk_text_can_cut_a_prompt(chunk):
    from helpers.prompts import build_user_message, escape_separator, split_segments

    assert split_segments(build_user_message([chunk, "c"], chunk)) == [escape_separator(chunk), "c",
                                                                       escape_separator(chunk)]


def test_a_separator_chunk_hits_its_cached_kv(live_engines):
    from helpers import client as kvclient

    blend = live_engines["blend"]
    chunk = "In a shell script, # # marks nothing special; write the comment as you like. " * 4
    other = "Another short chunk, about nothing in particular, precomputed with the first one."
    r = httpx.post(blend.url + "/v1/kv/precompute", json={"texts": [chunk, other]}, timeout=120)
    assert r.status_code == 200, r.text
    assert kvclient.stream_answer(blend, [], "Hello", max_tokens=1).error is None  # caches the prefix
    a = kvclient.stream_answer(blend, [chunk, other], "What marks it?", max_tokens=2)
    assert a.error is None and a.info["chunk_misses"] == 0 and a.info["chunk_hits"] >= 2, a.info


def test_kvblend_cache_holds_the_chunk_kv(tmp_path, monkeypatch):
    from helpers.embedded import launch

    monkeypatch.setenv("KVBLEND_CACHE", str(tmp_path))
    blend, full = launch.engines(None, 1, 2)
    assert blend.cmd[blend.cmd.index("--cache-dir") + 1] == str(tmp_path / "chunk-kv")
    assert "--cache-dir" not in full.cmd
    assert "--cache-dir" not in launch.engines(None, 1, 2, kv_dir=None)[0].cmd


# ---------------------------------------------------------------- the OpenAI surface
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.mark.parametrize("param, value", [
    ("echo", True), ("best_of", 3), ("suffix", "end"), ("logit_bias", {"50256": -100}),
    ("presence_penalty", 0.5), ("frequency_penalty", 1.0), ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
])
def test_unsupported_parameters_are_refused_by_name(param, value):
    c = client()
    for path, body in (("/v1/chat/completions", CHAT),
                       ("/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 3})):
        r = c.post(path, json={**body, param: value})
        assert r.status_code == 400, (param, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == "unsupported_parameter" and param in err["message"]


def test_neutral_values_of_unsupported_parameters_are_accepted():
    r = client().post("/v1/chat/completions", json={**CHAT, "presence_penalty": 0, "tool_choice": "none",
                                                     "response_format": {"type": "text"}, "user": "me"})
    assert r.status_code == 200, r.text


def test_tiny_temperature_and_top_p_are_greedy():
    import torch

    from helpers.embedded.generate import Generator, Request

    gen = object.__new__(Generator)
    logits = torch.randn(1000)
    best = int(torch.argmax(logits))
    for req in (Request([[1]], temperature=1e-40), Request([[1]], temperature=1.0, top_p=1e-300)):
        assert gen.sample(logits, req, None)[0] == best


@pytest.mark.parametrize("stop", ["0123456789", "never appears in this answer, 30"])
@pytest.mark.parametrize("chat", [False, True])
def test_streamed_logprobs_are_complete_with_stop_strings(live_engines, stop, chat):
    full = live_engines["full"]
    model = httpx.get(full.url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "max_tokens": 20, "stop": [stop], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    if chat:
        body |= {"messages": [{"role": "user", "content": "Count from one to twenty in words."}],
                 "logprobs": True, "top_logprobs": 1}
    else:
        body |= {"prompt": "One, two, three, four, five,", "logprobs": 1}
    entries, usage = 0, None
    with httpx.stream("POST", full.url + ("/v1/chat/completions" if chat else "/v1/completions"),
                      json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for c in event["choices"]:
                lp = c.get("logprobs") or {}
                entries += len(lp.get("content") or lp.get("tokens") or [])
    assert usage and entries == usage["completion_tokens"], (entries, usage)
