"""The scale-out numbers of the README, measured side by side in one run on the embedded engines:

    python scripts/scale_out.py [--rates 0.25,0.5,1] [--seconds 10] [--chunks 59] [--csv PATH]

It starts (in a run dir and on ports of its own) 2 blend replicas that share nothing but a managed
Redis (`--no-disk-cache`) and 2 full replicas, each pair behind vllm-router with the cache-aware
policy, then measures:

1. the chunk KV of the corpus computed through blend-1, then loaded by blend-2 from Redis;
2. where the cache-aware router sends a prompt again in the same order and with its chunks reordered
   (which replica served it: /health's `served` counter);
3. the load sweep (`helpers.load`) on the blend and the full router at the same rates.
Everything it started is stopped at the end. `--csv` writes every number as a row (the README's
table is checked against docs/benchmarks/cpu_scale_out.csv).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["KVBLEND_RUN_DIR"] = tempfile.mkdtemp(prefix="kvblend-scale-")

import httpx  # noqa: E402

from helpers import bench, corpus, engines, library, load, runtime  # noqa: E402
from helpers.prompts import build_messages  # noqa: E402


def warm_times(replicas, texts: list[str]) -> dict:
    out = {}
    for e in replicas:
        t0 = time.perf_counter()
        res = engines.precompute(e, texts, progress=False)
        out[e.name] = {"seconds": time.perf_counter() - t0, "computed": res["computed"],
                       "remote_hits": res["stats"].get("remote_hits")}
        print(f"{e.name}: {len(texts)} chunks ({res['tokens']} tokens) in {out[e.name]['seconds']:.1f} s, "
              f"{res['computed']} computed, {res['stats'].get('remote_hits')} from Redis")
    return out


def served(replicas) -> dict:
    return {e.name: runtime.health(e)["served"] for e in replicas}


def routing(front, replicas, n: int = 6) -> dict:
    """For n prompts of 3 chunks: which replica serves it, then the same order again, then reversed."""
    texts = library.load(None).texts
    names = [m["name"] for m in corpus.load_manifest()]
    same = reordered = 0
    for i in range(n):
        chunks = [texts[c] for c in names[3 * i:3 * i + 3]]
        where = []
        for order in (chunks, chunks, chunks[::-1]):
            before = served(replicas)
            httpx.post(front.url + "/v1/chat/completions", timeout=300, json={
                "model": "smollm2", "messages": build_messages(order, "What is this about?"),
                "max_tokens": 1}).raise_for_status()
            after = served(replicas)
            where.append(next(k for k in after if after[k] > before[k]))
        same += where[1] == where[0]
        reordered += where[2] == where[0]
        print(f"prompt {i}: first {where[0]}, same order {where[1]}, reordered {where[2]}")
    print(f"cache_aware: same order to the same replica {same}/{n}, reordered {reordered}/{n}")
    return {"same_order_same_replica": same, "reordered_same_replica": reordered, "prompts": n}


CSV_FIELDS = ["date", "commit", "card", "setup", "measure", "engine", "rate", "sent", "completed", "failed",
              "completed_per_s", "ttft_p50_s", "ttft_p99_s", "itl_ms", "seconds", "computed", "value"]


def write_csv(path: Path, warm: dict, route: dict, load_rows: list[dict]) -> None:
    """Every number of the run, one row each: the corpus warm-up per replica, the routing counts,
    the load sweep per engine and rate."""
    base = {"date": time.strftime("%Y-%m-%d"), "commit": bench.git_commit(), "card": "CPU",
            "setup": f"{os.cpu_count()} cores, 2 blend + 2 full replicas behind cache_aware routers"}
    rows = [{**base, "measure": "warm", "engine": name, "seconds": round(w["seconds"], 1),
             "computed": w["computed"]} for name, w in warm.items()]
    rows += [{**base, "measure": f"routing_{k}", "value": v} for k, v in route.items()]
    rows += [{**base, "measure": "load", **{k: round(v, 3) if isinstance(v, float) else v
                                            for k, v in r.items() if k in CSV_FIELDS}} for r in load_rows]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="0.25,0.5,1")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--chunks", type=int, default=59)
    ap.add_argument("--csv", type=Path, default=None, help="write every number here")
    args = ap.parse_args()
    started = engines.start("embedded", blend_port=8700, full_port=8701, timeout=600, progress=False,
                            kv_dir=None, kv_store="redis", replicas={"blend": 2, "full": 2},
                            policy="cache_aware")
    by = {e.name: e for e in started}
    try:
        texts = list(library.load(None).texts.values())[:args.chunks]
        warm = warm_times([by["blend-1"], by["blend-2"]], texts)
        route = routing(by["blend"], [by["blend-1"], by["blend-2"]])
        print(load.HEADER)
        rows = load.sweep([by["blend"], by["full"]], [float(r) for r in args.rates.split(",")], args.seconds,
                          k=2, max_tokens=8, questions=20)
        print(load.format_summary(rows, 2.0))
        if args.csv:
            write_csv(args.csv, warm, route, rows)
    finally:
        engines.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
