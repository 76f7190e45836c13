"""Benchmarks, printed as tables of numbers measured side by side in one run.

    python -m helpers.bench blend    # in-process: full prefill vs blend vs full reuse, TTFT + fidelity
    python -m helpers.bench engines  # against the running engines on :8000 / :8001, over HTTP
                                     # (--csv PATH writes the summary; the README's CPU table is
                                     # checked against docs/benchmarks/cpu_ttft.csv)
    python -m helpers.bench rag      # a RAG trace: QA questions in sequence, each with its own top-k
    python -m helpers.bench load     # both engines under a sweep of request rates (helpers/load.py)

Absolute times depend on the machine; read the ratios.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import corpus
from .metrics import kl
from .prompts import chat_segments
from .runtime import EngineError, run_cli
from .settings import BLEND, BlendSettings


# ------------------------------------------------------------------ prompts from the corpus
def rag_prompts(n_tokens: int, n_prompts: int, seed: int = 0) -> list[tuple[list[str], str]]:
    """`n_prompts` (chunks, question) pairs: chunks adding up to about n_tokens, shuffled into a new
    order each time, and a question from the QA file about one of them where possible."""
    qa = corpus.load_qa()
    rng = random.Random(seed)
    out = []
    for i in range(n_prompts):
        names = corpus.pick_chunks(n_tokens, seed=seed * 1000 + i)
        rng.shuffle(names)
        about = [q for q in qa if q["chunk"] in names] or qa
        out.append(([corpus.load_chunk(n) for n in names], rng.choice(about)["question"]))
    return out


# ------------------------------------------------------------------ in-process engine benchmark
def bench_blend(runner, sizes=(1024, 2048, 4096), n_prompts=20, ratio=BLEND.ratio,
                check_layer=BLEND.check_layer, deviation=BLEND.deviation, seed=0, log=print) -> list[dict]:
    """For each context size: TTFT (prefill to first-token logits) of full prefill, blend and full
    reuse on warm, reordered chunks; first-token agreement and mean KL against full prefill."""
    blend_cfg = BlendSettings(ratio, check_layer, deviation)
    reuse_cfg = BlendSettings(0.0, check_layer, deviation)
    rows = []
    for size in sizes:
        t = {"full": [], "blend": [], "reuse": []}
        agree = {"blend": 0, "reuse": 0}
        kls = {"blend": [], "reuse": []}
        n_tok = []
        for chunks, question in rag_prompts(size, n_prompts, seed):
            segs = chat_segments(runner, chunks, question)
            for s in segs[:-1]:  # warm: every chunk's KV is in the store (seen before, in another order)
                runner.chunk_kv(s)
            ids = [x for s in segs for x in s]
            n_tok.append(len(ids))
            t0 = time.perf_counter()
            full = runner.full_prefill(ids)
            t["full"].append(time.perf_counter() - t0)
            for name, cfg in (("blend", blend_cfg), ("reuse", reuse_cfg)):
                t0 = time.perf_counter()
                out = runner.blend_prefill(segs, cfg)
                t[name].append(time.perf_counter() - t0)
                agree[name] += int(out.logits.argmax() == full.logits.argmax())
                kls[name].append(kl(full.logits, out.logits))
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        row = {"target_tokens": size, "tokens": round(statistics.mean(n_tok)), "prompts": n_prompts,
               "full_ms": med["full"], "blend_ms": med["blend"], "reuse_ms": med["reuse"],
               "blend_speedup": med["full"] / med["blend"], "reuse_speedup": med["full"] / med["reuse"],
               "blend_top1": agree["blend"] / n_prompts, "reuse_top1": agree["reuse"] / n_prompts,
               "blend_kl": statistics.mean(kls["blend"]), "reuse_kl": statistics.mean(kls["reuse"])}
        rows.append(row)
        log(format_row(row))
    return rows


BLEND_HEADER = (f"{'tokens':>7} {'full ms':>8} {'blend ms':>9} {'reuse ms':>9} {'blend x':>8} "
                f"{'reuse x':>8} {'top1 blend':>10} {'top1 reuse':>10} {'KL blend':>9} {'KL reuse':>9}")


def format_row(r: dict) -> str:
    return (f"{r['tokens']:>7} {r['full_ms']:>8.0f} {r['blend_ms']:>9.0f} {r['reuse_ms']:>9.0f} "
            f"{r['blend_speedup']:>7.2f}x {r['reuse_speedup']:>7.2f}x {r['blend_top1']:>10.0%} "
            f"{r['reuse_top1']:>10.0%} {r['blend_kl']:>9.4f} {r['reuse_kl']:>9.4f}")


# ------------------------------------------------------------------ live engines over HTTP
def sweep_engines(sizes=(512, 1024, 2048), repeats=3, max_tokens=1, seed=0, engines=None,
                  log=print) -> list[dict]:
    """TTFT of the blend and full engines, one after the other, on reordered chunks the blend engine
    has seen before. One row per (size, repeat, engine)."""
    from . import engines as eng
    from .client import ask_one_by_one

    rows = []
    for size in sizes:
        prompts = rag_prompts(size, repeats + 1, seed)
        warm_chunks = [c for chunks, _ in prompts for c in chunks]
        blend = engines[0] if engines else eng.find("blend")
        from .rag import check_roles

        check_roles(engines or (blend, eng.find("full")))
        eng.precompute(blend, list(dict.fromkeys(warm_chunks)), progress=False)
        for rep, (chunks, question) in enumerate(prompts[1:]):
            res = ask_one_by_one(chunks, question, max_tokens=max_tokens, engines=engines)
            for name, a in res.items():
                if a.error:
                    raise EngineError(a.error)
                rows.append({"target_tokens": size, "tokens": a.prompt_tokens, "repeat": rep,
                             "engine": name, "ttft_ms": a.ttft_s * 1e3, "answer": a.text})
            b, f = res["blend"], res["full"]
            log(f"{size:>6} tokens  repeat {rep}: full {f.ttft_s * 1e3:7.0f} ms   blend "
                f"{b.ttft_s * 1e3:7.0f} ms   speed-up {f.ttft_s / b.ttft_s:5.2f}x")
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Median TTFT per size and engine, and the speed-up."""
    out = []
    for size in sorted({r["target_tokens"] for r in rows}):
        med = {e: statistics.median(r["ttft_ms"] for r in rows
                                    if r["target_tokens"] == size and r["engine"] == e)
               for e in ("blend", "full")}
        toks = [r["tokens"] for r in rows if r["target_tokens"] == size and r["tokens"]]
        out.append({"target_tokens": size, "tokens": round(statistics.mean(toks)) if toks else size,
                    "full_ms": med["full"], "blend_ms": med["blend"],
                    "speedup": med["full"] / med["blend"]})
    return out


