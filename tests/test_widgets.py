"""The notebook widgets and charts without a browser: the picker's `order`/`tokens` contract, the
stream panes' throttle and error display, the app's ask path against fake and dead engines, and the
DOM names the browser test relies on."""

import socket
import threading

import plotly.graph_objects as go
import pytest
import traitlets

from helpers import client, corpus, gpu_results, plots, runtime, tutorial, widgets
from helpers import engines as eng
from helpers.metrics import f1

TOKENS = {m["name"]: m["tokens"] for m in corpus.load_manifest()}


@pytest.fixture(autouse=True)
def no_recorded_docs(tmp_path, monkeypatch):
    """Pickers offer the ffmpeg/ chunks only, whatever documents a user's running engines hold."""
    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path)


# ------------------------------------------------------------------ chunk picker
def test_picker_order_drives_token_count():
    p = widgets.ChunkPicker()
    assert p.order == [] and p.tokens == 0
    assert [c["name"] for c in p.chunks] == list(TOKENS)
    p.order = ["filter_scale", "encoder_flac"]
    assert p.tokens == TOKENS["filter_scale"] + TOKENS["encoder_flac"]
    assert p.texts() == [corpus.load_chunk("filter_scale"), corpus.load_chunk("encoder_flac")]
    p.order = ["encoder_flac", "filter_scale", "encoder_flac"]  # a chunk appears once
    assert p.order == ["encoder_flac", "filter_scale"]


def test_picker_accepts_front_end_updates():
    """A drag in the page arrives as a state update from the front end: same validation, same count."""
    p = widgets.ChunkPicker(order=["filter_crop"])
    p.set_state({"order": ["protocol_udp", "filter_crop"]})
    assert p.order == ["protocol_udp", "filter_crop"]
    assert p.tokens == TOKENS["protocol_udp"] + TOKENS["filter_crop"]


def test_picker_rejects_unknown_chunks_with_a_hint():
    p = widgets.ChunkPicker()
    with pytest.raises(traitlets.TraitError, match=r"Unknown chunk.*nope.*load_manifest"):
        p.order = ["filter_scale", "nope"]
    with pytest.raises(TypeError, match="list of chunk names"):
        widgets.ChunkPicker(order="filter_scale")


def test_dom_names_for_browser_tests():
    """The browser test finds elements by these names: renaming one must be deliberate."""
    picker_js, panes_js = widgets.PICKER_JS.read_text(), widgets.PANES_JS.read_text()
    for testid in ("chunk-picker", "selected-chunks", "selected-chunk", "chunk-library", "library-chunk",
                   "chunk-checkbox", "token-count", "move-up", "move-down", "remove"):
        assert f'"{testid}"' in picker_js, testid
    assert "dragstart" in picker_js and "drop" in picker_js
    for testid in ("pane-${name}", "ttft-${name}", "tps-${name}", "text-${name}", "error-${name}",
                   "state-${name}", "summary"):
        assert testid in panes_js, testid
    assert "http" not in picker_js + panes_js  # no CDN


# ------------------------------------------------------------------ stream panes
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def stream(panes, name, n_tokens, clock, dt=0.005, ttft=0.5):
    """Feed `panes` the updates a streaming answer makes: one per token, then the final one."""
    a = client.Answer(name)
    clock.now += ttft
    for i in range(n_tokens):
        if a.ttft_s is None:
            a.ttft_s = ttft
        a.text += f"t{i} "
        a.n_tokens += 1
        panes.update(a)
        clock.now += dt
    a.total_s, a.done = ttft + n_tokens * dt, True
    panes.update(a)
    return a


