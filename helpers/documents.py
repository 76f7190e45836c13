"""Your own documents as chunks: every `.txt` / `.md` file in a folder, split into pieces of a few
hundred tokens, so the engines can cache and blend them like the `ffmpeg/` chunks.

Chunks are named `<file stem>_<index>` (file and position) and measured in SmolLM2 tokens by
`semantic-text-splitter`, which cuts at the largest boundary that fits (sections, paragraphs,
sentences, then words), so no chunk exceeds `max_tokens` however large the file. Anything a user may
get wrong (a missing folder, no text files, binary or empty files) raises `DocumentsError` with a
message meant to be printed as is, or is skipped with a `DocumentsWarning`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

SUFFIXES = (".txt", ".md")
MIN_TOKENS, MAX_TOKENS = 300, 500  # like the ffmpeg/ chunks; far below the model's context


class DocumentsError(ValueError):
    """A documents folder that gives no usable chunks; the message says what to fix."""


class DocumentsWarning(UserWarning):
    """A file in the documents folder that was skipped (binary, not UTF-8, or empty)."""


def load_documents(folder: str | Path, max_tokens: int = MAX_TOKENS, min_tokens: int = MIN_TOKENS,
                   tokenizer=None) -> dict[str, str]:
    """{name: text} for every `.txt` / `.md` file directly in `folder`, files in name order.

    Each chunk has at most `max_tokens` tokens of `tokenizer` (a `tokenizers.Tokenizer`; default
    SmolLM2's) and, except a file's last one, usually at least `min_tokens`.
    """
    files = text_files(folder)
    tok = tokenizer or default_tokenizer()
    splitters = _splitters(tok, (min(min_tokens, max_tokens), max_tokens))
    chunks: dict[str, str] = {}
    owner: dict[str, Path] = {}
    for path in files:
        text = _read_text(path)
        if text is None:
            continue
        if path.stem in owner:
            raise DocumentsError(f"{owner[path.stem].name} and {path.name} in {path.parent} would give "
                                 f"chunks of the same name ({path.stem}_0, ...): rename one of them.")
        owner[path.stem] = path
        for i, piece in enumerate(splitters[path.suffix.lower()].chunks(text)):
            n = len(tok.encode(piece, add_special_tokens=False).ids)
            if n > max_tokens:  # the splitter promises this never happens; a chunk must fit the context
                raise DocumentsError(f"{path.name}: chunk {i} has {n} tokens, more than {max_tokens}.")
            chunks[f"{path.stem}_{i}"] = piece
    if not chunks:
        raise DocumentsError(f"No usable text in {folder}: every .txt/.md file there is empty, binary "
                             "or not UTF-8.")
    return chunks


def text_files(folder: str | Path) -> list[Path]:
    """The `.txt` / `.md` files directly in `folder` (hidden ones left out), in name order."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise DocumentsError(f"Documents folder {folder} does not exist.")
    if not path.is_dir():
        raise DocumentsError(f"{folder} is not a folder: pass a folder of .txt/.md files.")
    files = sorted(p for p in path.iterdir()
                   if p.suffix.lower() in SUFFIXES and p.is_file() and not p.name.startswith("."))
    if not files:
        raise DocumentsError(f"No .txt or .md files in {folder}.")
    return files


def default_tokenizer():
    """SmolLM2's tokenizer (the chunk sizes of `ffmpeg/` are counted in it too), without truncation."""
    from tokenizers import Tokenizer

    root = os.environ.get("KVBLEND_CACHE") or Path(__file__).resolve().parents[1] / ".cache"
    path = Path(root) / "smollm2-f32" / "tokenizer.json"
    if not path.exists():  # not converted yet: let the model loader do it (imports torch)
        from .embedded.model import resolve_model_dir

        path = resolve_model_dir() / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    return tok


def _splitters(tok, capacity: tuple[int, int]) -> dict:
    from semantic_text_splitter import MarkdownSplitter, TextSplitter

    return {".txt": TextSplitter.from_huggingface_tokenizer(tok, capacity),
            ".md": MarkdownSplitter.from_huggingface_tokenizer(tok, capacity)}


def _read_text(path: Path) -> str | None:
    """The file's text, or None (with a warning) if it is binary, not UTF-8, or blank."""
    data = path.read_bytes()
    reason = None
    if b"\x00" in data:
        reason = "binary"
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            reason = "not UTF-8 text"
        else:
            if not text.strip():
                reason = "empty"
    if reason:
        warnings.warn(f"skipping {path.name}: {reason}", DocumentsWarning, stacklevel=3)
        return None
    return text.replace("\r\n", "\n")
