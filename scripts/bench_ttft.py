"""On a GPU: TTFT of plain vLLM vs each blend path, on dummy weights of a real shape (docs/gpu.md).

    python scripts/bench_ttft.py --shape 7b --out DIR [--paths fast,upstream] [--one-at-a-time]

It starts plain vLLM and one blend engine per
`--paths` (fast, fixed, upstream: see helpers/gpu/plugin.py) on one GPU, all at once or, with
`--one-at-a-time`, in turn (a 34B model does not fit twice). It precomputes the corpus chunks on
each blend engine, then times the same prompts on every engine: for each size, reordered-chunk
prompts (a different random subset and order each time, identical ids for every engine), streaming
completions through the openai client, max_tokens 1, TTFT = time to the first streamed choice,
median over the queries after one warm-up. It reads each blend engine's log for LMCache's hit count
of every query. `--profile 8192` also runs one request of that size per engine under vLLM's torch
profiler and keeps its table. `--merge 1,4` measures each size also with every 4 consecutive corpus
chunks joined into one document: prompts of the same length with 4 times fewer segments.
"""


from __future__ import annotations

import argparse
import csv
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dummy_model import SHAPES, make_model  # noqa: E402

from helpers import engines as eng  # noqa: E402
from helpers import runtime  # noqa: E402
from helpers.gpu import launch as gpu  # noqa: E402
from helpers.prompts import chat_prompt_ids, separator_ids  # noqa: E402
from helpers.settings import GpuBlendSettings  # noqa: E402

# the fast path with one of its parts changed, to A/B in one run: its CUDA graphs off, LMCache's lookup,
# FlexAttention alone, FlashAttention for each q-block's prefix keys at every length (as one page; in
# pages of 16)
AB_PATHS = {"fast-eager": {"graphs": False}, "fast-lmlookup": {"lookup": False},
            "fast-flex": {"prefix_attention": "flex"}, "fast-flash": {"prefix_attention": "flash"},
            "fast-flash16": {"prefix_attention": "flash16"}}
QUESTION = "Which option or filter described above does what the user needs? Answer briefly."
LABELS = {"7b": "7B (Mistral-7B shape)", "34b": "34B (Yi-34B-like, 60 layers)"}
# docs/benchmarks/gpu_ttft.csv's columns; run_id and commit are filled in when a run is published
CSV_FIELDS = ["date", "run_id", "commit", "card", "setup", "model_shape", "target_tokens", "prompt_tokens",
              "queries", "full_ttft_ms", "blend_ttft_ms", "speedup", "lmcache_hit_pct", "full_engine_ms",
              "blend_engine_ms", "blend_path", "variant", "ids"]
TIMING_RE = re.compile(r"fast blend timing: (\d+ tokens, tail [^;]+); ms host/GPU: ([^\n]+)")
HIT_RE = re.compile(r"Total tokens (\d+), Inference Engine computed tokens: (\d+), LMCache hit tokens: (\d+)")

def corpus_chunks() -> tuple[dict[str, str], str]:
    """The ffmpeg/ chunks, or synthetic text of similar size if the corpus is not there yet."""
    try:
        from helpers.corpus import load_chunks

        chunks = load_chunks()
        if chunks:
            return chunks, "ffmpeg corpus"
    except (OSError, ValueError, KeyError):
        pass
    rng = random.Random(0)
    words = [w for w in "filter stream codec frame audio video option pixel format sample rate bitrate "
             "encoder decoder muxer scale crop overlay channel layout buffer packet timestamp".split()]
    return ({f"synthetic_{i}": " ".join(rng.choice(words) for _ in range(rng.randint(300, 700))) + "."
             for i in range(60)}, "synthetic text")


def merge_chunks(chunks: dict[str, str], n: int) -> dict[str, str]:
    """Every `n` consecutive chunks joined into one document (fewer, longer segments); n=1: as is."""
    names = list(chunks)
    return {"+".join(names[i:i + n]): "\n\n".join(chunks[k] for k in names[i:i + n])
            for i in range(0, len(names), n)}


def pick(cost: dict[str, int], budget: int, seed: str) -> list[str]:
    """A random subset of chunks, in random order, whose costs fill `budget` without passing it."""
    names = sorted(cost)
    random.Random(seed).shuffle(names)
    picked, total = [], 0
    for name in names:
        if total + cost[name] <= budget:
            picked.append(name)
            total += cost[name]
    return picked