def test_panes_throttle_but_show_first_token_and_end():
    clock = FakeClock()
    panes = widgets.StreamPanes(hz=15, clock=clock)
    panes.reset()
    sent = []
    panes.observe(lambda ch: sent.append(ch["new"]), names="panes")
    a = stream(panes, "blend", 200, clock)  # 200 tokens over 1 s
    # first token, then at most one push per 1/15 s, then the end
    assert 3 <= len(sent) <= 1 + 16 + 1
    assert sent[0][0]["ttft_s"] == 0.5 and sent[0][0]["state"] == "streaming"
    final = sent[-1][0]
    assert final["text"] == a.text and final["state"] == "done"
    assert final["tokens_per_s"] == pytest.approx(a.tokens_per_s)
    assert sent[-1][1]["state"] == "waiting"  # the other pane untouched


def test_panes_from_two_threads():
    panes = widgets.StreamPanes(hz=20)
    panes.reset()
    answers = {}

    def run(name):
        answers[name] = stream(panes, name, 300, FakeClock(), ttft=0.1)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("blend", "full")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    by_name = {p["name"]: p for p in panes.panes}
    for name, a in answers.items():
        assert by_name[name]["text"] == a.text and by_name[name]["state"] == "done"
    assert panes.pushes < 600


def test_panes_show_errors():
    panes = widgets.StreamPanes()
    a = client.Answer("full", error="The full engine at http://x is not reachable", done=True)
    panes.update(a)
    pane = {p["name"]: p for p in panes.panes}["full"]
    assert pane["state"] == "error" and "not reachable" in pane["error"]


def test_summary_line():
    b, f = client.Answer("blend", ttft_s=0.5), client.Answer("full", ttft_s=2.0)
    assert "4.0x sooner" in widgets.summary({"blend": b, "full": f})
    assert "Full prefill answered first" in widgets.summary({"blend": client.Answer("blend", ttft_s=3.0),
                                                             "full": f})
    f.error = "down"
    assert "did not answer" in widgets.summary({"blend": b, "full": f})


# ------------------------------------------------------------------ the app
def engines_on_free_ports():
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return runtime.Engine("blend", ports[0], "embedded"), runtime.Engine("full", ports[1], "embedded")


def test_app_ask_records_history_and_grows_chart(monkeypatch):
    def fake_ask_both(chunks, question, max_tokens, on_update, engines):
        out = {}
        for e, ttft in zip(engines, (0.2, 0.9), strict=True):
            a = client.Answer(e.name, text="answer", ttft_s=ttft, total_s=ttft + 0.5, n_tokens=5, done=True)
            on_update(a)
            out[e.name] = a
        return out

    monkeypatch.setattr(client, "ask_both", fake_ask_both)
    monkeypatch.setattr(eng, "precompute", lambda e, texts, progress=True: {})
    app = widgets.CompareApp(engines_on_free_ports(), widgets.ChunkPicker(order=["filter_crop"]),
                             retrieve=False)
    app.ask("What does crop do?")
    app.picker.order = ["filter_crop", "filter_scale"]
    app.ask("And scale?")
    assert [r["n"] for r in app.history] == [1, 2]
    assert app.history[1]["order"] == ["filter_crop", "filter_scale"]
    assert app.history[1]["tokens"] == TOKENS["filter_crop"] + TOKENS["filter_scale"]
    assert list(app.chart.data[0].y) == [0.2, 0.2] and list(app.chart.data[1].y) == [0.9, 0.9]
    assert "4.5x sooner" in app.panes.summary
    assert app.results()["ttft_ratio"] == pytest.approx(4.5)
    assert not app.button.disabled
    fig = plots.ttft_history(app.history)
    assert isinstance(fig, go.Figure) and len(fig.data) == 2


def fake_engines(monkeypatch, asked: list):
    """ask_both answers at once, the blend engine reporting its reuse; `asked` gets the chunk texts."""
    def fake_ask_both(chunks, question, max_tokens, on_update, engines):
        asked.append(chunks)
        out = {}
        for e, ttft, info in zip(engines, (0.2, 0.9), ({"n_tokens": 1000, "n_recomputed": 150},
                                                        {"mode": "full", "n_tokens": 1000}), strict=True):
            a = client.Answer(e.name, text="It is 1935.", first_token="It", ttft_s=ttft, total_s=1.0,
                              n_tokens=4, info=info, done=True)
            on_update(a)
            out[e.name] = a
        return out

    monkeypatch.setattr(client, "ask_both", fake_ask_both)
    monkeypatch.setattr(eng, "precompute", lambda e, texts, progress=True: {})


