"""The RAG trace: its bookkeeping on made-up answers, and a short trace on the embedded engines."""

import pytest

from helpers import bench, plots, rag
from helpers.client import Answer
from helpers.corpus import load_manifest, load_qa


def test_prefix_shares():
    tokens = {"a": 100, "b": 200, "c": 300}
    orders = [["a", "b"], ["b", "a"], ["a", "b", "c"], ["a", "c"], []]
    # a prefix cache serves only leading chunks an earlier prompt had in the same places
    assert rag.prefix_shares(orders, tokens) == [0.0, 0.0, 0.5, 0.25, 0.0]


def answer(engine, text, first, ttft, info=None):
    return Answer(engine, text=text, first_token=first, ttft_s=ttft, prompt_tokens=1000, info=info or {},
                  done=True)


def test_question_row_and_summary():
    q = {"question": "Which TCP port does RTMP use by default?", "answer": "1935", "chunk": "protocol_rtmp"}
    b = answer("blend", "It uses 1935.", "It", 0.5, {"n_tokens": 1000, "n_recomputed": 150})
    f = answer("full", "It uses port 1935.", "It", 2.0)
    row = rag.question_row(1, q, ["protocol_rtmp", "protocol_udp"], b, f)
    assert row["hit"] and row["ttft_ratio"] == 4.0
    assert (row["reused_tokens"], row["recomputed_tokens"], row["reuse"]) == (850, 150, 0.85)
    assert row["first_token_agree"] and not row["same_answer"]
    # the gold "1935" is one of 3 and of 4 words
    assert row["blend_f1"] == pytest.approx(0.5) and row["full_f1"] == pytest.approx(0.4)
    miss = rag.question_row(2, q, ["protocol_udp"], answer("blend", "No", "No", 1.0),
                            answer("full", "Yes", "Yes", 1.5))
    assert not miss["hit"] and miss["reuse"] is None and not miss["first_token_agree"]
    s = rag.summarize([row, miss], {"protocol_rtmp": 500, "protocol_udp": 500})
    assert s["median_ttft_ratio"] == pytest.approx((4.0 + 1.5) / 2)
    assert s["mean_reuse"] == 0.85 and s["first_token_agreement"] == 0.5 and s["recall_at_k"] == 0.5
    assert s["time_saved_s"] == pytest.approx(2.0) and s["prefix_cache_share"] == 0.0
    assert "median TTFT ratio (full / blend) 2.75x" in rag.format_summary(s)
    assert rag.format_row(row).startswith("  1") and "*protocol_rtmp" in rag.format_row(row)
    assert len(plots.rag_trace([row, miss]).data) == 3


@pytest.mark.slow
def test_short_trace_on_embedded_engines(live_engines, capsys):
    engines = (live_engines["blend"], live_engines["full"])
    rows = rag.run_trace(engines, n_questions=6, k=3, max_tokens=8, progress=False)
    tokens = {m["name"]: m["tokens"] for m in load_manifest()}
    s = rag.summarize(rows, tokens)
    print(rag.format_summary(s))
    assert [r["n"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert len({tuple(r["retrieved"]) for r in rows}) == 6  # a new set and order for every question
    for r in rows:
        assert 1 <= len(r["retrieved"]) <= 3 and r["prompt_tokens"] > 300
        assert r["blend_ttft_s"] > 0 and r["full_ttft_s"] > 0
        assert r["reused_tokens"] + r["recomputed_tokens"] == r["prompt_tokens"]
        assert 0.5 < r["reuse"] < 1  # the chunks' KV is reused, ~15% of it and the question recomputed
        assert r["full_answer"].strip()
    assert s["recall_at_k"] >= 5 / 6
    assert s["median_ttft_ratio"] > 1  # blending answers sooner on a warm trace
    assert s["prefix_cache_share"] < s["mean_reuse"]
    out = capsys.readouterr().out
    assert out.count("\n") >= 6 and "median TTFT ratio" in out


@pytest.mark.slow
def test_bench_rag_cli(live_engines, capsys):
    blend, full = live_engines["blend"], live_engines["full"]
    bench.main(["rag", "--questions", "2", "-k", "2", "--max-tokens", "4",
                "--blend-port", str(blend.port), "--full-port", str(full.port)])
    out = capsys.readouterr().out
    assert f"BM25 recall@2 over the {len(load_qa())} QA questions" in out  # the retriever, every question
    assert "median TTFT ratio" in out
    assert len([ln for ln in out.splitlines() if ln[:3] in ("  1", "  2")]) == 2  # one line per question


@pytest.mark.slow
def test_bench_engines_cli_on_given_ports(live_engines, tmp_path, capsys, monkeypatch):
    """`bench engines` measures the engines on --blend-port/--full-port (the test's own ports, not
    :8000/:8001; run from another run dir, so only the ports can find them) and writes its summary row."""
    import csv

    from helpers import runtime

    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path / "elsewhere")
    blend, full = live_engines["blend"], live_engines["full"]
    out = tmp_path / "ttft.csv"
    assert bench.main(["engines", "--sizes", "256", "--repeats", "1", "--csv", str(out),
                       "--blend-port", str(blend.port), "--full-port", str(full.port)]) in (0, None)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and float(rows[0]["full_ms"]) > 0 and float(rows[0]["blend_ms"]) > 0, rows
    assert "speed-up" in capsys.readouterr().out