def ttft(client, model: str, ids: list[int], extra: dict | None = None) -> float:
    """Seconds to the first streamed choice (max_tokens 1: the prefill).

    The ids go in `extra_body`: given as `prompt=`, the openai SDK walks the list item by item
    (~0.3 s of client CPU for 32K ids), which would land in both engines' TTFT."""
    t0 = time.perf_counter()
    first = None
    body = {"prompt": ids, **(extra or {})}
    for event in client.completions.create(model=model, prompt="", extra_body=body, max_tokens=1,
                                           temperature=0, stream=True):
        if first is None and event.choices:
            first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0


def engine_ttft(url: str) -> tuple[float, float] | None:
    """(sum, count) of vLLM's own time_to_first_token histogram (arrival to first token)."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    got = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"vllm:time_to_first_token_seconds_{part}"):
                got[part] = got.get(part, 0.0) + float(line.rsplit(" ", 1)[1])
    return (got["sum"], got["count"]) if len(got) == 2 else None


def timed(client, e, model: str, ids: list[int], extra: dict) -> tuple[float, float | None]:
    """(client TTFT ms, engine-side TTFT ms or None)."""
    before = engine_ttft(e.url)
    ms = ttft(client, model, ids, extra) * 1e3
    after = engine_ttft(e.url)
    if before and after and after[1] == before[1] + 1:
        return ms, (after[0] - before[0]) * 1e3
    return ms, None


def log_hits(log: Path, offset: int) -> list[tuple[int, int]]:
    """(total tokens, LMCache hit tokens) of the requests logged after byte `offset`."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [(int(m[1]), int(m[3])) for m in HIT_RE.finditer(text)]


def prompts(tok, sizes: list[int], queries: int, label: str, merges: tuple[int, ...]) -> list[dict]:
    """The bench's prompts, the same for every engine: per size (and merge), queries + 1 random
    subsets of chunks in random order (the first is a warm-up), as identical chat ids."""
    base, source = corpus_chunks()
    overhead = len(chat_prompt_ids(tok, [], QUESTION)) + 8
    out = []
    for m in merges:
        chunks = merge_chunks(base, m)
        cost = {n: len(tok.encode(t, add_special_tokens=False)) + len(separator_ids(tok))
                for n, t in chunks.items()}  # a chunk brings a separator
        for size in sizes:
            for k in range(queries + 1):
                names = pick(cost, size - overhead, f"{label}-{size}-{k}" + (f"-m{m}" if m > 1 else ""))
                out.append({"size": size, "merge": m, "query": k, "chunks": len(names), "source": source,
                            "ids": chat_prompt_ids(tok, [chunks[n] for n in names], QUESTION)})
    return out


def measure(e, model: str, todo: list[dict], deadline: float) -> list[dict]:
    """Time every prompt on engine `e` (a blend engine stores nothing of them: NO_SAVE)."""
    import openai

    client = openai.OpenAI(base_url=e.url + "/v1", api_key="local", max_retries=0, timeout=900)
    extra = {} if e.name == "full" else gpu.NO_SAVE
    samples = []
    for p in todo:
        if time.time() > deadline:
            print(f"{e.name}: out of time at {p['size']}", flush=True)
            break
        s = {"engine": e.name, **{k: p[k] for k in ("size", "merge", "query", "chunks")},
             "tokens": len(p["ids"])}
        offset = e.log.stat().st_size
        try:
            s["ms"], s["engine_ms"] = timed(client, e, model, p["ids"], extra)
        except openai.APIError as err:
            s["error"] = str(err)[:300]
        time.sleep(0.2)  # let the engine's log reach the file
        hits = log_hits(e.log, offset)
        if hits:
            s["logged_total"], s["hit_tokens"] = hits[-1]
        samples.append(s)
        print(json.dumps(s), flush=True)
    return samples


