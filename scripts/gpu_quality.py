"""Is GPU blending right? Real weights, identical ids, blend vs full prefill.

    python scripts/gpu_quality.py device --model DIR --out DIR   # on one GPU: start, measure, stop
    python scripts/gpu_quality.py embedded --out DIR             # the same prompts on the CPU engine

`device` starts, on one GPU, a full-prefill vLLM in bf16 (the reference), one in float32 (the bf16
noise floor), and one vLLM + LMCache blend engine per recompute ratio, all with the same model and
the same prompt ids. It precomputes every corpus chunk on each blend engine, then asks every engine
for the first token's top-20 logprobs on three prompt sets built from `ffmpeg/qa.json`:

- `qa`: the gold chunk and 3 others, shuffled (chunks precomputed alone, so they move);
- `same_pos`: the gold chunk, then the question, no chat prefix: the chunk sits at positions
  0..n-1, where precompute computed it alone (nothing moves: the reused KV should equal a full
  prefill's up to bf16);
- `reordered`: 8 random chunks in random order (≈ 4-5K tokens), the RAG case.

Scores per prompt set and engine, against the bf16 full prefill: first token equal, and KL over the
union of both top-20 lists (`metrics.topk_kl`). Writes quality.csv and raw.json into --out, and
metrics.txt: each fast-path engine's fallback counter, read from its /metrics before it stops.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers import metrics  # noqa: E402 (torch-free)
from helpers.gpu import fast  # noqa: E402 (torch-free: the counter's name)
from helpers.settings import GpuBlendSettings  # noqa: E402

RATIOS = (0.05, 0.15, 0.3, 1.0)
# blend engines to compare: (blend path, ratio[, deviation k or v]); "upstream" is LMCache's blender
# as shipped, "fixed" ours mended, "fast" our one-pass blender (helpers/gpu/plugin.py)
BLENDS = tuple(("fixed", r) for r in RATIOS) + (("upstream", 0.15),)


def blend_name(spec: tuple) -> str:
    """fixed_0.15, fast-v_0.15, ...: path, deviation when not k, ratio."""
    path, ratio, dev = (*spec, "k")[:3]
    return f"{path}{'' if dev == 'k' else '-' + dev}_{ratio}"
# docs/benchmarks/gpu_quality.csv's columns; run_id and commit are filled in when a run is published
def gpu_name() -> str:
    """The card's short name (H100, H200) for the CSV."""
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return next((w for w in name.split() if w[:1] == "H" and w[1:4].isdigit()), name)


FIELDS = ["date", "run_id", "commit", "card", "setup", "backend", "model", "engine", "blend_path", "variant",
          "ratio", "prompt_set", "prompts", "first_token_agree", "top20_kl_mean", "exact_kl_mean"]
TOPK = 20


# ------------------------------------------------------------------ prompts
def prompt_sets(seed: int = 0) -> dict[str, list[tuple[list[str], str]]]:
    """{set name: [(chunk texts in order, question)]} from the corpus and its QA pairs."""
    from helpers.corpus import load_chunks, load_qa

    chunks, qa = load_chunks(), load_qa()
    names = sorted(chunks)
    rng = random.Random(seed)
    sets = {"qa": [], "same_pos": [], "reordered": []}
    for q in qa:
        others = rng.sample([n for n in names if n != q["chunk"]], 3)
        order = [q["chunk"], *others]
        rng.shuffle(order)
        sets["qa"].append(([chunks[n] for n in order], q["question"]))
        sets["same_pos"].append(([chunks[q["chunk"]]], q["question"]))
    for q in qa[:12]:
        order = rng.sample(names, 8)
        sets["reordered"].append(([chunks[n] for n in order], q["question"]))
    return sets


def prompt_ids(tok, set_name: str, chunks: list[str], question: str) -> list[int]:
    """The ids both engines get: the chat prompt; for `same_pos` without the chat prefix, so that
    the chunk stands where precompute computed it (`helpers/gpu/launch.py: storing_prompts`)."""
    from helpers.prompts import DEFAULT_SYSTEM, chat_prompt_ids, chat_segment_ids, separator_ids

    if set_name != "same_pos":
        return chat_prompt_ids(tok, chunks, question, DEFAULT_SYSTEM)
    _, *rest = chat_segment_ids(tok, chunks, question, DEFAULT_SYSTEM)
    ids = []
    for i, seg in enumerate(rest):
        ids += (separator_ids(tok) if i else []) + seg
    return ids


# ------------------------------------------------------------------ scoring
def summarize(answers: dict[str, list[dict]], ref: str) -> dict[str, dict]:
    """Per engine: prompts, first tokens equal to ref's, mean top-20 KL to ref."""
    out = {}
    for name, rows in answers.items():
        pairs = [(a, b) for a, b in zip(answers[ref], rows, strict=True) if a and b]
        out[name] = {
            "prompts": len(pairs),
            "first_token_agree": sum(a["token"] == b["token"] for a, b in pairs),
            "top20_kl_mean": round(statistics.fmean(metrics.topk_kl(a["top"], b["top"]) for a, b in pairs), 4)
            if pairs else "",
        }
    return out


