"""A RAG trace: the QA questions in sequence, each retrieving its own top-k chunks in score order, sent
to the blend and the full engine one after the other.

This is the workload blending is for: every question brings a different set of chunks in a different
order, so a prefix cache reuses next to nothing while the blend engine reuses every chunk's KV. Per
question the trace records both TTFTs, how many prompt tokens the blend engine reused, whether the
two answers agree, and each answer's F1 against the gold answer of `ffmpeg/qa.json`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from . import corpus
from . import engines as eng
from .client import Answer, ask_one_by_one
from .metrics import f1
from .retrieval import Retriever
from .runtime import Engine, EngineError, health


def plan(questions: Sequence[dict], retriever: Retriever, k: int = 4) -> list[list[str]]:
    """The chunk names each question retrieves, best first (its prompt order)."""
    return [[name for name, _ in retriever.search(q["question"], k)] for q in questions]


def prefix_shares(orders: Sequence[Sequence[str]], tokens: dict[str, int]) -> list[float]:
    """Per prompt, the share of its chunk tokens a prefix cache could serve: the longest run of leading
    chunks it has in common with an earlier prompt (a prefix cache matches from the first token on)."""
    shares = []
    for i, order in enumerate(orders):
        best = 0
        for earlier in orders[:i]:
            n = 0
            while n < min(len(order), len(earlier)) and order[n] == earlier[n]:
                n += 1
            best = max(best, n)
        total = sum(tokens[c] for c in order)
        shares.append(sum(tokens[c] for c in order[:best]) / total if total else 0.0)
    return shares


def question_row(n: int, q: dict, order: list[str], blend: Answer, full: Answer) -> dict:
    """One question of the trace, as a flat record (JSON-able)."""
    info = blend.info or {}
    total, recomputed = info.get("n_tokens"), info.get("n_recomputed")
    reused = total - recomputed if total is not None and recomputed is not None else None
    return {
        "n": n, "question": q["question"], "gold_chunk": q["chunk"], "retrieved": order,
        "hit": q["chunk"] in order, "prompt_tokens": full.prompt_tokens,
        "blend_ttft_s": blend.ttft_s, "full_ttft_s": full.ttft_s,
        "ttft_ratio": full.ttft_s / blend.ttft_s if blend.ttft_s and full.ttft_s else None,
        "reused_tokens": reused, "recomputed_tokens": recomputed,
        "reuse": reused / total if reused is not None and total else None,
        "first_token_agree": blend.first_token == full.first_token,
        "same_answer": blend.text.strip() == full.text.strip(),
        "blend_f1": f1(blend.text, q["answer"]), "full_f1": f1(full.text, q["answer"]),
        "blend_answer": blend.text, "full_answer": full.text, "gold_answer": q["answer"],
    }


def check_roles(engines: Sequence[Engine]) -> None:
    """Each engine is the one its name says (an engine that reports its mode on /health, as the
    embedded ones do): swapped ports would report a negative time saved. Raises EngineError."""
    for e in engines:
        h = health(e)
        if h is None:
            raise EngineError(f"No {e.name} engine answers at {e.url}: start the engines with "
                              "`./launch_engines.sh`, or give the port it runs on.")
        mode = h.get("mode")
        if mode is not None and mode != e.name:
            raise EngineError(f"The engine at {e.url} is a {mode} engine, not the {e.name} engine: check "
                              "--blend-port and --full-port (are they swapped?).")


def run_trace(engines: tuple[Engine, Engine], n_questions: int = 20, k: int = 4, max_tokens: int = 16,
              chunks: dict[str, str] | None = None, questions: Sequence[dict] | None = None,
              progress: bool = True, log: Callable[[str], None] | None = print) -> list[dict]:
    """Ask the first `n_questions` QA questions, each about its own top-`k` chunks, to both engines.

    The chunks' KV is precomputed on the blend engine first (as `launch_engines.sh` does for the whole
    library), so the trace measures a warm RAG service, not its first start."""
    check_roles(engines)
    chunks = chunks if chunks is not None else corpus.load_chunks()
    questions = list(questions if questions is not None else corpus.load_qa())[:n_questions]
    orders = plan(questions, Retriever(chunks), k)
    blend = next(e for e in engines if e.name == "blend")
    eng.precompute(blend, list(dict.fromkeys(chunks[c] for o in orders for c in o)), progress=progress)
    rows = []
    for i, (q, order) in enumerate(zip(questions, orders, strict=True), 1):
        res = ask_one_by_one([chunks[c] for c in order], q["question"], max_tokens, engines=engines)
        for a in res.values():
            if a.error:
                raise EngineError(a.error)
        rows.append(question_row(i, q, order, res["blend"], res["full"]))
        if log:
            log(format_row(rows[-1]))
    return rows


HEADER = (f"{'#':>3} {'tokens':>6} {'full s':>7} {'blend s':>7} {'ratio':>6} {'reuse':>6} {'1st':>4} "
          f"{'F1 b/f':>9}  top-k (* = holds the gold chunk)")


def format_row(r: dict) -> str:
    reuse = f"{r['reuse']:.0%}" if r["reuse"] is not None else "-"
    ratio = f"{r['ttft_ratio']:.2f}x" if r["ttft_ratio"] else "-"
    return (f"{r['n']:>3} {r['prompt_tokens'] or 0:>6} {r['full_ttft_s']:>7.2f} {r['blend_ttft_s']:>7.2f} "
            f"{ratio:>6} {reuse:>6} {'=' if r['first_token_agree'] else 'x':>4} "
            f"{r['blend_f1']:>4.2f}/{r['full_f1']:<4.2f}  {'*' if r['hit'] else ' '}"
            f"{', '.join(r['retrieved'])}")


def summarize(rows: Sequence[dict], tokens: dict[str, int] | None = None) -> dict:
    """The trace in a few numbers: median TTFT ratio (full / blend), mean reuse, agreement, recall@k,
    F1 of both engines, the time blending saved, and (given chunk token counts) the share of chunk
    tokens a prefix cache could have served on the same prompts."""
    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.mean(vals) if vals else None

    ratios = [r["ttft_ratio"] for r in rows if r["ttft_ratio"]]
    out = {
        "questions": len(rows),
        "median_ttft_ratio": statistics.median(ratios) if ratios else None,
        "mean_reuse": mean("reuse"),
        "first_token_agreement": mean("first_token_agree"),
        "same_answer": mean("same_answer"),
        "recall_at_k": mean("hit"),
        "blend_f1": mean("blend_f1"), "full_f1": mean("full_f1"),
        "time_saved_s": sum(r["full_ttft_s"] - r["blend_ttft_s"] for r in rows),
    }
    if tokens is not None:
        out["prefix_cache_share"] = statistics.mean(prefix_shares([r["retrieved"] for r in rows], tokens))
    return out


def format_summary(s: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    lines = [
        f"{s['questions']} questions: median TTFT ratio (full / blend) "
        + ("-" if s["median_ttft_ratio"] is None else f"{s['median_ttft_ratio']:.2f}x"),
        f"blend reused {pct(s['mean_reuse'])} of the prompt tokens on average"
        + (f" (a prefix cache could serve {pct(s['prefix_cache_share'])} of the chunk tokens)"
           if "prefix_cache_share" in s else ""),
        f"first token agrees on {pct(s['first_token_agreement'])}, whole answer on {pct(s['same_answer'])}",
        f"answer F1 vs qa.json: blend {s['blend_f1']:.2f}, full {s['full_f1']:.2f}; "
        f"retrieval recall@k {pct(s['recall_at_k'])}",
        f"time to first token saved over the trace: {s['time_saved_s']:.1f} s",
    ]
    return "\n".join(lines)
