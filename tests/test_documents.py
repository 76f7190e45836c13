"""A folder of the user's own documents: chunking, names, sizes, and every kind of bad input."""

import warnings

import pytest

from helpers.corpus import load_chunks
from helpers.documents import DocumentsError, DocumentsWarning, default_tokenizer, load_documents
from helpers.retrieval import Retriever

POTTERY = """Firing stoneware

Stoneware clay vitrifies between cone 6 and cone 10. A bisque firing to cone 04 comes first and
leaves the pots porous enough to take glaze. Glazed ware is then fired slowly through quartz
inversion at 573 degrees Celsius, where cracks start if the kiln cools too fast.
"""
BEES = """# Hive inspections

Open the hive on a warm, calm day. Look for eggs, which show the queen laid within three days,
and for queen cells along the bottom bars, which announce a swarm.
"""


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def n_tokens(tok, text):
    return len(tok.encode(text, add_special_tokens=False).ids)


def test_good_folder(tmp_path, tok):
    (tmp_path / "pottery.txt").write_text(POTTERY)
    (tmp_path / "bees.MD").write_text(BEES)
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4 not read")
    (tmp_path / ".hidden.txt").write_text("left out")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deeper.txt").write_text("only the folder itself is read")
    docs = load_documents(tmp_path, tokenizer=tok)
    assert list(docs) == ["bees_0", "pottery_0"]
    assert docs["pottery_0"] == POTTERY.strip()
    assert docs["bees_0"].startswith("# Hive inspections")


def test_question_about_a_doc_retrieves_it_first(tmp_path):
    (tmp_path / "pottery.txt").write_text(POTTERY)
    (tmp_path / "bees.md").write_text(BEES)
    lib = load_chunks() | load_documents(tmp_path)  # next to the ffmpeg chunks, as the engines offer them
    r = Retriever(lib)
    assert r.search("At what temperature is quartz inversion in a stoneware kiln?", 4)[0][0] == "pottery_0"
    assert r.search("What do queen cells in a hive announce?", 4)[0][0] == "bees_0"


def test_large_file_is_split_under_the_limit(tmp_path, tok):
    big = "\n\n".join(load_chunks().values())  # the whole ffmpeg corpus, ~36k tokens, as one file
    (tmp_path / "manual.txt").write_text(big)
    docs = load_documents(tmp_path, tokenizer=tok)
    sizes = [n_tokens(tok, t) for t in docs.values()]
    assert list(docs) == [f"manual_{i}" for i in range(len(docs))]
    assert len(docs) > 50 and max(sizes) <= 500
    assert sorted(sizes)[len(sizes) // 2] >= 300  # chunks are filled, not shredded
    # every word of the file is kept, in order
    assert " ".join(" ".join(docs.values()).split()) == " ".join(big.split())


def test_one_long_line_is_split_too(tmp_path, tok):
    (tmp_path / "blob.txt").write_text("x" * 20000)  # no boundary at all
    docs = load_documents(tmp_path, max_tokens=400, tokenizer=tok)
    assert len(docs) > 1 and all(n_tokens(tok, t) <= 400 for t in docs.values())


def test_missing_folder(tmp_path):
    with pytest.raises(DocumentsError, match="does not exist"):
        load_documents(tmp_path / "nope")


def test_not_a_folder(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("text")
    with pytest.raises(DocumentsError, match="is not a folder"):
        load_documents(f)


def test_no_text_files(tmp_path):
    (tmp_path / "slides.pdf").write_bytes(b"%PDF")
    with pytest.raises(DocumentsError, match=r"No \.txt or \.md files"):
        load_documents(tmp_path)


def test_binary_and_empty_files_are_skipped(tmp_path, tok):
    (tmp_path / "a_binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "b_latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "c_empty.md").write_text("")
    (tmp_path / "d_blank.txt").write_text("  \n\n ")
    (tmp_path / "pottery.txt").write_text(POTTERY)
    with pytest.warns(DocumentsWarning) as caught:
        docs = load_documents(tmp_path, tokenizer=tok)
    assert list(docs) == ["pottery_0"]
    messages = sorted(str(w.message) for w in caught)
    assert messages == ["skipping a_binary.txt: binary", "skipping b_latin1.txt: not UTF-8 text",
                        "skipping c_empty.md: empty", "skipping d_blank.txt: empty"]


def test_nothing_usable(tmp_path, tok):
    (tmp_path / "a.txt").write_bytes(b"\x00\x01\x02")
    (tmp_path / "b.md").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DocumentsWarning)
        with pytest.raises(DocumentsError, match="No usable text"):
            load_documents(tmp_path, tokenizer=tok)


def test_same_stem_twice(tmp_path, tok):
    (tmp_path / "notes.txt").write_text("one")
    (tmp_path / "notes.md").write_text("two")
    with pytest.raises(DocumentsError, match="rename one"):
        load_documents(tmp_path, tokenizer=tok)


def test_utf8_bom_and_crlf(tmp_path, tok):
    (tmp_path / "win.txt").write_bytes("\ufeffline one\r\nline two\r\n".encode())
    assert load_documents(tmp_path, tokenizer=tok) == {"win_0": "line one\nline two"}