def profile(e, model: str, ids: list[int], out: Path) -> None:
    """One request under vLLM's torch profiler (the engine runs with --profiler-config): its table of
    CUDA time per op lands in out/profile_<engine>.txt."""
    import httpx
    import openai

    client = openai.OpenAI(base_url=e.url + "/v1", api_key="local", max_retries=0, timeout=900)
    httpx.post(e.url + "/start_profile", timeout=120)
    ms = ttft(client, model, ids, {} if e.name == "full" else gpu.NO_SAVE) * 1e3
    httpx.post(e.url + "/stop_profile", timeout=600)
    table = Path(e.env["KVBLEND_PROFILE_DIR"]) / "profiler_out_0.txt"
    for _ in range(60):
        if table.exists():
            break
        time.sleep(1)
    text = table.read_text() if table.exists() else "(no table written)"
    head = f"{len(ids)} tokens, TTFT {ms:.1f} ms under the profiler\n"
    traces = sorted(table.parent.glob("*.json*"), key=lambda t: t.stat().st_mtime)
    if traces:  # with Python stacks: where the host time went, by function
        try:
            text += "\n" + python_time(traces[-1])
        except (OSError, ValueError, KeyError) as err:
            text += f"\n(no Python time: {err})\n"
    (out / f"profile_{e.name}.txt").write_text(head + text)


def python_time(trace: Path, top: int = 40) -> str:
    """Where the host time of a profiled request went, by Python function: the `python_function`
    events of a torch profiler trace (recorded with stacks), self and total ms per function, summed
    over threads. Self time is a function's own, its callees' taken out (nesting per thread)."""
    import gzip
    from collections import defaultdict

    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    calls = [e for e in events if e.get("cat") == "python_function" and e.get("ph") == "X"]
    total, own = defaultdict(float), defaultdict(float)
    for tid in {(e.get("pid"), e.get("tid")) for e in calls}:
        stack: list[list] = []  # [end, name, child time]
        for e in sorted((e for e in calls if (e.get("pid"), e.get("tid")) == tid),
                        key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1][0] <= e["ts"]:
                _end, name, children, dur = stack.pop()
                own[name] += dur - children
            if stack:
                stack[-1][2] += e["dur"]
            total[e["name"]] += e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], 0.0, e["dur"]])
        for _end, name, children, dur in stack:
            own[name] += dur - children
    lines = [f"{len(calls)} Python calls; ms self / total, by self time"]
    for name in sorted(own, key=own.get, reverse=True)[:top]:
        lines.append(f"{own[name] / 1e3:9.2f} {total[name] / 1e3:9.2f}  {name[:150]}")
    return "\n".join(lines) + "\n"


def summarize(label: str, card: str, samples: list[dict], setup: str = "") -> list[dict]:
    """One row per (size, merge, blend path): medians over the measured queries (not the warm-up)."""
    good = [s for s in samples if s["query"] > 0 and "ms" in s]
    full = {(s["size"], s["merge"], s["query"]): s for s in good if s["engine"] == "full"}
    rows = []
    for path in sorted({s["engine"] for s in good} - {"full"}):
        for size, m in sorted({(s["size"], s["merge"]) for s in good if s["engine"] == path}):
            pairs = [(s, full[(size, m, s["query"])]) for s in good
                     if s["engine"] == path and (s["size"], s["merge"]) == (size, m) and
                     (size, m, s["query"]) in full]
            if not pairs:
                continue
            blend_ms = statistics.median(b["ms"] for b, _ in pairs)
            full_ms = statistics.median(f["ms"] for _, f in pairs)
            hit = [b["hit_tokens"] / b["logged_total"] for b, _ in pairs if b.get("logged_total")]
            eng_ms = {n: [x[i].get("engine_ms") for x in pairs if x[i].get("engine_ms")]
                      for i, n in ((0, "blend"), (1, "full"))}
            rows.append({"date": time.strftime("%Y-%m-%d"), "card": card, "setup": setup,
                         "model_shape": label, "target_tokens": size,
                         "prompt_tokens": int(statistics.median(b["tokens"] for b, _ in pairs)),
                         "queries": len(pairs), "full_ttft_ms": round(full_ms, 1),
                         "blend_ttft_ms": round(blend_ms, 1), "speedup": round(full_ms / blend_ms, 2),
                         "lmcache_hit_pct": round(100 * statistics.median(hit), 1) if hit else "",
                         **{f"{n}_engine_ms": round(statistics.median(v), 1) if v else ""
                            for n, v in eng_ms.items()},
                         "blend_path": path.split("-")[0], "variant": path.split("-", 1)[1] if "-" in path
                         else "", "ids": "identical", "merge": m,
                         "chunks": int(statistics.median(b["chunks"] for b, _ in pairs))})
    return rows