ENGINES_CSV_FIELDS = ["date", "commit", "card", "model", "target_tokens", "prompt_tokens", "full_ms",
                      "blend_ms", "speedup", "repeats"]


def git_commit() -> str:
    """The checkout's short commit, for a CSV row ("" outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write_engines_csv(path: Path, summary: list[dict], repeats: int, model: str = "") -> None:
    """One row per size of `summarize`'s output, with the date, commit and machine it was measured on."""
    base = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "card": f"CPU, {os.cpu_count()} cores",
            "model": model, "repeats": repeats}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ENGINES_CSV_FIELDS)
        w.writeheader()
        for r in summary:
            w.writerow({**base, "target_tokens": r["target_tokens"], "prompt_tokens": r["tokens"],
                        "full_ms": f"{r['full_ms']:.0f}", "blend_ms": f"{r['blend_ms']:.0f}",
                        "speedup": f"{r['speedup']:.2f}"})


def engines_model(blend) -> str:
    """The blend engine's model, as /v1/models names it (a path: its last part)."""
    from .client import model_id

    return Path(model_id(blend)).name


def bench_rag(n_questions: int = 20, k: int = 4, max_tokens: int = 16, engines=None, log=print) -> dict:
    """BM25 recall@k over every QA question, then a RAG trace of the first `n_questions` on the running
    engines; returns {"recall_at_k", "rows", "summary"}."""
    from . import engines as eng
    from . import rag
    from .retrieval import build_retriever

    qa = corpus.load_qa()
    retriever = build_retriever()
    hits = sum(q["chunk"] in names for q, names in zip(qa, rag.plan(qa, retriever, k), strict=True))
    log(f"BM25 recall@{k} over the {len(qa)} QA questions: {hits / len(qa):.1%}")
    engines = engines or (eng.find("blend"), eng.find("full"))
    rag.check_roles(engines)
    log(f"\nRAG trace: {n_questions} questions, top {k} chunks each, {max_tokens} tokens per answer")
    log(rag.HEADER)
    rows = rag.run_trace(engines, n_questions, k, max_tokens, log=log)
    summary = rag.summarize(rows, {m["name"]: m["tokens"] for m in corpus.load_manifest()})
    log("\n" + rag.format_summary(summary))
    return {"recall_at_k": hits / len(qa), "rows": rows, "summary": summary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["blend", "engines", "rag", "load"])
    ap.add_argument("--sizes", default=None, help="comma-separated context sizes in tokens")
    ap.add_argument("--prompts", type=int, default=20, help="blend: prompts per size")
    ap.add_argument("--repeats", type=int, default=5, help="engines: queries per size")
    ap.add_argument("--ratio", type=float, default=BLEND.ratio)
    ap.add_argument("--check-layer", type=int, default=BLEND.check_layer)
    ap.add_argument("--deviation", default=BLEND.deviation, help="v, k, or v,k to compare both")
    ap.add_argument("--model", default=None)
    ap.add_argument("--questions", type=int, default=20, help="rag: questions in the trace")
    ap.add_argument("-k", type=int, default=4, help="rag: chunks retrieved per question")
    ap.add_argument("--max-tokens", type=int, default=16, help="rag: answer length")
    ap.add_argument("--blend-port", type=int, default=None, help="the blend engine's port")
    ap.add_argument("--full-port", type=int, default=None, help="the full engine's port")
    ap.add_argument("--rates", default="0.25,0.5,1", help="load: requests per second, comma-separated")
    ap.add_argument("--seconds", type=float, default=10, help="load: how long each rate sends requests")
    ap.add_argument("--ttft-limit", type=float, default=2.0, help="load: the p99 TTFT limit in seconds")
    ap.add_argument("--csv", type=Path, default=None, help="engines: write the summary rows here")
    return run_cli(ap, argv, bad_arguments, run)