# ------------------------------------------------------------------ the fast path's fallbacks
FALLBACKS = fast.FALLBACKS + "_total"  # as /metrics serves the fast path's counter


def fast_fallbacks(metrics_text: str) -> dict | None:
    """{"no_room": n, "error": n} from a /metrics page; None when it has no fallback counter."""
    found = {}
    for line in metrics_text.splitlines():
        m = re.fullmatch(rf'{FALLBACKS}\{{reason="(\w+)"\}} (\S+)', line.strip())
        if m:
            found[m[1]] = float(m[2])
    return found or None


def scrape_fallbacks(engines, out: Path) -> dict:
    """{engine: fast_fallbacks(its /metrics)} of the fast-path blend engines, None where the counter
    cannot be read (printed, with why); the counter's lines go to out/metrics.txt. Never raises."""
    found, lines = {}, []
    for e in engines:
        try:
            if GpuBlendSettings.ENV not in e.env or GpuBlendSettings.from_env(e.env).path != "fast":
                continue
            found[e.name] = None
            import httpx

            r = httpx.get(e.url + "/metrics", timeout=10)
            r.raise_for_status()
            text = r.text
            found[e.name] = fast_fallbacks(text)
            lines += [f"===== {e.name} =====", *(x for x in text.splitlines() if FALLBACKS in x)]
            if found[e.name] is None:
                print(f"{e.name}: no {FALLBACKS} on its /metrics", flush=True)
        except Exception as err:  # noqa: BLE001 - the engines must still stop
            print(f"{e.name}: /metrics not read ({type(err).__name__}: {err})", flush=True)
    try:
        (out / "metrics.txt").write_text("\n".join(lines) + "\n")
    except OSError as err:
        print(f"metrics.txt not written: {err}", flush=True)
    return found


# ------------------------------------------------------------------ the device run
def first_token(client, url: str, model: str, ids: list[int], extra: dict | None = None) -> dict | None:
    """The greedy first token and its top-20 logprobs (by token id), from /v1/completions."""
    r = client.post(url + "/v1/completions", json={
        "model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": TOPK,
        "return_tokens_as_token_ids": True, **(extra or {})})
    if r.status_code != 200:
        print(f"{url}: {r.status_code} {r.text[:300]}", flush=True)
        return None
    lp = r.json()["choices"][0]["logprobs"]
    top = {int(k.split(":")[1]): v for k, v in lp["top_logprobs"][0].items()}
    return {"token": int(lp["tokens"][0].split(":")[1]), "top": top}


def device(model: str, out: Path, blends=BLENDS, timeout: float = 600, sets=None) -> list[dict]:
    import httpx

    from helpers import engines as eng
    from helpers.corpus import load_chunks
    from helpers.gpu import launch as gb
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    share = round(0.8 / (2 + len(blends)), 3)
    opts = dict(gpu_memory_utilization=share, max_model_len=8192, architecture=None)
    engines = [gb.full_engine(name, port, model, dtype=dtype, **opts)
               for name, port, dtype in (("full", 8100, "bfloat16"), ("full_fp32", 8101, "float32"))]
    for i, spec in enumerate(blends):
        path, ratio, dev = (*spec, "k")[:3]
        settings = GpuBlendSettings(path=path, store_gb=1.0, deviation=dev)
        engines.append(gb.blend_engine(blend_name(spec), 8110 + i, model, settings=settings, ratio=ratio,
                                       cpu_cache_gb=2.0, dtype="bfloat16", **opts))
    notes: dict = {"model": model, "blends": list(blends)}
    rows: list[dict] = []
    try:
        notes["failed"] = eng.start_all(engines, timeout)
        card = gpu_name()
        for name, err in notes["failed"].items():
            print(f"{name} did not start: {err}", flush=True)
        engines = [e for e in engines if e.name not in notes["failed"]]
        notes["start_s"] = round(time.time() - t_start, 1)
        print(f"engines up in {notes['start_s']} s", flush=True)
        tok = gb.tokenizer_for(model)
        from helpers.corpus import load_chunks

        with httpx.Client(timeout=600) as client:
            t0 = time.time()
            for e in (e for e in engines if not e.name.startswith("full")):
                gb.precompute(e, list(load_chunks().values()), progress=False)
            notes["precompute_s"] = round(time.time() - t0, 1)
            raw = {}
            for set_name, prompts in prompt_sets().items():
                if sets and set_name not in sets:
                    continue
                ids = [prompt_ids(tok, set_name, chunks, q) for chunks, q in prompts]
                answers = {e.name: [first_token(client, e.url, model, p, None if e.name.startswith("full")
                                                else gb.NO_SAVE) for p in ids] for e in engines}
                raw[set_name] = {"tokens": [len(p) for p in ids],
                                 "answers": {k: [a and {"token": a["token"], "top": a["top"]} for a in v]
                                             for k, v in answers.items()}}
                for name, s in summarize(answers, "full").items():
                    ratio = "" if name.startswith("full") else name.split("_", 1)[1]
                    path = "" if name.startswith("full") else name.split("_", 1)[0]
                    variant = "select-by-v" if path.endswith("-v") else ""
                    rows.append({"date": time.strftime("%Y-%m-%d"), "card": card,
                                 "setup": "1 GPU, all engines at once", "backend": "vllm",
                                 "model": "SmolLM2-135M-Instruct (bf16)", "engine": name,
                                 "blend_path": path.removesuffix("-v"), "variant": variant, "ratio": ratio,
                                 "prompt_set": set_name, **s,
                                 "exact_kl_mean": ""})
                    print(set_name, name, s, flush=True)
        write_csv(out / "quality.csv", rows)
        (out / "raw.json").write_text(json.dumps(raw))
    finally:
        notes["fast_fallbacks"] = scrape_fallbacks(engines, out)  # before the engines stop
        for r in rows:  # not a CSV column (write_csv ignores it)
            if r["engine"] in notes["fast_fallbacks"]:
                r["fast_fallbacks"] = notes["fast_fallbacks"][r["engine"]]
        for e in engines:
            eng.stop_engine(e)
        with open(out / "logs.txt", "wb") as f:  # one file: the device returns few files
            for e in engines:
                if e.log.exists():
                    f.write(f"\n===== {e.name} =====\n".encode() + e.log.read_bytes()[-300_000:])
        notes["wall_s"] = round(time.time() - t_start, 1)
        (out / "notes.json").write_text(json.dumps(notes, indent=1))
    return rows


