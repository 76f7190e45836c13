"""BM25 retrieval: recall on ffmpeg/qa.json, the Retriever API, and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from helpers.corpus import load_chunks, load_qa
from helpers.retrieval import Retriever, build_retriever, tokenize

ROOT = Path(__file__).resolve().parents[1]
RECALL_FLOOR = 0.85  # BM25 top-4 holds the gold chunk for >= 85% of the QA questions


def recall_at(retriever: Retriever, k: int) -> float:
    qa = load_qa()
    hits = sum(q["chunk"] in [n for n, _ in retriever.search(q["question"], k)] for q in qa)
    return hits / len(qa)


def test_recall_at_4_on_qa():
    r = build_retriever()
    recall = recall_at(r, 4)
    print(f"BM25 recall@4 on {len(load_qa())} questions: {recall:.1%} (recall@1 {recall_at(r, 1):.1%})")
    assert recall >= RECALL_FLOOR


def test_tokenize():
    words = tokenize("What is the default frame_rate of -vf?")
    assert words == ["default", "frame_rate", "frame", "rate", "vf"]
    assert tokenize("Which one, and how?") == ["one"]


def test_search_is_ranked_and_bounded():
    r = Retriever(load_chunks())
    hits = r.search("Which setpts expression applies a slow motion effect?", k=5)
    assert hits[0][0] == "filter_setpts"
    assert len(hits) == 5 and len({n for n, _ in hits}) == 5
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    assert len(r.search("slow motion", k=500)) <= len(r.names)
    assert r.search("the of and", k=4) == []  # nothing but stopwords
    assert r.search("zyxwvut qwertyuiop", k=4) == []  # no shared word: no match


def test_orders_differ_between_questions():
    r = build_retriever()
    a = [n for n, _ in r.search("How does the volume filter compute the output audio volume?", 4)]
    b = [n for n, _ in r.search("Which overlay expression draws the overlay in the corner?", 4)]
    assert a != b and a[0] == "filter_volume" and b[0] == "filter_overlay"


def test_small_corpus():
    r = Retriever({"bees": "Bees make honey in hives.", "clay": "Clay is fired in a kiln."})
    assert [n for n, _ in r.search("where is clay fired?", 4)] == ["clay"]
    with pytest.raises(ValueError):
        Retriever({})


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "helpers.retrieval", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_ffmpeg():
    p = run_cli("-k", "3", "What is the default font size of the drawtext filter?")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == "filter_drawtext"


def test_cli_docs(tmp_path):
    (tmp_path / "pottery.txt").write_text("Stoneware glaze is fired to cone 10 in a gas kiln.\n")
    (tmp_path / "bees.md").write_text("# Bees\n\nA hive inspection every week in spring.\n")
    p = run_cli("--docs", str(tmp_path), "-k", "2", "At which cone is stoneware glaze fired?")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["pottery_0"]  # bees shares no word with the question


def test_cli_bad_docs(tmp_path):
    p = run_cli("--docs", str(tmp_path / "nope"), "anything")
    assert p.returncode == 2
    assert "does not exist" in p.stderr and "Traceback" not in p.stderr
