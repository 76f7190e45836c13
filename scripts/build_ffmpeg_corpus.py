"""Build the `ffmpeg/` text corpus from the FFmpeg HTML manual (Debian package `ffmpeg-doc`).

    apt-get install ffmpeg-doc
    .venv/bin/python scripts/build_ffmpeg_corpus.py            # writes ffmpeg/*.txt + manifest.json
    .venv/bin/python scripts/build_ffmpeg_corpus.py --list     # every section with its token count

Each chunk is one section of the manual (a filter, a muxer, a codec's options, ...) picked by hand
in TOPICS below, turned into plain text: one title line, then paragraphs separated by blank lines.
A section longer than MAX_TOKENS is cut at a paragraph boundary; one shorter than MIN_TOKENS is an
error (pick another section). Token counts use the SmolLM2 tokenizer of `helpers.embedded.model`.
Only the standard library is used, plus that tokenizer; the output is deterministic.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANUAL_DIR = Path("/usr/share/doc/ffmpeg/manual")
OUT_DIR = ROOT / "ffmpeg"
MIN_TOKENS, MAX_TOKENS = 300, 900
FORBIDDEN = (" # # ", "<|im_")  # the benchmarks' chunk separator and chat-template markers

# (slug, title line, html page, section anchor). The anchor is the `#...` link of the heading.
TOPICS = [
    # ffmpeg tool
    ("ffmpeg_filtergraphs", "ffmpeg: simple and complex filtergraphs", "ffmpeg.html", "Filtering"),
    ("ffmpeg_stream_copy", "ffmpeg: stream copy", "ffmpeg.html", "Stream-copy"),
    ("ffmpeg_stream_selection", "ffmpeg: stream selection", "ffmpeg.html", "Description-1"),
    ("ffmpeg_stream_specifiers", "ffmpeg: stream specifiers", "ffmpeg.html", "Stream-specifiers-1"),
    ("ffmpeg_audio_options", "ffmpeg: audio options", "ffmpeg.html", "Audio-Options"),
    ("ffmpeg_preset_files", "ffmpeg: preset files", "ffmpeg.html", "Preset-files"),
]


@dataclass
class Section:
    """One heading of a manual page and the text blocks up to the next heading."""

    page: str
    anchor: str
    title: str
    level: int  # 1 for <h2> (chapter), 2 for <h3> (section), ...
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (kind, text)


class ManualParser(HTMLParser):
    """Split a texi2html page into Sections of plain-text blocks.

    Block kinds: "p" (paragraph), "pre" (example, line breaks kept), "term" (a <dt> option name),
    "item" (a list item). Headings start a new Section; the "#"/"TOC" links inside them are dropped.
    """

    BLOCK_TAGS = {"p", "pre", "dt", "dd", "li", "ul", "ol", "dl", "div", "table", "tr", "blockquote", "br"}
    HEADINGS = {"h2": 1, "h3": 2, "h4": 3, "h5": 4}

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.page = page
        self.sections: list[Section] = []
        self.buf: list[str] = []
        self.kind = "p"
        self.pre_depth = 0
        self.heading: tuple[int, str] | None = None  # (level, anchor) while inside <h2>..<h5>
        self.skip_depth = 0  # inside <head>, <script>, <style> or a heading's "pull-right" span

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.skip_depth:
            if tag == "span" or tag in ("head", "script", "style"):
                self.skip_depth += 1
            if self.heading and tag == "a" and self.heading[1] == "":
                href = attrs.get("href") or ""
                if href.startswith("#") and not href.startswith("#toc-"):
                    self.heading = (self.heading[0], href[1:])
            return
        if tag in ("head", "script", "style"):
            self.skip_depth = 1
        elif tag in self.HEADINGS:
            self.flush()
            self.heading = (self.HEADINGS[tag], "")
        elif self.heading and tag == "span" and "pull-right" in (attrs.get("class") or ""):
            self.skip_depth = 1
        elif tag in self.BLOCK_TAGS:
            self.flush()
            if tag == "pre":
                self.pre_depth += 1
                self.kind = "pre"
            elif tag == "dt":
                self.kind = "term"
            elif tag == "li":
                self.kind = "item"

    def handle_endtag(self, tag):
        if self.skip_depth:
            if tag == "span" or tag in ("head", "script", "style"):
                self.skip_depth -= 1
            return
        if tag in self.HEADINGS and self.heading:
            title = re.sub(r"^[A-Z]?[\d.]+\s+", "", clean(" ".join(self.buf)))
            level, anchor = self.heading
            self.sections.append(Section(self.page, anchor, title, level))
            self.buf, self.heading = [], None
        elif tag in self.BLOCK_TAGS:
            if tag == "pre":
                self.pre_depth -= 1
            self.flush()

    def handle_data(self, data):
        if not self.skip_depth:
            self.buf.append(data)

    def flush(self):
        """End the current block and store it in the current section."""
        raw, kind = "".join(self.buf), self.kind
        if not raw.strip():
            self.buf = []  # nothing yet: keep the kind (e.g. a <li> whose text is in a nested <p>)
            return
        self.buf, self.kind = [], "pre" if self.pre_depth else "p"
        if self.heading or not self.sections:
            return  # text of a heading, or before the first heading (page title, table of contents)
        if kind == "pre":
            text = "\n".join(clean(line) for line in raw.splitlines() if line.strip())
        else:
            text = clean(raw)
        if not text or text.startswith("This document was generated using"):
            return
        if kind == "item":
            text = "- " + text
        self.sections[-1].blocks.append((kind, text))


def clean(text: str) -> str:
    """Collapse whitespace, use ASCII quotes, drop texinfo's "(ffmpeg-xxx)" cross-manual prefixes."""
    text = text.translate({0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"', 0xA0: " "})
    text = re.sub(r"\((?:ffmpeg|ffprobe|ffplay)[a-z-]*\)(?=\S)", "", text)
    return re.sub(r"\s+", " ", text).strip()


def parse_page(path: Path) -> list[Section]:
    parser = ManualParser(path.name)
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    parser.flush()
    return parser.sections


def section_blocks(sections: list[Section], anchor: str) -> list[tuple[str, str]]:
    """The blocks of the section `anchor` and of all its subsections, subsection titles included."""
    start = next(i for i, s in enumerate(sections) if s.anchor == anchor)
    blocks = list(sections[start].blocks)
    for sub in sections[start + 1 :]:
        if sub.level <= sections[start].level:
            break
        blocks.append(("heading", sub.title))
        blocks.extend(sub.blocks)
    return blocks


def render(title: str, blocks: list[tuple[str, str]]) -> str:
    """Title line, then one paragraph per block; consecutive option names share one paragraph."""
    paragraphs = [title]
    for i, (kind, text) in enumerate(blocks):
        if kind == "term" and i > 0 and blocks[i - 1][0] == "term":
            paragraphs[-1] += "\n" + text
        else:
            paragraphs.append(text)
    return "\n\n".join(paragraphs) + "\n"


def build_chunk(title: str, blocks: list[tuple[str, str]], count) -> str:
    """Render the section, cut after the last whole block that fits in MAX_TOKENS."""
    kept: list[tuple[str, str]] = []
    for block in blocks:
        if count(render(title, kept + [block])) > MAX_TOKENS:
            break
        kept.append(block)
    while kept and kept[-1][0] in ("heading", "term"):  # no dangling heading or option name
        kept.pop()
    return render(title, kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manual-dir", type=Path, default=MANUAL_DIR)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--list", action="store_true", help="print every section and its size, write nothing")
    args = ap.parse_args()
    if not args.manual_dir.is_dir():
        sys.exit(f"{args.manual_dir} not found: apt-get install ffmpeg-doc (or pass --manual-dir)")

    sys.path.insert(0, str(ROOT))
    from helpers.embedded.model import load_tokenizer

    tok = load_tokenizer()

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    pages: dict[str, list[Section]] = {}

    def sections_of(page: str) -> list[Section]:
        if page not in pages:
            pages[page] = parse_page(args.manual_dir / page)
        return pages[page]

    if args.list:
        for page in sorted(p.name for p in args.manual_dir.glob("ff*.html") if "-all" not in p.name):
            for s in sections_of(page):
                n = count(render(s.title, section_blocks(sections_of(page), s.anchor)))
                print(f"{n:6d}  {'  ' * s.level}{page}#{s.anchor}  {s.title}")
        return

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for slug, title, page, anchor in TOPICS:
        text = build_chunk(title, section_blocks(sections_of(page), anchor), count)
        n = count(text)
        if not MIN_TOKENS <= n <= MAX_TOKENS:
            sys.exit(f"{slug}: {n} tokens, outside {MIN_TOKENS}-{MAX_TOKENS}: pick another section")
        bad = [s for s in FORBIDDEN if s in text]
        if bad:
            sys.exit(f"{slug}: contains {bad}")
        (args.out / f"{slug}.txt").write_text(text, encoding="utf-8")
        manifest.append(
            {"name": slug, "file": f"{slug}.txt", "title": title, "source": f"{page}#{anchor}", "tokens": n}
        )
    for stale in sorted(set(args.out.glob("*.txt")) - {args.out / m["file"] for m in manifest}):
        stale.unlink()
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    total = sum(m["tokens"] for m in manifest)
    print(f"{len(manifest)} chunks, {total} tokens, written to {args.out}")


if __name__ == "__main__":
    main()
