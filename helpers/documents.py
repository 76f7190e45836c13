"""Your own documents as chunks: every `.txt` / `.md` file in a folder, split into pieces of a few
hundred tokens, so the engines can cache and blend them like the `ffmpeg/` chunks.

Chunks are named `<file stem>_<index>` (file and position) and measured in SmolLM2 tokens by
`semantic-text-splitter`, which cuts at the largest boundary that fits (sections, paragraphs,
sentences, then words), so no chunk exceeds `max_tokens` however large the file. Anything a user may
get wrong (a missing folder, no text files, binary or empty files) raises `DocumentsError` with a
message meant to be printed as is, or is skipped with a `DocumentsWarning`.

The folder is read safely: only regular files that really are inside it (a symlink that leads out,
to /etc/passwd or elsewhere, is skipped), at most `MAX_FILE_BYTES` per file and `MAX_TOTAL_BYTES` in
all (sizes are checked before anything is read), a binary file is recognized from its first bytes,
and the chunk separator `" # # "` inside a document is written `" ## "` (`prompts.escape_separator`),
so a chunk is never cut apart in a prompt.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from .prompts import escape_separator
from .runtime import cache_dir

SUFFIXES = (".txt", ".md")
MIN_TOKENS, MAX_TOKENS = 300, 500  # like the ffmpeg/ chunks; far below the model's context
MAX_FILE_BYTES = 2 << 20  # 2 MB of text is ~1,300 chunks: more than a tutorial's engine precomputes
MAX_TOTAL_BYTES = 8 << 20  # ~5,000 chunks: about an hour of precompute on 2 CPU cores
SNIFF_BYTES = 8192  # a NUL byte in these means a binary file: skipped without reading the rest


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
    for path in _progress(files):
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
            chunks[f"{path.stem}_{i}"] = escape_separator(piece)
    if not chunks:
        raise DocumentsError(f"No usable text in {folder}: every .txt/.md file there is empty, binary "
                             "or not UTF-8.")
    return chunks


def text_files(folder: str | Path) -> list[Path]:
    """The `.txt` / `.md` files directly in `folder` (hidden ones left out), in name order: regular
    files inside the folder only (a symlink leading out of it is skipped with a warning), within the
    size caps (checked from the file system, before reading)."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise DocumentsError(f"Documents folder {folder} does not exist.")
    if not path.is_dir():
        raise DocumentsError(f"{folder} is not a folder: pass a folder of .txt/.md files.")
    try:
        entries = sorted(p for p in path.iterdir()
                         if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
    except OSError as err:
        raise DocumentsError(f"Cannot list {folder}: {err.strerror or err}.") from err
    root, files, total = path.resolve(), [], 0
    for p in entries:
        real = p.resolve()
        if real.parent != root or not real.is_file():
            if p.is_symlink():
                warnings.warn(f"skipping {p.name}: a link to {real}, outside {folder}", DocumentsWarning,
                              stacklevel=2)
            continue
        size = real.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DocumentsError(f"{p.name} is {size / 1e6:.1f} MB, over the {MAX_FILE_BYTES / 1e6:.1f} MB a "
                                 "document may have: split it into smaller files, or leave it out.")
        total += size
        if total > MAX_TOTAL_BYTES:
            raise DocumentsError(f"{folder} holds over {MAX_TOTAL_BYTES / 1e6:.1f} MB of .txt/.md text (at "
                                 f"{p.name}): every chunk's KV is computed at start, so give a folder of "
                                 "the documents you want to ask about.")
        files.append(p)
    if not files:
        raise DocumentsError(f"No .txt or .md files in {folder}.")
    return files


def _progress(files: list[Path]):
    """The files, with a progress bar on stderr when splitting them takes a while (over 1 MB)."""
    if sum(p.stat().st_size for p in files) < 1 << 20:
        return files
    from tqdm.auto import tqdm

    return tqdm(files, desc="splitting your documents", unit="file", file=sys.stderr)


def default_tokenizer():
    """SmolLM2's tokenizer (the chunk sizes of `ffmpeg/` are counted in it too), without truncation."""
    from tokenizers import Tokenizer

    path = cache_dir() / "smollm2-f32" / "tokenizer.json"
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
    with open(path, "rb") as f:
        data = f.read(SNIFF_BYTES)
        if b"\x00" not in data:
            data += f.read(MAX_FILE_BYTES)
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