def test_app_retrieves_each_new_question_into_the_picker(monkeypatch):
    asked = []
    fake_engines(monkeypatch, asked)
    app = widgets.CompareApp(engines_on_free_ports(), widgets.ChunkPicker(order=["encoder_flac"]), k=3)
    assert app.retrieve.value and "kvb-retrieve" in app.retrieve._dom_classes
    app.ask("Which TCP port does RTMP use by default?")
    first = app.picker.order
    assert first[0] == "protocol_rtmp" and len(first) == 3
    assert asked[-1] == [corpus.load_chunk(n) for n in first] and app.history[-1]["retrieved"]
    # the same question again keeps the order the user dragged
    app.picker.order = list(reversed(first))
    app.ask("Which TCP port does RTMP use by default?")
    assert app.picker.order == list(reversed(first)) and not app.history[-1]["retrieved"]
    # a new question gets its own chunks, in its own order
    app.ask("What is the default font size of the drawtext filter?")
    assert app.picker.order[0] == "filter_drawtext" and app.history[-1]["order"] == app.picker.order
    # the toggle off: the hand-picked chunks stay
    app.retrieve.value = False
    app.picker.order = ["filter_crop"]
    app.ask("Which port does RTSP use?")
    assert app.picker.order == ["filter_crop"] and asked[-1] == [corpus.load_chunk("filter_crop")]


def test_panes_show_reuse_and_agreement(monkeypatch):
    fake_engines(monkeypatch, [])
    app = widgets.CompareApp(engines_on_free_ports(), widgets.ChunkPicker(), k=2)
    app.ask("Which TCP port does RTMP use by default?")
    panes = {p["name"]: p for p in app.panes.panes}
    assert panes["blend"]["reuse"] == "reused 850 · recomputed 150 of 1000 tokens"
    assert panes["full"]["reuse"] == "computed all 1000 tokens"
    assert app.panes.summary.endswith("Both answers are the same.")
    assert app.history[-1]["blend"]["n_recomputed"] == 150


def test_reuse_line_and_agreement():
    assert widgets.reuse_line({}) == ""  # an engine that reports nothing (vLLM)
    a = client.Answer("blend", text="Yes it is", first_token="Yes")
    b = client.Answer("full", text="Yes, 1935", first_token="Yes")
    c = client.Answer("full", text="No", first_token="No")
    assert "same token, then differ" in widgets.agreement({"blend": a, "full": b})
    assert "differ from the first token" in widgets.agreement({"blend": a, "full": c})
    assert widgets.agreement({"blend": a, "full": client.Answer("full", error="down")}) == ""


def test_picker_offers_recorded_documents(tmp_path, monkeypatch):
    from helpers import library

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "pottery.txt").write_text("Stoneware is fired to cone 10.\n")
    library.record_docs(tmp_path / "docs")  # as launch_engines.sh --docs does
    p = widgets.ChunkPicker(order=["pottery_0", "filter_crop"])
    assert p.chunks[-1] == {"name": "pottery_0", "title": "Stoneware is fired to cone 10.", "tokens": 10}
    assert p.texts()[0] == "Stoneware is fired to cone 10."
    assert p.tokens == 10 + TOKENS["filter_crop"]
    app = widgets.CompareApp(engines_on_free_ports(), p)
    assert app.retriever.search("At which cone is stoneware fired?", 1)[0][0] == "pottery_0"


def test_app_with_engines_down_says_what_to_do():
    app = widgets.CompareApp(engines_on_free_ports(), widgets.ChunkPicker(order=["filter_crop"]))
    answers = app.ask("Anyone there?")
    for a in answers.values():
        assert "not reachable" in a.error and "launch_engines.sh" in a.error
    panes = {p["name"]: p for p in app.panes.panes}
    assert panes["blend"]["state"] == panes["full"]["state"] == "error"
    assert "launch_engines.sh" in panes["full"]["error"]
    assert "did not answer" in app.panes.summary


