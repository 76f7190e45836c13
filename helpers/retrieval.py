"""Retrieval for RAG: BM25 over chunks picks the top-k for a question, best first.

In real RAG every question retrieves a different set of chunks in a different order, which is what
defeats a prefix cache and what blending is for. BM25 (`bm25s`) needs no model weights and finds the
gold chunk of `ffmpeg/qa.json` in its top 4 for most questions (`tests/test_retrieval.py` measures it).

    python -m helpers.retrieval [--docs DIR] [-k K] QUESTION

prints the top-k chunk names, one per line, best first: of the `ffmpeg/` corpus, or with `--docs`
of the `.txt`/`.md` files in DIR (see helpers.documents).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import bm25s
from bm25s.stopwords import STOPWORDS_EN

_WORD = re.compile(r"\w+")
_STOP = frozenset(STOPWORDS_EN) | {"which", "what", "how", "does", "do"}  # question words say nothing


def tokenize(text: str) -> list[str]:
    """Lowercase words, English stopwords and question words out; `frame_rate` also gives `frame`, `rate`.

    Option names join words with `_` (and FFmpeg's `-` splits them anyway), so a question that says
    "frame rate" still meets the chunk that documents `frame_rate`.
    """
    words = []
    for w in _WORD.findall(text.lower()):
        parts = [p for p in w.split("_") if p]
        for t in ([w] + parts if len(parts) > 1 else parts):
            if t not in _STOP:
                words.append(t)
    return words


class Retriever:
    """BM25 over {name: text}; `search` gives the best chunks for a question."""

    def __init__(self, chunks: dict[str, str]):
        if not chunks:
            raise ValueError("Retriever needs at least one chunk")
        self.names = list(chunks)
        self._bm25 = bm25s.BM25()
        self._bm25.index([tokenize(t) or [""] for t in chunks.values()], show_progress=False)

    def search(self, question: str, k: int = 4) -> list[tuple[str, float]]:
        """Up to `k` (name, score) pairs, best first; chunks sharing no word with the question left out."""
        words = tokenize(question)
        k = min(int(k), len(self.names))
        if not words or k < 1:
            return []
        docs, scores = self._bm25.retrieve([words], k=k, show_progress=False)
        return [(self.names[d], float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]


def build_retriever(docs: str | Path | None = None) -> Retriever:
    """A retriever over the `ffmpeg/` chunks, or with `docs` over that folder's documents."""
    if docs is None:
        from .corpus import load_chunks

        return Retriever(load_chunks())
    from .documents import load_documents

    return Retriever(load_documents(docs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.retrieval", description=__doc__.split("\n\n")[0])
    ap.add_argument("question")
    ap.add_argument("-k", type=int, default=4, help="how many chunks (default 4)")
    ap.add_argument("--docs", metavar="DIR", help="search the .txt/.md files in DIR instead of ffmpeg/")
    args = ap.parse_args(argv)
    if args.k < 1 or not args.question.strip():
        print(f"{ap.prog}: error: " + ("-k must be at least 1" if args.k < 1 else "the question is empty"),
              file=sys.stderr)
        return 2
    import warnings

    from .documents import DocumentsError, DocumentsWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DocumentsWarning)
            retriever = build_retriever(args.docs)
        for w in caught:
            print(f"note: {w.message}", file=sys.stderr)
    except DocumentsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, _ in retriever.search(args.question, args.k):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
