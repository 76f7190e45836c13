"""The ffmpeg/ corpus: manifest vs files, chunk sizes and contents, QA pairs, pick_chunks."""

from collections import Counter

import pytest

from helpers.corpus import CORPUS_DIR, load_chunk, load_chunks, load_manifest, load_qa, pick_chunks

MANIFEST = load_manifest()
MAX_CHUNK = max(m["tokens"] for m in MANIFEST)


def test_manifest_matches_files():
    assert 30 <= len(MANIFEST) <= 60
    names = [m["name"] for m in MANIFEST]
    assert len(set(names)) == len(names)
    assert {m["file"] for m in MANIFEST} == {p.name for p in CORPUS_DIR.glob("*.txt")}
    for m in MANIFEST:
        assert m["file"] == f"{m['name']}.txt"
        assert m["title"] and "#" in m["source"]
        assert 300 <= m["tokens"] <= 900


def test_chunk_text():
    chunks = load_chunks()
    assert list(chunks) == [m["name"] for m in MANIFEST]
    for m in MANIFEST:
        text = chunks[m["name"]]
        assert text.splitlines()[0] == m["title"]
        assert " # # " not in text and "<|im_" not in text
        assert "\n\n\n" not in text and "&lt;" not in text and "&amp;" not in text


def test_token_counts_match_tokenizer():
    from helpers.embedded.model import load_tokenizer

    tok = load_tokenizer()
    for m in MANIFEST:
        assert len(tok.encode(load_chunk(m["name"]), add_special_tokens=False)) == m["tokens"], m["name"]


def test_qa_answers_are_in_their_chunk():
    qa = load_qa()
    assert len(qa) >= 100  # enough for retrieval recall and answer F1 to mean something
    names = {m["name"] for m in MANIFEST}
    for q in qa:
        assert set(q) == {"question", "answer", "chunk"}, q
        assert q["chunk"] in names, q
        assert q["question"].endswith("?")
        assert q["answer"].lower() in load_chunk(q["chunk"]).lower(), q


def test_qa_questions_are_distinct_and_spread():
    qa = load_qa()
    questions = [" ".join(q["question"].lower().split()) for q in qa]
    assert len(set(questions)) == len(questions)
    per_chunk = Counter(q["chunk"] for q in qa)
    assert len(per_chunk) >= 0.9 * len(MANIFEST)  # most chunks are asked about
    assert max(per_chunk.values()) <= 5  # and no chunk dominates


@pytest.mark.parametrize("target", [1000, 2000, 4000, 8000])
@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_pick_chunks_hits_target(target, seed):
    tokens = {m["name"]: m["tokens"] for m in MANIFEST}
    names = pick_chunks(target, seed=seed)
    assert len(set(names)) == len(names)
    assert abs(sum(tokens[n] for n in names) - target) <= MAX_CHUNK


def test_pick_chunks_exclude_and_seed():
    excluded = [m["name"] for m in MANIFEST[:5]]
    names = pick_chunks(4000, seed=3, exclude=excluded)
    assert not set(names) & set(excluded)
    assert names == pick_chunks(4000, seed=3, exclude=excluded)
    assert len(pick_chunks(10)) == 1