def bad_arguments(args) -> str | None:
    """What is wrong with the command line, in one line (None: nothing)."""
    try:
        args.sizes = [int(s) for s in (args.sizes or "1024,2048,4096").split(",")]
    except ValueError:
        return f"--sizes must be comma-separated whole numbers of tokens, got {args.sizes!r}"
    try:
        args.rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        return f"--rates must be comma-separated numbers of requests per second, got {args.rates!r}"
    n_qa, n_chunks = len(corpus.load_qa()), len(corpus.load_manifest())
    checks = [
        (all(64 <= s <= 131072 for s in args.sizes), "--sizes must be from 64 to 131072 tokens"),
        (args.prompts >= 1 and args.repeats >= 1, "--prompts and --repeats must be at least 1"),
        (0 < args.ratio <= 1, "--ratio must be in (0, 1]"),
        (args.check_layer >= 0, "--check-layer must be 0 or more"),
        (set(args.deviation.split(",")) <= {"v", "k"}, "--deviation must be v, k or v,k"),
        (1 <= args.questions <= n_qa, f"--questions must be from 1 to {n_qa} (the QA file's questions)"),
        (1 <= args.k <= n_chunks, f"-k must be from 1 to {n_chunks} (the corpus's chunks)"),
        (1 <= args.max_tokens <= 4096, "--max-tokens must be from 1 to 4096"),
        (all(0 < r <= 1000 for r in args.rates) and 0 < args.seconds <= 3600 and args.ttft_limit > 0,
         "--rates must be in (0, 1000] requests/s, --seconds in (0, 3600] and --ttft-limit positive"),
        (all(p is None or 1 <= p <= 65535 for p in (args.blend_port, args.full_port)),
         "--blend-port and --full-port must be port numbers from 1 to 65535"),
    ]
    return next((message for ok, message in checks if not ok), None)


def run(args) -> None:
    if args.what == "blend":
        from .embedded.blend import ModelRunner
        from .embedded.model import load_model

        mdl, tok, path = load_model(args.model)
        runner = ModelRunner(mdl, tok, model_id=str(path))
        for dev in args.deviation.split(","):
            print(f"\nratio {args.ratio}, check layer {args.check_layer}, deviation on {dev.upper()}, "
                  f"{args.prompts} reordered prompts per size, warm chunk cache")
            print(BLEND_HEADER)
            bench_blend(runner, args.sizes, args.prompts, args.ratio, args.check_layer, dev)
    elif args.what == "load":
        from . import engines as eng
        from . import load

        found = (eng.find("blend", args.blend_port), eng.find("full", args.full_port))
        from .rag import check_roles

        check_roles(found)
        print(f"load: rates {args.rates} requests/s, {args.seconds:g} s each, {args.questions} questions, "
              f"top {args.k} chunks, {args.max_tokens} tokens per answer\n{load.HEADER}")
        rows = load.sweep(found, args.rates, args.seconds, args.k, args.max_tokens, args.questions)
        print(load.format_summary(rows, args.ttft_limit))
    elif args.what == "rag":
        from . import engines as eng

        bench_rag(args.questions, args.k, args.max_tokens,
                  (eng.find("blend", args.blend_port), eng.find("full", args.full_port)))
    else:
        from . import engines as eng

        found = (eng.find("blend", args.blend_port), eng.find("full", args.full_port))
        rows = sweep_engines(args.sizes, args.repeats, engines=found)
        summary = summarize(rows)
        print(f"\n{'tokens':>7} {'full ms':>8} {'blend ms':>9} {'speed-up':>9}")
        for r in summary:
            print(f"{r['tokens']:>7} {r['full_ms']:>8.0f} {r['blend_ms']:>9.0f} {r['speedup']:>8.2f}x")
        if args.csv:
            write_engines_csv(args.csv, summary, args.repeats, engines_model(found[0]))
            print(f"wrote {args.csv}")


if __name__ == "__main__":
    sys.exit(main())