def test_app_needs_a_question_and_chunks():
    app = widgets.CompareApp(engines_on_free_ports(), widgets.ChunkPicker())
    with pytest.raises(ValueError, match="question"):
        app.ask("")
    with pytest.raises(ValueError, match="Pick at least one chunk"):
        app.ask("Why?")
    app._ask_safely()  # the button's path: the message shows under the panes
    assert app.panes.summary.startswith("Could not ask: Pick at least one chunk")
    assert app.results() == {"history": [], "ttft_ratio": None}


def test_connect_without_engines_explains():
    blend, full = engines_on_free_ports()
    with pytest.raises(runtime.EngineError, match="launch_engines.sh"):
        tutorial.connect("embedded", blend.port, full.port, start=False)


# ------------------------------------------------------------------ charts and scores
def test_live_chart_gains_points():
    fig = plots.ttft_live()
    assert isinstance(fig, go.FigureWidget)
    rec = {"n": 1, "question": "q", "tokens": 10, "blend": {"ttft_s": 0.1}, "full": {"ttft_s": 0.4}}
    plots.add_ttft(fig, rec)
    plots.add_ttft(fig, {**rec, "n": 2, "blend": {"ttft_s": None}})  # an engine that failed: a gap
    assert list(fig.data[0].x) == [1, 2] and list(fig.data[0].y) == [0.1, None]


def test_gpu_csv(tmp_path):
    assert gpu_results.load_gpu_csv(tmp_path / "missing.csv") is None
    path = tmp_path / "h200.csv"
    path.write_text("model_shape,card,prompt_tokens,full_ttft_ms,blend_ttft_ms\n"
                    "7b,2x H200,4000,400,100\n7b,2x H200,8000,900,200\n")
    rows = gpu_results.load_gpu_csv(path)  # no speedup column: computed
    keys = ("run", "label", "shape", "card", "tokens", "full_ms", "blend_ms", "speedup")
    assert {k: rows[0][k] for k in keys} == {
        "run": "2x H200, 7b", "label": "2x H200, 7b", "shape": "7b", "card": "2x H200", "tokens": 4000,
        "full_ms": 400.0, "blend_ms": 100.0, "speedup": 4.0}
    assert isinstance(plots.speedup([{"tokens": 500, "speedup": 2.0}], rows), go.Figure)
    assert isinstance(plots.gpu_ttft(rows), go.Figure)
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="cannot find"):
        gpu_results.load_gpu_csv(path)


def test_gpu_chart_has_one_plain_line_and_a_line_per_path_with_its_crossover(tmp_path):
    path = tmp_path / "h200.csv"
    path.write_text("model_shape,card,prompt_tokens,full_ttft_ms,blend_ttft_ms,blend_path\n"
                    "7b,1x,2000,50,100,fast\n7b,1x,8000,200,100,fast\n"
                    "7b,1x,2000,50,150,upstream\n7b,1x,8000,200,190,upstream\n")
    fig = plots.gpu_ttft(gpu_results.load_gpu_csv(path))
    names = [t.name for t in fig.data]
    assert len(names) == 3 and "plain vLLM" in names[0]
    assert "fast blend (wins past ~3,175 tokens)" in names[1] and "upstream blend" in names[2]
    assert gpu_results.crossover([{"tokens": 2000, "speedup": 2.0}]) is None