def write_results(out: Path, label: str, rows: list[dict], raw: list[dict], merged: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    slug = label.split()[0].lower()
    with open(out / f"ttft_{slug}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS + (["merge", "chunks"] if merged else []), extrasaction="ignore")
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (r["blend_path"], r["target_tokens"], r["merge"])))
    (out / f"raw_{slug}.json").write_text(json.dumps({"samples": raw}, indent=1))


# ------------------------------------------------------------------ the device run
def gpu_name() -> str:
    """The card's short name (H100, H200) for the CSV, from nvidia-smi: the harness itself stays off
    the GPU the engines share."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "GPU"
    return next((w for w in names if re.fullmatch(r"[A-Z]+\d+\w*", w)), "GPU")


def device(shape: str, out: Path, sizes: list[int], queries: int, budget_s: float, run_selftest: bool,
           merges: tuple[int, ...] = (1,), paths: tuple[str, ...] = ("fast", "fixed", "upstream"),
           one_at_a_time: bool = False, store_gb: float = 8.0, profile_size: int = 0,
           max_model_len: int = 32768, cpu_gb: float = 8.0) -> int:
    """Start plain vLLM and one blend engine per path (all at once on one GPU, or one at a time for
    models too big to share it), precompute the corpus on each blend engine, time the same prompts on
    every engine, and optionally profile one request of `profile_size` tokens per engine."""

    t_start = time.time()
    deadline = t_start + budget_s
    out.mkdir(parents=True, exist_ok=True)
    # `timeout` sends SIGTERM: exit through the `finally` below, which stops the engines and keeps
    # the logs and notes (rows are written after each group of engines)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    notes = {"shape": shape, "paths": list(paths), "one_at_a_time": one_at_a_time, "store_gb": store_gb,
             "cpu_gb": cpu_gb}
    model = ROOT / ".gpu" / "models" / shape
    if not (model / "config.json").exists():
        make_model(shape, model, ROOT / ".cache" / "smollm2-f32")
    if run_selftest:
        # in a process of its own, so its CUDA memory is gone before the engines start
        test = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_kv_transfer.py"),
                               str(out / "selftest.json")],
                              capture_output=True, text=True)
        notes["selftest_rc"] = test.returncode
        print(test.stdout + test.stderr[-3000:], flush=True)
    share = 0.85 if one_at_a_time else round(0.85 / (1 + len(paths)), 3)
    card = gpu_name()
    setup = "1 GPU, one engine at a time" if one_at_a_time else f"1 GPU, shared by {1 + len(paths)} engines"
    opts = dict(gpu_memory_utilization=share, max_model_len=max_model_len, load_format="dummy",
                dtype="bfloat16",
                architecture=gpu.served_architecture(gpu.model_config(str(model)), str(model)))

    def profiled(name):
        if not profile_size:
            return {}
        d = runtime.RUN_DIR / f"profile-{name}"
        d.mkdir(parents=True, exist_ok=True)
        cfg = {"profiler": "torch", "torch_profiler_dir": str(d), "torch_profiler_with_stack": True}
        return {"extra_args": ("--profiler-config", json.dumps(cfg)), "env": {"KVBLEND_PROFILE_DIR": str(d)}}

    engines = [gpu.full_engine("full", 8001, str(model), **opts, **profiled("full"))]
    for i, path in enumerate(paths):
        kw = profiled(path)
        fast = path.startswith("fast")
        settings = GpuBlendSettings(path=path.split("-")[0], store_gb=store_gb, timing=fast,
                                    **AB_PATHS.get(path, {}))
        engines.append(gpu.blend_engine(path, 8010 + i, str(model), settings=settings,
                                        cpu_cache_gb=cpu_gb, **opts, **kw))
    tok = gpu.tokenizer_for(str(model))
    todo = prompts(tok, sizes, queries, LABELS[shape], merges)
    texts = {t for m in merges for t in merge_chunks(corpus_chunks()[0], m).values()}
    raw: list[dict] = []
    rows: list[dict] = []
    groups = [[e] for e in engines] if one_at_a_time else [engines]
    try:
        for group in groups:
            t0 = time.time()
            failed = eng.start_all(group, 600)
            notes.setdefault("failed", {}).update(failed)
            up = [e for e in group if e.name not in failed]
            notes.setdefault("start_s", []).append(round(time.time() - t0, 1))
            for e in up:
                if e.name != "full":
                    t0 = time.time()
                    gpu.precompute(e, sorted(texts), progress=False)
                    notes.setdefault("precompute_s", {})[e.name] = round(time.time() - t0, 1)
            for e in up:
                raw += measure(e, str(model), todo, deadline)
                if profile_size and e.name != "upstream":
                    one = next((p for p in todo if p["size"] == profile_size and p["query"] == 1), None)
                    if one:
                        profile(e, str(model), one["ids"], out)
            rows = summarize(LABELS[shape], card, raw, setup)
            write_results(out, LABELS[shape], rows, raw, merged=merges != (1,))
            if one_at_a_time:
                for e in group:
                    eng.stop_engine(e)
    finally:
        for e in engines:
            text = e.log.read_text(errors="replace") if e.log.exists() else ""
            notes.setdefault("log", {})[e.name] = {
                "plugin_active": text.count("kvblend plugin active"),
                "fast_store": text.count("GPU chunk store of"),
                "fast_failed": text.count("fast blend path failed"),
                "fast_no_room": text.count("no room in the GPU chunk store"),
                "double_unpin": text.count("Double unpin"),
                "requests_with_hits": sum(1 for m in HIT_RE.finditer(text) if int(m[3]) > 0),
                "graph_capture_failed": text.count("CUDA graph capture failed"),
                "timing": TIMING_RE.findall(text)}
            eng.stop_engine(e)
        with open(out / f"logs_{shape}.txt", "wb") as f:  # one file: the device returns few
            for e in engines:
                if e.log.exists():
                    f.write(f"\n===== {e.name} =====\n".encode() + e.log.read_bytes()[-1_500_000:])
        notes["rows"] = rows
        notes["wall_s"] = round(time.time() - t_start, 1)
        (out / f"notes_{shape}.json").write_text(json.dumps(notes, indent=2))
        print(json.dumps(notes, indent=2), flush=True)
    return 0 if rows else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ap
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--shape", choices=sorted(SHAPES), required=True)
    d.add_argument("--sizes", default="32768,16384,8192,4096,2048")
    d.add_argument("--queries", type=int, default=4)
    d.add_argument("--budget-s", type=float, default=500, help="stop timing new prompts after this")
    d.add_argument("--merge", default="1", help="join N consecutive chunks into one document; "
                   "a list (1,4) measures each size with each")
    d.add_argument("--paths", default="fast,fixed,upstream",
                   help="blend paths, one engine each; fast-eager: the fast path without CUDA graphs; "
                        "fast-lmlookup: with LMCache's own lookup; fast-flex: FlexAttention alone; "
                        "fast-flash, fast-flash16: FlashAttention for each q-block's prefix keys at "
                        "every length (one page; pages of 16)")
    d.add_argument("--one-at-a-time", action="store_true", help="for models too big to share the GPU")
    d.add_argument("--store-gb", type=float, default=8.0, help="the fast path's GPU chunk store")
    d.add_argument("--profile", type=int, default=0, help="profile one request of this size per engine")
    d.add_argument("--max-model-len", type=int, default=32768,
                   help="lower it where the engines share a smaller GPU (an H100)")
    d.add_argument("--cpu-gb", type=float, default=8.0,
                   help="LMCache's host store per blend engine; the corpus needs 5.2 GB at 7B, 9.7 GB at 34B")
    d.add_argument("--selftest", action="store_true")
    a = ap.parse_args(argv)
    return device(a.shape, a.out, [int(x) for x in a.sizes.split(",")], a.queries, a.budget_s, a.selftest,
                  tuple(int(x) for x in a.merge.split(",")), tuple(a.paths.split(",")), a.one_at_a_time,
                  a.store_gb, a.profile, a.max_model_len, a.cpu_gb)


if __name__ == "__main__":
    sys.exit(main())
