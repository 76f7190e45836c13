"""`./launch_engines.sh --docs DIR` and `tutorial.connect(docs=DIR)`: bad folders stop before any
engine is touched (a message, exit code 2, no traceback); a good one is precomputed, recorded for the
notebooks, and a question about it retrieves it and gets answered from its cached KV."""

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import client, engines, launcher, library, runtime, tutorial
from helpers.documents import DocumentsError
from helpers.retrieval import Retriever

ROOT = Path(__file__).resolve().parents[1]
POTTERY = ("Firing stoneware\n\nStoneware clay vitrifies between cone 6 and cone 10. Glazed ware passes "
           "quartz inversion at 573 degrees Celsius, where cracks start if the kiln cools too fast.\n")


@pytest.fixture
def run_dir_tmp(tmp_path, monkeypatch):
    d = tmp_path / "engines"
    monkeypatch.setattr(runtime, "RUN_DIR", d)
    monkeypatch.setenv("KVBLEND_RUN_DIR", str(d))
    return d


def bad_folders(tmp_path) -> dict[str, Path]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "a.txt").write_bytes(b"\x00\x01\x02")
    (tmp_path / "file.txt").write_text("not a folder")
    return {"does not exist": tmp_path / "missing", "is not a folder": tmp_path / "file.txt",
            "No .txt or .md files": tmp_path / "empty", "No usable text": tmp_path / "binary"}


def test_launcher_refuses_bad_folders_before_starting_anything(tmp_path, run_dir_tmp):
    for message, folder in bad_folders(tmp_path).items():
        # what ./launch_engines.sh runs (it execs this module with the repository's Python)
        p = subprocess.run([sys.executable, "-m", "helpers.launcher", "start", "--docs", str(folder),
                            "--backend", "embedded", "--blend-port", "1", "--full-port", "2"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (message, p.stdout, p.stderr)
        assert message in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not any(run_dir_tmp.glob("*.json")), "an engine was started or a pid file written"


@pytest.mark.filterwarnings("ignore::helpers.documents.DocumentsWarning")
def test_connect_refuses_bad_folders_before_starting_anything(tmp_path, run_dir_tmp, monkeypatch):
    monkeypatch.setattr(engines, "start", lambda *a, **k: pytest.fail("engines started"))
    for message, folder in bad_folders(tmp_path).items():
        with pytest.raises(DocumentsError, match=message):
            tutorial.connect("embedded", 1, 2, docs=folder)


@pytest.fixture
def forget_docs():
    """The session's engines serve only ffmpeg/ again after the test (other tests share them)."""
    yield
    library.record_docs(None)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::helpers.documents.DocumentsWarning")  # broken.md: the launcher notes it
def test_docs_are_precomputed_offered_and_retrieved(live_engines, tmp_path, monkeypatch, capsys, forget_docs):
    blend, full = live_engines["blend"], live_engines["full"]
    (tmp_path / "pottery.txt").write_text(POTTERY)
    (tmp_path / "broken.md").write_bytes(b"\xff\xfe\x00")
    sent = []
    monkeypatch.setattr(engines, "precompute", lambda e, texts, progress=True: sent.extend(texts) or
                        {"tokens": 0, "computed": len(texts)})
    # the launcher finds the running test engines (same ports, same command line) and reuses them
    rc = launcher.main(["start", "--backend", "embedded", "--blend-port", str(blend.port),
                       "--full-port", str(full.port), "--no-disk-cache", "--docs", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "note: skipping broken.md: binary" in captured.err
    assert "your documents: 1 chunks" in captured.out
    assert POTTERY.strip() in sent and len(sent) == 60  # the 59 ffmpeg chunks and the document
    assert engines.find("blend").pid == blend.pid  # the same engine, not a new one
    assert library.recorded_docs() == str(tmp_path.resolve())
    monkeypatch.undo()

    # connect(docs=...) computes the documents' KV for real; the picker's library offers them
    tutorial.connect("embedded", blend.port, full.port, start=False, docs=tmp_path)
    lib = library.current()
    assert lib.doc_names() == ["pottery_0"]
    question = "At what temperature is quartz inversion in a stoneware kiln?"
    names = [n for n, _ in Retriever(lib.texts).search(question, 3)]
    assert names[0] == "pottery_0"
    answers = client.ask_one_by_one([lib.texts[n] for n in names], question, max_tokens=4,
                                    engines=(blend, full))
    b = answers["blend"]
    assert not b.error and not answers["full"].error
    assert b.info["chunk_misses"] <= 2 and b.info["n_tokens"] - b.info["n_recomputed"] > 0


def test_stop_forgets_the_documents(tmp_path, run_dir_tmp):
    library.record_docs(tmp_path)
    assert library.recorded_docs() == str(tmp_path.resolve())
    assert launcher.main(["stop"]) == 0
    assert library.recorded_docs() is None