# ------------------------------------------------------------------ the embedded engine, same prompts
def embedded(out: Path, ratios=RATIOS, sets=("qa",), model: str | None = None) -> list[dict]:
    """The same conversations on the CPU engine (float32, separators never fed to the model): blend
    and naive reuse (ratio 0) vs its own full prefill, top-20 KL as on the GPU and the exact KL."""
    from helpers.metrics import kl
    from helpers.prompts import chat_segments
    from helpers.settings import BlendSettings
    from helpers.walkthrough import load_runner

    runner = load_runner(model)
    rows = []
    for set_name in sets:
        prompts = prompt_sets()[set_name]
        ref, got = [], {r: [] for r in (0.0, *ratios)}
        exact = {r: [] for r in got}
        for chunks, question in prompts:
            segments = chat_segments(runner, chunks, question)
            full = runner.full_prefill([t for s in segments for t in s]).logits
            ref.append(top_logprobs(full))
            for r in got:
                logits = runner.blend_prefill(segments, BlendSettings(ratio=r)).logits
                got[r].append(top_logprobs(logits))
                exact[r].append(kl(full, logits))
        for r, answers in got.items():
            s = summarize({"full": ref, "blend": answers}, "full")["blend"]
            rows.append({"backend": "embedded", "model": "SmolLM2-135M-Instruct (float32)",
                         "engine": "naive_reuse" if r == 0 else f"blend_{r}", "blend_path": "",
                         "ratio": r, "prompt_set": set_name, **s,
                         "exact_kl_mean": round(statistics.fmean(exact[r]), 4), "card": "CPU",
                         "date": time.strftime("%Y-%m-%d"), "setup": "in process"})
            print(rows[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, rows)
    return rows


def top_logprobs(logits, k: int = TOPK) -> dict:
    """{"token", "top": {id: logprob}} of next-token logits, as the GPU engines report them."""
    import torch

    lp = torch.log_softmax(logits.float(), -1)
    values, ids = lp.topk(k)
    return {"token": int(ids[0]), "top": dict(zip(ids.tolist(), values.tolist(), strict=True))}


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("device")
    d.add_argument("--model", required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--blends", default=",".join(f"{p}:{r}" for p, r in BLENDS),
                   help="blend engines as PATH:RATIO[:DEVIATION], PATH fast, fixed or upstream, "
                        "DEVIATION k (default) or v")
    e = sub.add_parser("embedded")
    e.add_argument("--out", type=Path, required=True, help="CSV to write")
    e.add_argument("--sets", default="qa", help="prompt sets: qa, same_pos, reordered")
    a = ap.parse_args(argv)
    if a.cmd == "embedded":
        embedded(a.out, sets=tuple(a.sets.split(",")))
        return 0
    if a.cmd == "device":
        blends = tuple((b[0], float(b[1]), *b[2:]) for b in (x.split(":") for x in a.blends.split(",")))
        return 0 if device(a.model, a.out, blends) else 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
