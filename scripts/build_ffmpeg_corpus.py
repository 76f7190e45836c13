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

# (slug, source "page#anchor" (the heading's `#` link), title line)
TOPICS = [
    # ffmpeg, the command line tool
    ("ffmpeg_overview", "ffmpeg.html#Description", "ffmpeg: overview of the command line tool"),
    ("ffmpeg_filtergraphs", "ffmpeg.html#Filtering", "ffmpeg: simple and complex filtergraphs"),
    ("ffmpeg_stream_selection", "ffmpeg.html#Description-1", "ffmpeg: stream selection"),
    ("ffmpeg_stream_specifiers", "ffmpeg.html#Stream-specifiers-1", "ffmpeg: stream specifiers"),
    ("ffmpeg_main_options", "ffmpeg.html#Main-options", "ffmpeg: main options"),
    ("ffmpeg_video_options", "ffmpeg.html#Video-Options", "ffmpeg: video options"),
    ("ffmpeg_audio_options", "ffmpeg.html#Audio-Options", "ffmpeg: audio options"),
    ("ffmpeg_preset_files", "ffmpeg.html#Preset-files", "ffmpeg: preset files"),
    # ffprobe and ffplay
    ("ffprobe_overview", "ffprobe.html#Description", "ffprobe: overview of the multimedia stream analyzer"),
    ("ffprobe_main_options", "ffprobe.html#Main-options", "ffprobe: main options"),
    ("ffprobe_compact_csv_writer", "ffprobe.html#compact_002c-csv", "ffprobe: compact and csv writers"),
    ("ffplay_main_options", "ffplay.html#Main-options", "ffplay: main options"),
    ("ffplay_advanced_options", "ffplay.html#Advanced-options", "ffplay: advanced options"),
    # shared syntax and libraries
    (
        "syntax_quoting_escaping",
        "ffmpeg-utils.html#Quoting-and-escaping",
        "FFmpeg syntax: quoting and escaping",
    ),
    ("syntax_video_size", "ffmpeg-utils.html#Video-size", "FFmpeg syntax: video size abbreviations"),
    ("syntax_channel_layout", "ffmpeg-utils.html#Channel-Layout", "FFmpeg syntax: channel layouts"),
    ("syntax_expressions", "ffmpeg-utils.html#Expression-Evaluation", "FFmpeg syntax: expression evaluation"),
    ("scaler_options", "ffmpeg-scaler.html#Scaler-Options", "libswscale: scaler options"),
    ("resampler_options", "ffmpeg-resampler.html#Resampler-Options", "libswresample: resampler options"),
    # codecs
    ("encoder_aac", "ffmpeg-codecs.html#aac", "aac: native AAC audio encoder"),
    ("encoder_libmp3lame", "ffmpeg-codecs.html#libmp3lame-1", "libmp3lame: MP3 audio encoder"),
    ("encoder_libopus", "ffmpeg-codecs.html#libopus-1", "libopus: Opus audio encoder"),
    ("encoder_flac", "ffmpeg-codecs.html#flac-2", "flac: FLAC audio encoder"),
    ("encoder_libx264", "ffmpeg-codecs.html#libx264_002c-libx264rgb", "libx264: H.264 video encoder"),
    ("encoder_libx265", "ffmpeg-codecs.html#libx265", "libx265: H.265/HEVC video encoder"),
    ("encoder_libsvtav1", "ffmpeg-codecs.html#libsvtav1", "libsvtav1: AV1 video encoder"),
    ("encoder_prores", "ffmpeg-codecs.html#ProRes", "prores: Apple ProRes video encoder"),
    ("encoder_libwebp", "ffmpeg-codecs.html#libwebp", "libwebp: WebP image encoder"),
    ("decoder_dvdsub", "ffmpeg-codecs.html#dvdsub", "dvdsub: DVD subtitle decoder"),
    ("bsf_setts", "ffmpeg-bitstream-filters.html#setts", "setts: bitstream filter to set timestamps"),
    # formats (muxers and demuxers)
    ("demuxer_hls", "ffmpeg-formats.html#hls-1", "hls: HTTP Live Streaming demuxer"),
    ("demuxer_image2", "ffmpeg-formats.html#image2-1", "image2: image file demuxer"),
    ("demuxer_concat", "ffmpeg-formats.html#concat-1", "concat: concatenation script demuxer"),
    ("muxer_mp4", "ffmpeg-formats.html#mov_002c-mp4_002c-ismv", "mov, mp4, ismv: MOV/MP4 muxer"),
    ("muxer_matroska", "ffmpeg-formats.html#matroska", "matroska: Matroska muxer"),
    ("muxer_mp3", "ffmpeg-formats.html#mp3", "mp3: MP3 muxer"),
    (
        "muxer_segment",
        "ffmpeg-formats.html#segment_002c-stream_005fsegment_002c-ssegment",
        "segment: segment muxer",
    ),
    ("muxer_tee", "ffmpeg-formats.html#tee-1", "tee: tee muxer"),
    # protocols and devices
    ("protocol_file", "ffmpeg-protocols.html#file", "file: file access protocol"),
    ("protocol_udp", "ffmpeg-protocols.html#udp", "udp: UDP protocol"),
    ("protocol_rtmp", "ffmpeg-protocols.html#rtmp", "rtmp: Real-Time Messaging Protocol"),
    ("protocol_rtsp", "ffmpeg-protocols.html#rtsp", "rtsp: Real-Time Streaming Protocol"),
    ("device_v4l2", "ffmpeg-devices.html#video4linux2_002c-v4l2", "video4linux2: Linux video capture device"),
    ("device_x11grab", "ffmpeg-devices.html#x11grab", "x11grab: X11 screen capture input device"),
    # filters
    ("filter_scale", "ffmpeg-filters.html#scale-1", "scale: video filter to resize"),
    ("filter_overlay", "ffmpeg-filters.html#overlay-1", "overlay: video filter to overlay videos"),
    ("filter_crop", "ffmpeg-filters.html#crop", "crop: video filter to crop"),
    ("filter_drawtext", "ffmpeg-filters.html#drawtext-1", "drawtext: video filter to draw text"),
    ("filter_fps", "ffmpeg-filters.html#fps-1", "fps: video filter to change the frame rate"),
    ("filter_fade", "ffmpeg-filters.html#fade", "fade: video fade-in/fade-out filter"),
    ("filter_xfade", "ffmpeg-filters.html#xfade", "xfade: video cross fade filter"),
    ("filter_transpose", "ffmpeg-filters.html#transpose-1", "transpose: video rotation filter"),
    ("filter_palettegen", "ffmpeg-filters.html#palettegen-1", "palettegen: palette generation filter"),
    ("filter_concat", "ffmpeg-filters.html#concat", "concat: filter to concatenate audio and video streams"),
    ("filter_setpts", "ffmpeg-filters.html#setpts_002c-asetpts", "setpts, asetpts: timestamp filters"),
    ("filter_volume", "ffmpeg-filters.html#volume", "volume: audio filter to adjust the volume"),
    ("filter_loudnorm", "ffmpeg-filters.html#loudnorm", "loudnorm: EBU R128 loudness normalization"),
    ("filter_amix", "ffmpeg-filters.html#amix", "amix: audio filter to mix inputs"),
    ("filter_silencedetect", "ffmpeg-filters.html#silencedetect", "silencedetect: silence detection filter"),
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
    "item" (a list item). ASCII-art diagrams are dropped. Headings start a new Section; the "#" and
    "TOC" links inside them are dropped.
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
        if kind == "pre" and "___" in raw:
            return  # an ASCII-art diagram: meaningless once whitespace is normalised
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
    """Title line, then one paragraph per block; an option name (<dt>) shares its paragraph with the
    names and the first paragraph that follow it."""
    paragraphs = [title]
    for i, (_, text) in enumerate(blocks):
        if i > 0 and blocks[i - 1][0] == "term":
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
    if len(kept) < len(blocks):  # cut: end neither on a heading, an option name nor an "e.g.:" line
        while kept and (kept[-1][0] in ("heading", "term") or kept[-1][1].endswith(":")):
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
                if not s.anchor:
                    continue  # the table of contents
                n = count(render(s.title, section_blocks(sections_of(page), s.anchor)))
                print(f"{n:6d}  {'  ' * s.level}{page}#{s.anchor}  {s.title}")
        return

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for slug, source, title in TOPICS:
        page, anchor = source.split("#")
        text = build_chunk(title, section_blocks(sections_of(page), anchor), count)
        n = count(text)
        if not MIN_TOKENS <= n <= MAX_TOKENS:
            sys.exit(f"{slug}: {n} tokens, outside {MIN_TOKENS}-{MAX_TOKENS}: pick another section")
        bad = [s for s in FORBIDDEN if s in text]
        if bad:
            sys.exit(f"{slug}: contains {bad}")
        (args.out / f"{slug}.txt").write_text(text, encoding="utf-8")
        manifest.append({"name": slug, "file": f"{slug}.txt", "title": title, "source": source, "tokens": n})
    for stale in sorted(set(args.out.glob("*.txt")) - {args.out / m["file"] for m in manifest}):
        stale.unlink()
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    total = sum(m["tokens"] for m in manifest)
    print(f"{len(manifest)} chunks, {total} tokens, written to {args.out}")


if __name__ == "__main__":
    main()
