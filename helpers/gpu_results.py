"""The published GPU measurements as data: reading `docs/benchmarks/gpu_ttft.csv` and
`gpu_quality.csv` (or a run's own CSV from `scripts/bench_ttft.py`, same columns), the latest run per
card and path, where blending starts to win, and a cost model of TTFT fitted to the rows.
`helpers/plots.py` draws them.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

GPU_COLUMNS = {  # our name: the column of docs/benchmarks/gpu_ttft.csv (and of bench_ttft.py's CSVs)
    "shape": "model_shape", "tokens": "prompt_tokens", "full_ms": "full_ttft_ms", "blend_ms": "blend_ttft_ms",
    "speedup": "speedup", "card": "card", "setup": "setup", "blend_path": "blend_path", "variant": "variant",
    "ids": "ids", "date": "date", "run_id": "run_id", "commit": "commit",
}


def load_gpu_csv(path: str | Path) -> list[dict] | None:
    """Rows of the GPU measurements with our column names, or None if the file does not exist.

    A missing column reads as empty (a run's own CSV has no run_id or commit yet); the speed-up is
    computed when the file only has the two times. Each row gets a
    `label` such as "H200, 7B: fast" for charts."""
    path = Path(path)
    if not path.exists():
        return None
    with path.open(newline="") as f:
        raw = list(csv.DictReader(f))
    out = []
    for r in raw:
        row = {ours: r.get(col) or None for ours, col in GPU_COLUMNS.items()}
        if row["tokens"] is None or (row["speedup"] is None and None in (row["full_ms"], row["blend_ms"])):
            raise ValueError(f"{path}: cannot find the tokens and timing columns in {list(raw[0])}; "
                             f"expected {', '.join(GPU_COLUMNS.values())}")
        row["tokens"] = int(float(row["tokens"]))
        for k in ("full_ms", "blend_ms", "speedup"):
            row[k] = float(row[k]) if row[k] is not None else None
        if row["speedup"] is None:
            row["speedup"] = row["full_ms"] / row["blend_ms"]
        row["shape"] = row["shape"] or "model"
        row["card"] = row["card"] or "GPU"
        row["run"] = f"{row['card']}, {row['shape'].split(' (')[0]}"  # one plain-vLLM line per run
        row["label"] = row["run"] + (f": {row['blend_path']}" if row["blend_path"] else "") + \
            (f" ({row['variant']})" if row["variant"] else "")
        out.append(row)
    return out


def latest_runs(rows: list[dict]) -> list[dict]:
    """The current truth of a GPU CSV: default settings (no `variant`), identical ids on both
    engines, one engine at a time where the file says so; of those, per card, model shape and blend
    path, the rows of the latest run (by date, then by order in the file)."""
    keep = [r for r in rows if not r.get("variant") and r.get("ids") in (None, "identical")
            and (r.get("setup") is None or "one engine at a time" in r["setup"])]
    last = {}
    for i, r in enumerate(keep):
        key = (r["card"], r["shape"], r["blend_path"])
        last[key] = max(last.get(key, ("", -1, None)), (r.get("date") or "", i, r.get("run_id")))
    return [r for r in keep if r.get("run_id") == last[(r["card"], r["shape"], r["blend_path"])][2]]


def crossover(rows: list[dict]) -> float | None:
    """Prompt tokens where blending starts to win (speed-up crosses 1, interpolated on log tokens);
    None when it never loses or never wins in `rows`."""
    g = sorted(rows, key=lambda r: r["tokens"])
    for a, b in zip(g, g[1:], strict=False):
        if a["speedup"] < 1 <= b["speedup"]:
            t = (1 - a["speedup"]) / (b["speedup"] - a["speedup"])
            return math.exp(math.log(a["tokens"]) + t * (math.log(b["tokens"]) - math.log(a["tokens"])))
    return None


def fit_cost_model(rows: list[dict]) -> dict:
    """Fit TTFT_blend = c + r x P + l x n to one run's rows of one blend path by least squares, where
    P is the plain engine's TTFT at the same prompt (a full prefill), n the prompt tokens (in
    thousands for `l`): `c` the fixed cost per request (ms), `r` the share of a full prefill the
    blend still does, `l` the KV load per 1K tokens (ms), kept >= 0 (refitted without it when the
    free fit makes it negative). Also the model's predictions and its RMS error (ms)."""
    import numpy as np

    n = np.array([r["tokens"] / 1000 for r in rows])
    full = np.array([r["full_ms"] for r in rows])
    y = np.array([r["blend_ms"] for r in rows])
    cols = [np.ones_like(n), full, n]
    coef = np.linalg.lstsq(np.c_[tuple(cols)], y, rcond=None)[0] if len(rows) >= 3 else [0, 0, -1]
    if coef[2] < 0:
        coef = [*np.linalg.lstsq(np.c_[tuple(cols[:2])], y, rcond=None)[0], 0.0]
    c, r, load = (float(v) for v in coef)
    pred = c + r * full + load * n
    return {"c_ms": c, "r": r, "l_ms_per_1k": load, "predicted_ms": [float(v) for v in pred],
            "rmse_ms": float(np.sqrt(np.mean((pred - y) ** 2)))}


