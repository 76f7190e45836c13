"""The `ffmpeg/` text corpus: chunks of the FFmpeg manual, their manifest and QA pairs.

Built by `scripts/build_ffmpeg_corpus.py`. Every chunk is one topic of 300-900 SmolLM2 tokens;
`manifest.json` lists them in a fixed order with their token counts.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parents[1] / "ffmpeg"


@lru_cache(maxsize=1)
def _manifest() -> tuple[dict, ...]:
    return tuple(json.loads((CORPUS_DIR / "manifest.json").read_text(encoding="utf-8")))


def load_manifest() -> list[dict]:
    """Entries {"name", "file", "title", "source", "tokens"}, in corpus order."""
    return [dict(m) for m in _manifest()]


def load_chunk(name: str) -> str:
    """The text of one chunk, by name (e.g. "filter_scale")."""
    return (CORPUS_DIR / f"{name}.txt").read_text(encoding="utf-8")


def load_chunks(names: list[str] | None = None) -> dict[str, str]:
    """{name: text} for `names` (default: all chunks), in manifest order."""
    wanted = None if names is None else set(names)
    unknown = set() if wanted is None else wanted - {m["name"] for m in _manifest()}
    if unknown:
        raise KeyError(f"unknown chunks: {sorted(unknown)}")
    return {m["name"]: load_chunk(m["name"]) for m in _manifest() if wanted is None or m["name"] in wanted}


def load_qa() -> list[dict]:
    """Questions {"question", "answer", "chunk"}: each answerable from its one chunk."""
    return json.loads((CORPUS_DIR / "qa.json").read_text(encoding="utf-8"))


def pick_chunks(n_tokens_target: int, seed: int | None = None, exclude=()) -> list[str]:
    """Chunk names whose token counts add up to about `n_tokens_target` (within one chunk).

    Goes through the chunks in manifest order, or shuffled with `seed`, skipping `exclude`, and keeps
    each chunk that brings the total closer to the target. At least one chunk is picked; a target
    above the corpus size gets every chunk.
    """
    pool = [m for m in _manifest() if m["name"] not in set(exclude)]
    if seed is not None:
        random.Random(seed).shuffle(pool)
    picked, total = [], 0
    for m in pool:
        if not picked or abs(total + m["tokens"] - n_tokens_target) < abs(total - n_tokens_target):
            picked.append(m["name"])
            total += m["tokens"]
    return picked
