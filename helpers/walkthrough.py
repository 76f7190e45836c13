"""The measurements behind notebook 02, on the embedded engine in this process (no server): each
step of CacheBlend taken apart on one RAG prompt, and the recompute ratio swept on a few QA items.

TTFT here is the prefill up to the first token's logits, with every chunk's KV already cached (as it
would be on a server that has seen the chunks before, in any order).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from . import corpus
from .embedded.blend import ModelRunner
from .metrics import f1, kl
from .prompts import chat_segments
from .settings import BLEND, BlendSettings


def load_runner(model: str | None = None) -> ModelRunner:
    from .embedded.model import load_model

    mdl, tok, path = load_model(model)
    return ModelRunner(mdl, tok, model_id=str(path))


@dataclass
class Example:
    """One RAG prompt: chat prefix, chunks, question, as token-id segments (the engine's input)."""

    names: list[str]  # the chunks, in prompt order
    question: str
    answer: str  # the QA file's answer
    segments: list[list[int]]  # [chat prefix, *chunks, question + assistant header]

    @property
    def ids(self) -> list[int]:
        return [i for s in self.segments for i in s]

    @property
    def n_cached(self) -> int:
        return sum(len(s) for s in self.segments[:-1])

    @property
    def segment_names(self) -> list[str]:
        return ["chat prefix", *self.names, "question"]


def example(runner: ModelRunner, qa_index: int = 0, n_tokens: int = 1500, seed: int = 0) -> Example:
    """QA item `qa_index` with its chunk in the middle of other chunks (at least one) adding up to
    about n_tokens."""
    qa = corpus.load_qa()[qa_index]
    sizes = {m["name"]: m["tokens"] for m in corpus.load_manifest()}
    names = corpus.pick_chunks(max(n_tokens - sizes[qa["chunk"]], 1), seed=seed, exclude=[qa["chunk"]])
    names.insert(len(names) // 2, qa["chunk"])
    return Example(names, qa["question"], qa["answer"],
                   chat_segments(runner, [corpus.load_chunk(n) for n in names], qa["question"]))


def token_strings(runner: ModelRunner, ids: list[int]) -> list[str]:
    return [runner.tok.decode([i]) for i in ids]


# ------------------------------------------------------------------ step 1: each chunk alone
def chunk_kv_table(runner: ModelRunner, ex: Example) -> list[dict]:
    """Compute (or find) every cached segment's KV on its own; one row per segment."""
    rows = []
    for name, seg in zip(ex.segment_names, ex.segments[:-1], strict=False):
        t0 = time.perf_counter()
        kv, hit = runner.chunk_kv(seg)
        rows.append({"segment": name, "tokens": len(seg), "kv_shape": tuple(kv.shape),
                     "MB": kv.numel() * kv.element_size() / 1e6, "cached_before": hit,
                     "ms": (time.perf_counter() - t0) * 1e3})
    return rows


# ------------------------------------------------------------------ the next token, three ways
def top_tokens(runner: ModelRunner, logits: torch.Tensor, k: int = 8) -> list[tuple[str, float]]:
    p = torch.softmax(logits.float(), -1)
    vals, idx = torch.topk(p, k)
    return [(runner.tok.decode([int(i)]), float(v)) for v, i in zip(vals, idx, strict=True)]


def next_token_logits(runner: ModelRunner, ex: Example, reference, ratio: float = BLEND.ratio,
                      check_layer: int = BLEND.check_layer) -> dict[str, torch.Tensor]:
    """Next-token logits of the full prefill `reference`, of naive reuse (r = 0) and of blending."""
    return {"full": reference.logits,
            "reuse": runner.blend_prefill(ex.segments, BlendSettings(0.0, check_layer)).logits,
            "blend": runner.blend_prefill(ex.segments, BlendSettings(ratio, check_layer)).logits}


# ------------------------------------------------------------------ step 2: RoPE re-rotation
def rope_errors(runner: ModelRunner, ex: Example, reference, segment: int = -2) -> list[dict]:
    """Per layer: relative error of one cached chunk's K against the K that `reference` (a full
    prefill of ex) holds for the same tokens, with the cached K left at positions 0..n-1 and
    re-rotated to where the chunk sits. Layer 0 re-rotated is exact (positions are the only
    difference there); deeper layers drift because the chunk never attended to what precedes it."""
    seg = ex.segments[segment]
    start = sum(len(s) for s in ex.segments[:segment % len(ex.segments)])
    kv, _ = runner.chunk_kv(seg)
    rows = []
    for i in range(runner.n_layers):
        ref = reference.k[i][:, start:start + len(seg)]
        err = {name: float(torch.linalg.norm(runner.rerotate(kv[i, 0], at) - ref) / torch.linalg.norm(ref))
               for name, at in (("unrotated", 0), ("rerotated", start))}
        rows.append({"layer": i, **err})
    return rows


# ------------------------------------------------------------------ step 3: deviation and selection
def explain(runner: ModelRunner, ex: Example, ratio: float, reference: torch.Tensor,
            check_layer: int = BLEND.check_layer, deviation: str = BLEND.deviation) -> dict:
    """One blended prefill at `ratio`: which cached tokens it recomputes and why (their KV deviation
    at the check layer, on V or K), how long it took, and how its next token compares with
    `reference` (the full prefill's logits). With r = 0 nothing is checked; the deviation shown is
    the same one any r > 0 would measure."""
    t0 = time.perf_counter()
    cfg = BlendSettings(ratio, check_layer, deviation=deviation)
    out = runner.blend_prefill(ex.segments, cfg, explain=True)
    ms = (time.perf_counter() - t0) * 1e3
    dev = out.info.get("deviation")
    if dev is None:  # r = 0 skips the check: measure it with the smallest r > 0
        probe = runner.blend_prefill(ex.segments, BlendSettings(1e-9, check_layer, deviation=deviation),
                                     explain=True)
        dev = probe.info["deviation"]
    n = ex.n_cached
    return {"ratio": ratio, "deviation": dev, "selected": [p for p in out.info.get("selected", []) if p < n],
            "ttft_ms": ms, "kl": kl(reference, out.logits),
            "top1": bool(out.logits.argmax() == reference.argmax()),
            "next_token": runner.tok.decode([int(out.logits.argmax())]),
            "timings_ms": out.info["timings_ms"]}


# ------------------------------------------------------------------ answers and the ratio sweep
def generate(runner: ModelRunner, ex: Example, cfg: BlendSettings | None = None,
             max_new: int = 24) -> tuple[str, float, torch.Tensor]:
    """Greedy answer with a full prefill (cfg None) or a blended one: (text, prefill ms, first logits)."""
    tok = runner.tok
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    t0 = time.perf_counter()
    state = (runner.full_prefill(ex.ids, room=max_new) if cfg is None
             else runner.blend_prefill(ex.segments, cfg, room=max_new))
    ms = (time.perf_counter() - t0) * 1e3
    first, out = state.logits.clone(), []
    for _ in range(max_new):
        nxt = int(state.logits.argmax())
        if nxt in stop:
            break
        out.append(nxt)
        if len(out) < max_new:
            runner.decode_step(state, nxt)
    return tok.decode(out, skip_special_tokens=True).strip(), ms, first


def prefill_ms(runner: ModelRunner, ex: Example, cfg: BlendSettings | None, repeats: int = 1) -> float:
    """Best of `repeats` prefill times: the minimum is the least disturbed by other work on the
    machine, which matters on a shared CPU."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.full_prefill(ex.ids) if cfg is None else runner.blend_prefill(ex.segments, cfg)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def ratio_sweep(runner: ModelRunner, examples: list[Example], ratios=(0, 0.05, 0.15, 0.3, 1.0),
                check_layer: int = BLEND.check_layer, max_new: int = 24, repeats: int = 2,
                log=print) -> list[dict]:
    """For each ratio (and the full prefill): TTFT (median over the examples of the best of
    `repeats` prefills), first-token agreement and KL against the full prefill, answer F1 against
    the QA file and against the full prefill's own answer."""
    per: dict = {}
    for j, ex in enumerate(examples):
        for seg in ex.segments[:-1]:
            runner.chunk_kv(seg)  # warm: the TTFT of a server that has seen these chunks
        ref_text, ref_ms, ref = generate(runner, ex, None, max_new)
        runs = [("full", 1.0, None, ref_text, ref_ms, ref)]
        for r in ratios:
            cfg = BlendSettings(r, check_layer)
            runs.append(("blend", r, cfg, *generate(runner, ex, cfg, max_new)))
        for method, r, cfg, text, ms, logits in runs:
            d = per.setdefault((method, r), {"ttft_ms": [], "top1": [], "kl": [], "f1": [], "f1_vs_full": [],
                                             "answers": []})
            d["ttft_ms"].append(min(ms, prefill_ms(runner, ex, cfg, repeats - 1)) if repeats > 1 else ms)
            d["top1"].append(float(logits.argmax() == ref.argmax()))
            d["kl"].append(kl(ref, logits))
            d["f1"].append(f1(text, ex.answer))
            d["f1_vs_full"].append(f1(text, ref_text))
            d["answers"].append(text)
        log(f"item {j + 1}/{len(examples)}: {ex.question!r} -> full prefill says {ref_text!r}")
    rows = []
    for (method, r), d in per.items():
        rows.append({"method": method, "ratio": r, "ttft_ms": statistics.median(d["ttft_ms"]),
                     **{k: statistics.mean(d[k]) for k in ("top1", "kl", "f1", "f1_vs_full")},
                     "answers": d["answers"]})
    return rows


def headline(rows: list[dict], ratio: float) -> dict:
    """The sweep's key numbers: TTFT of the full prefill vs blending at the swept ratio nearest
    `ratio`, and their quotient."""
    blend = min((r for r in rows if r["method"] == "blend"), key=lambda r: abs(r["ratio"] - ratio))
    full = next(r for r in rows if r["method"] == "full")
    return {"ratio": blend["ratio"], "ttft_full_ms": full["ttft_ms"], "ttft_blend_ms": blend["ttft_ms"],
            "ttft_ratio": full["ttft_ms"] / blend["ttft_ms"], "kl": blend["kl"], "top1": blend["top1"]}


# ------------------------------------------------------------------ the code itself, and K or V
def source(*names: str) -> str:
    """The source of `ModelRunner` methods (or of `helpers.selection`'s functions) by name, as a
    Markdown code block (notebook 02 shows the engine's own code, so the text cannot drift from it)."""
    import inspect
    import textwrap

    from . import selection

    parts = [textwrap.dedent(inspect.getsource(getattr(ModelRunner, n, None) or getattr(selection, n)))
             for n in names]
    return "```python\n" + "\n".join(parts) + "```"


def selection_source() -> str:
    """The lines of the engine's blend (`ModelRunner.blend_cached`) that measure the deviation at the
    check layer and select the tokens to recompute, as a Markdown code block."""
    import inspect
    import textwrap

    lines = inspect.getsource(ModelRunner.blend_cached).splitlines()
    start = next(i for i, line in enumerate(lines) if "q, k, v = self.project(layer, h)" in line)
    end = next(i for i, line in enumerate(lines) if "select_tokens(" in line)
    return "```python\n" + textwrap.dedent("\n".join(lines[start:end + 1])) + "\n```"


GAP_STUDY = corpus.CORPUS_DIR.parent / "docs" / "benchmarks" / "blend_gap_study.csv"


def k_or_v(path=GAP_STUDY) -> list[dict]:
    """Top-20 KL to a full prefill at r = 0.15, selecting by V against by K, from one run of
    `scripts/blend_gap_study.py` (the same blend function and prompts for both): one row per
    condition measured both ways."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[tuple, dict] = {}
    for r in rows:
        cond, _, by = r["condition"].rpartition(", ")
        by = by.split()[0]
        if by not in ("k", "v") or not r["ratio"]:
            continue
        row = out.setdefault((cond, r["prompts"]), {"conditions": cond, "prompts": int(r["prompts"])})
        row[f"by {by.upper()}"] = float(r["top20_kl_mean"])
    return [r for r in out.values() if "by K" in r and "by V" in r]
