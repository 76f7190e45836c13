"""Load: the blend and the full engine under a sweep of request rates, measured the way serving
benchmarks (GuideLLM, aiperf, `vllm bench serve`) do: requests arrive at random (Poisson) at a given
rate (rate x seconds of them), each streams its answer, and per rate we report TTFT p50 and p99, the mean
inter-token latency, the completed requests per second, and the highest rate whose p99 TTFT stays
under a limit. The prompts are the RAG trace's: each QA question with its own top-k chunks, in score
order. One engine at a time, so the two never share the CPU or GPU.

    python -m helpers.bench load --rates 0.25,0.5,1 --seconds 10 --ttft-limit 2

A request that fails (a 429 from a full queue, a 5xx, a timeout) is counted, never as completed.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable, Sequence

from . import corpus
from .prompts import build_messages
from .runtime import Engine, api_key


def workload(k: int = 2, n: int = 40) -> tuple[list[list[dict]], list[str]]:
    """Chat messages of the first `n` QA questions, each with its top-k chunks in score order, and the
    chunk texts they use (to warm the blend engine)."""
    from .rag import plan
    from .retrieval import Retriever

    chunks = corpus.load_chunks()
    questions = corpus.load_qa()[:n]
    orders = plan(questions, Retriever(chunks), k)
    prompts = [build_messages([chunks[c] for c in o], q["question"]) for q, o in zip(questions, orders,
                                                                                       strict=True)]
    return prompts, list(dict.fromkeys(chunks[c] for o in orders for c in o))


def percentile(xs: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0-100), linear between the closest ranks; None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def one_request(client, model: str, messages: list[dict], max_tokens: int, t_sent: float) -> dict:
    """Stream one chat completion; its TTFT (from when it was due), inter-token gaps, or its error."""
    stamps = []
    try:
        stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                      temperature=0, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
    except Exception as err:  # noqa: BLE001 - any failure is a failed request, counted as such
        return {"ok": False, "error": type(err).__name__, "end": time.perf_counter()}
    if not stamps:
        return {"ok": False, "error": "no tokens", "end": time.perf_counter()}
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ok": True, "ttft": stamps[0] - t_sent, "itl": statistics.mean(gaps) if gaps else None,
            "end": stamps[-1]}


async def run_rate(engine: Engine, model: str, prompts: list[list[dict]], rate: float, seconds: float,
                   max_tokens: int = 8, timeout: float = 120, seed: int = 0) -> dict:
    """rate * seconds requests (at least 3) arriving at random (Poisson) at `rate` requests/s; waits
    for every one (each at most `timeout` s). Returns the rate's row."""
    from openai import AsyncOpenAI

    rng = random.Random(seed)
    client = AsyncOpenAI(base_url=engine.url + "/v1", api_key=api_key() or "none", timeout=timeout,
                         max_retries=0)
    tasks, t0, due = [], time.perf_counter(), 0.0
    async with client:
        for i in range(max(3, round(rate * seconds))):
            await asyncio.sleep(max(0.0, t0 + due - time.perf_counter()))
            msgs = prompts[i % len(prompts)]
            tasks.append(asyncio.create_task(one_request(client, model, msgs, max_tokens, t0 + due)))
            due += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
    done = [r for r in results if r["ok"]]
    wall = max(r["end"] for r in results) - t0
    ttfts, itls = [r["ttft"] for r in done], [r["itl"] for r in done if r["itl"] is not None]
    return {"engine": engine.name, "rate": rate, "sent": len(results), "completed": len(done),
            "failed": len(results) - len(done), "completed_per_s": len(done) / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "itl_ms": statistics.mean(itls) * 1e3 if itls else None,
            "errors": sorted({r["error"] for r in results if not r["ok"]})}


def sweep(engines: Sequence[Engine], rates: Sequence[float], seconds: float = 5, k: int = 2,
          max_tokens: int = 8, questions: int = 20, timeout: float = 120,
          log: Callable[[str], None] | None = print) -> list[dict]:
    """Every rate on each engine in turn (blend first, its chunks warmed), the first `questions` QA
    questions asked in turn; one row per (engine, rate)."""
    from . import engines as eng
    from .client import model_id

    prompts, texts = workload(k, questions)
    blend = next(e for e in engines if e.name == "blend")
    eng.precompute(blend, texts, progress=False)
    rows = []
    for e in engines:
        model = model_id(e)
        for rate in rates:
            rows.append(run_sync(run_rate(e, model, prompts, rate, seconds, max_tokens, timeout)))
            if log:
                log(format_row(rows[-1]))
    return rows


def run_sync(coro):
    """Run a coroutine to its end from plain code, also where an event loop already runs (a notebook's
    kernel): in a thread of its own, with its own loop."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def max_rate_under(rows: Sequence[dict], limit_s: float) -> dict[str, float | None]:
    """Per engine, the highest rate whose p99 TTFT stayed under `limit_s` with no failed request
    (None when even the lowest rate did not)."""
    out = {}
    for name in dict.fromkeys(r["engine"] for r in rows):
        ok = [r["rate"] for r in rows if r["engine"] == name and r["failed"] == 0
              and r["ttft_p99_s"] is not None and r["ttft_p99_s"] < limit_s]
        out[name] = max(ok) if ok else None
    return out


HEADER = (f"{'engine':>6} {'rate/s':>7} {'sent':>5} {'done':>5} {'done/s':>7} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'ITL ms':>7}")


def format_row(r: dict) -> str:
    def s(x, fmt):
        return f"{'-':>{fmt[1]}}" if x is None else format(x, fmt)

    return (f"{r['engine']:>6} {r['rate']:>7.2f} {r['sent']:>5} {r['completed']:>5} "
            f"{r['completed_per_s']:>7.2f} {s(r['ttft_p50_s'], '>8.2f')}s {s(r['ttft_p99_s'], '>8.2f')}s "
            f"{s(r['itl_ms'], '>7.0f')}" + (f"  failed: {', '.join(r['errors'])}" if r["failed"] else ""))


def format_summary(rows: Sequence[dict], limit_s: float) -> str:
    best = max_rate_under(rows, limit_s)
    parts = [f"{name} {rate:g}/s" if rate is not None else f"{name}: none of these rates"
             for name, rate in best.items()]
    return f"highest rate with p99 TTFT under {limit_s:g} s: " + ", ".join(parts)