def model_crossover(fit: dict, rows: list[dict]) -> float | None:
    """Prompt tokens where the fitted model says blending starts to win: the full prefill's TTFT P(n)
    (interpolated on log tokens between the measured rows) reaches (c + l n) / (1 - r). None when it
    already wins at the shortest prompt measured, or never within the rows."""
    g = sorted(rows, key=lambda r: r["tokens"])

    def gain(r):  # > 0 where blending wins
        return r["full_ms"] * (1 - fit["r"]) - fit["c_ms"] - fit["l_ms_per_1k"] * r["tokens"] / 1000

    if not g or gain(g[0]) >= 0:
        return None
    for a, b in zip(g, g[1:], strict=False):
        if gain(a) < 0 <= gain(b):
            t = -gain(a) / (gain(b) - gain(a))
            return math.exp(math.log(a["tokens"]) + t * (math.log(b["tokens"]) - math.log(a["tokens"])))
    return None


def cost_models(rows: list[dict]) -> list[dict]:
    """One fitted cost model per card, shape and blend path of `rows` (best `latest_runs`' rows),
    with the crossover measured and the one the model predicts (None: wins at every length)."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        g = sorted((r for r in rows if r["label"] == label), key=lambda r: r["tokens"])
        fit = fit_cost_model(g)
        out.append({"run": label, "date": g[0].get("date"), "fixed cost c (ms)": round(fit["c_ms"], 1),
                    "r (share of a prefill)": round(fit["r"], 3),
                    "KV load l (ms per 1K tokens)": round(fit["l_ms_per_1k"], 2),
                    "model error (ms, RMS)": round(fit["rmse_ms"], 1),
                    "crossover measured": crossover(g), "crossover, model": model_crossover(fit, g)})
    return out


def load_quality_csv(path: str | Path) -> list[dict] | None:
    """Rows of docs/benchmarks/gpu_quality.csv (blend vs full prefill on real weights), or None if missing."""
    path = Path(path)
    if not path.exists():
        return None
    with path.open(newline="") as f:
        return [{**r, "top20_kl_mean": float(r["top20_kl_mean"])} for r in csv.DictReader(f)]


def latest_quality(rows: list[dict]) -> list[dict]:
    """The current truth of the quality CSV: the latest GPU run that compares every path (it has
    LMCache's blender as shipped, `upstream`; the `gpu` tier's re-checks of a few engines do not
    count) and the CPU engine's latest run on as many prompts. Older files without `run_id` are
    kept whole."""
    if not rows or "run_id" not in rows[0]:
        return rows
    gpu_runs = sorted({(r["date"], r["run_id"]) for r in rows
                       if r["card"] != "CPU" and r["blend_path"] == "upstream"})
    if not gpu_runs:
        return rows
    gpu = [r for r in rows if r["run_id"] == gpu_runs[-1][1]]
    sizes = {r["prompts"] for r in gpu if r["prompt_set"] == "qa"}
    cpu_runs = sorted({(r["date"], r["run_id"]) for r in rows
                       if r["card"] == "CPU" and r["prompts"] in sizes})
    return gpu + [r for r in rows if cpu_runs and r["run_id"] == cpu_runs[-1][1]]


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