def test_latest_runs_are_the_current_truth():
    """Notebook 03's default charts: the latest run per card, shape and path, at most 8 traces, no
    variant, labelled with their card; the speed-up chart never calls an H100 row an H200's."""
    rows = gpu_results.load_gpu_csv(corpus.CORPUS_DIR.parent / "docs" / "benchmarks" / "gpu_ttft.csv")
    latest = gpu_results.latest_runs(rows)
    assert {(r["card"], r["shape"].split()[0], r["blend_path"], r["run_id"]) for r in latest} == {
        ("H200", "7B", "fast", "2026-12-07_h200_7b_fast-upstream"),
        ("H200", "7B", "upstream", "2026-12-07_h200_7b_fast-upstream"),
        ("H200", "34B", "fast", "2026-12-06_h200_34b_fast"),
        ("H100", "7B", "fast", "2026-12-07_h100_7b_fast-upstream"),
        ("H100", "7B", "upstream", "2026-12-07_h100_7b_fast-upstream")}
    ttft = plots.gpu_ttft(latest)
    assert len(ttft.data) <= 8 and all(t.name.startswith(("H200", "H100")) for t in ttft.data)
    speed = plots.speedup([{"tokens": 500, "speedup": 2.0}], latest)
    assert len(speed.data) <= 8
    for t in speed.data[1:]:
        card = "H100" if "H100" in t.name else "H200"
        assert all(r["card"] == card for r in latest if r["label"] in t.name)
    assert len(plots.gpu_ttft(rows).data) > 8  # the history, when asked for


def test_cost_model_fits_the_measured_rows():
    """TTFT = c + r x prefill + l x tokens recovers made-up parameters, keeps l >= 0, and on the
    committed runs explains the crossover: LMCache's blender pays about three times the fast path's
    fixed cost, and the model's crossover is the measured one."""
    made = [{"tokens": n, "full_ms": 0.03 * n + 1e-6 * n * n} for n in (2000, 4000, 8000, 16000)]
    for r in made:
        r["blend_ms"] = 40 + 0.2 * r["full_ms"] + 0.5 * r["tokens"] / 1000
    fit = gpu_results.fit_cost_model(made)
    assert abs(fit["c_ms"] - 40) < 1e-6 and abs(fit["r"] - 0.2) < 1e-9
    assert abs(fit["l_ms_per_1k"] - 0.5) < 1e-6
    csv_path = corpus.CORPUS_DIR.parent / "docs" / "benchmarks" / "gpu_ttft.csv"
    latest = gpu_results.latest_runs(gpu_results.load_gpu_csv(csv_path))
    rows = [r for r in latest if r["shape"].startswith("7B")]
    for card in ("H200", "H100"):
        fast, up = ([r for r in rows if r["card"] == card and r["blend_path"] == p]
                    for p in ("fast", "upstream"))
        f_fast, f_up = gpu_results.fit_cost_model(fast), gpu_results.fit_cost_model(up)
        assert f_fast["l_ms_per_1k"] >= 0 and f_up["l_ms_per_1k"] >= 0
        assert 2.5 < f_up["c_ms"] / f_fast["c_ms"] < 3.5  # docs/gpu.md: "about three times"
        assert 0.15 < f_fast["r"] < 0.35 and f_fast["rmse_ms"] < 10
        cross = gpu_results.model_crossover(f_up, up)
        assert cross and abs(cross / gpu_results.crossover(up) - 1) < 0.25
    assert len(plots.cost_model(latest, "H200").data) <= 8


def test_committed_gpu_measurements_parse():
    path = corpus.CORPUS_DIR.parent / "docs" / "benchmarks" / "gpu_ttft.csv"
    if not path.exists():
        pytest.skip("docs/benchmarks/gpu_ttft.csv not there yet (notebook 03 says so)")
    rows = gpu_results.load_gpu_csv(path)
    assert rows and all(r["tokens"] > 0 and r["speedup"] > 0 for r in rows)


def test_highlighted_text_marks_selected_tokens():
    out = plots.highlighted_text(["a", "<b>", "c"], [1], [0.1, 1.0, 0.5])
    assert out.count('class="kvb-selected"') == 1 and "&lt;b&gt;" in out


def test_f1():
    assert f1("The fourth stream", "the fourth stream") == 1.0
    assert f1("-lavfi", "-lavfi.") == 1.0
    assert f1("nothing", "something") == 0.0
    assert 0 < f1("the stream with most channels", "the stream with the most channels") <= 1


