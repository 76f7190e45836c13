"""The chunks on offer to the picker, the retriever and the blend engine: the `ffmpeg/` corpus, plus
the chunks of a folder of your own documents when one is given.

`./launch_engines.sh --docs DIR` and `tutorial.connect(docs=DIR)` record DIR next to the engines'
pid files, so a notebook that connects later offers the same chunks without being told.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import corpus, runtime
from .documents import DocumentsError, DocumentsWarning, default_tokenizer, load_documents


@dataclass
class Library:
    texts: dict[str, str]  # name -> chunk text, ffmpeg/ first, then the documents
    entries: list[dict]  # the picker's rows: {"name", "title", "tokens"}, same order
    docs: str | None = None  # the documents folder, if any

    @property
    def tokens(self) -> dict[str, int]:
        return {e["name"]: e["tokens"] for e in self.entries}

    def doc_names(self) -> list[str]:
        """The names of the documents' chunks (none without a folder)."""
        ffmpeg = {m["name"] for m in corpus.load_manifest()}
        return [n for n in self.texts if n not in ffmpeg]


def load(docs: str | Path | None = None) -> Library:
    """The ffmpeg/ chunks, plus those of the documents folder `docs` if given.

    Raises `documents.DocumentsError` for a folder that gives no chunks."""
    texts = corpus.load_chunks()
    entries = [{k: m[k] for k in ("name", "title", "tokens")} for m in corpus.load_manifest()]
    if docs is None:
        return Library(texts, entries)
    mine = load_documents(docs)
    clash = sorted(set(mine) & set(texts))
    if clash:
        raise DocumentsError(f"Chunk names {clash} are taken by ffmpeg/ chunks: rename those files.")
    tok = default_tokenizer()
    for name, text in mine.items():
        first = text.strip().splitlines()[0].lstrip("# ").strip()
        entries.append({"name": name, "title": first[:70] or name,
                        "tokens": len(tok.encode(text, add_special_tokens=False).ids)})
    return Library(texts | mine, entries, str(Path(docs).expanduser().resolve()))


def current() -> Library:
    """The chunks the running engines were given: ffmpeg/ plus the recorded documents folder, if any
    (only ffmpeg/, with a warning, if that folder no longer gives chunks)."""
    docs = recorded_docs()
    try:
        return load(docs)
    except DocumentsError as err:
        warnings.warn(f"{err} Offering only the ffmpeg/ chunks.", DocumentsWarning, stacklevel=2)
        return load()


# ------------------------------------------------------------------ which folder the engines hold
def _record_path() -> Path:
    return runtime.RUN_DIR / "docs.json"


def record_docs(docs: str | Path | None) -> None:
    """Remember which documents folder the blend engine has precomputed (None: only ffmpeg/)."""
    path = _record_path()
    try:
        if docs is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise runtime.unusable_run_dir(err) from err
    runtime.write_atomic(path, json.dumps({"docs": str(Path(docs).expanduser().resolve())}))


def check_docs(docs: str | None) -> None:
    """Refuse to give running engines a second documents folder: the record names one folder, so a
    notebook would silently offer the other launcher's chunks. Raises DocumentsError."""
    held = recorded_docs()
    blend = runtime.read_pidfile("blend")
    if docs and held and held != str(docs) and blend and runtime.owns(blend):
        raise DocumentsError(f"The running engines hold the documents of {held}, not {docs}. Stop them "
                             f"first (`./launch_engines.sh stop`), or pass --docs {held}.")


def recorded_docs() -> str | None:
    """The documents folder last given to the running engines, if any."""
    try:
        return json.loads(_record_path().read_text())["docs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