def test_gpu_quality_chart_from_the_committed_csv():
    rows = gpu_results.load_quality_csv(corpus.CORPUS_DIR.parent / "docs" / "benchmarks" / "gpu_quality.csv")
    names = list(plots.gpu_quality(rows).data[0].y)  # the history: every run
    old, new = "H200, 2026-11-29, stored prefix SEP chunk", "H100, 2026-12-06, stored chunk alone"
    for name in (f"vllm: fixed_0.15 (34 prompts, {old})", f"vllm: full_fp32 (121 prompts, {old})",
                 f"vllm: fast_0.15 (121 prompts, {old})", f"vllm: fast_0.15 (121 prompts, {new})",
                 "embedded: blend_0.15 (34 prompts, CPU, 2026-11-29)"):
        assert name in names
    assert len(set(names)) == len(names)  # every bar its own row
    current = list(plots.gpu_quality(gpu_results.latest_quality(rows)).data[0].y)  # latest GPU + CPU runs
    assert f"vllm: fast_0.15 (121 prompts, {new})" in current and not any(old in n for n in current)
    assert "embedded: blend_0.15 (121 prompts, CPU, 2026-11-29)" in current and len(current) == 13
    assert gpu_results.load_quality_csv(corpus.CORPUS_DIR / "missing.csv") is None


def test_default_chunks_fit_the_backend(monkeypatch):
    from helpers import tutorial
    from helpers.runtime import Engine

    tokens = {m["name"]: m["tokens"] for m in corpus.load_manifest()}
    monkeypatch.setattr(tutorial, "_context_length", lambda e: 8192)
    assert tutorial.default_chunks(Engine("blend", 1, "embedded")) == tutorial.SAMPLE_CHUNKS
    gpu = tutorial.default_chunks(Engine("blend", 1, "vllm"))
    assert gpu[:3] == tutorial.SAMPLE_CHUNKS and 6000 < sum(tokens[n] for n in gpu) <= 8192 - 512
    monkeypatch.setattr(tutorial, "_context_length", lambda e: 32768)
    big = tutorial.default_chunks(Engine("blend", 1, "vllm"))
    assert 12000 < sum(tokens[n] for n in big) <= tutorial.CONTEXT_TOKENS["vllm"]


def test_pane_header_shows_the_blend_settings(monkeypatch):
    e = runtime.Engine("blend", 8000, "embedded")
    monkeypatch.setattr(runtime, "health", lambda e: {"ratio": 0.3, "check_layer": 2})
    assert widgets.pane_header(e) == "http://127.0.0.1:8000 · ratio 0.3, check layer 2"
    monkeypatch.setattr(runtime, "health", lambda e: {"status": "ok"})  # e.g. vLLM, or the full engine
    assert widgets.pane_header(e) == "http://127.0.0.1:8000"


def test_vllm_blend_settings_come_from_its_launcher(monkeypatch, tmp_path):
    from helpers.gpu import launch as gpu
    from helpers.settings import GpuBlendSettings

    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path)  # where the engine's LMCache YAML goes
    monkeypatch.setattr(runtime, "health", lambda e: {"status": "ok"})  # vLLM's /health says nothing
    e = gpu.blend_engine("blend", 8000, "m", settings=GpuBlendSettings(path="fixed"), ratio=0.2,
                         check_layer=3, gpu_memory_utilization=0.4, max_model_len=4096)
    assert widgets.pane_header(e) == "http://127.0.0.1:8000 · ratio 0.2, check layer 3, fixed path"
    assert runtime.blend_settings(runtime.Engine("full", 8001, "vllm")) == ""


def test_notebook_02_shows_the_engines_own_selection_code():
    """Notebook 02 quotes the engine's code from the module: it must still find it there."""
    from helpers import walkthrough

    shown = walkthrough.selection_source()
    assert "self.project(layer, h)" in shown and "select_tokens(" in shown
    assert "def select_tokens(" in walkthrough.source("select_tokens")
    assert "def rerotate(" in walkthrough.source("rotate_k", "rerotate")
