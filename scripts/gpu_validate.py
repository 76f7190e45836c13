"""Validate the GPU backend on real GPUs and measure TTFT, blend vs baseline (results in docs/gpu.md).

    python scripts/gpu_validate.py model 7b DIR [--tokenizer SRC]   # dummy-weight model folder
    python scripts/gpu_validate.py selftest OUT.json                # 4-D KV transfer vs lmcache.c_ops
    python scripts/gpu_validate.py bench --label 7B --out DIR       # against running engines
    python scripts/gpu_validate.py device --shape 7b --out DIR      # all of it, on the device machine

`model` writes a config of a real shape (Mistral-7B-Instruct-v0.2; a Yi-34B-like Llama with 60
layers) with SmolLM2's tokenizer, for `--load-format dummy`: random weights, so TTFT is realistic
for the shape and the text is garbage. `bench` precomputes the chunks (unless the launcher did),
then for each size sends reordered-chunk prompts (a different random subset and order each time) to
both engines one after the other: streaming completions through the openai client, max_tokens 1,
TTFT = time to the first streamed choice, median over the queries after one warm-up. It reads the
blend engine's log for LMCache's hit count of every query. `device` starts both engines through
`./launch_engines.sh --backend vllm`, runs selftest and bench, and copies the logs to --out.
`--merge 1,4` (bench, device) measures each size also with every 4 consecutive corpus chunks joined
into one document: prompts of the same length with 4 times fewer segments (precomputed first).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers import engines as eng  # noqa: E402
from helpers import runtime  # noqa: E402
from helpers.gpu import launch as gpu  # noqa: E402
from helpers.prompts import chat_prompt_ids, separator_ids  # noqa: E402

QUESTION = "Which option or filter described above does what the user needs? Answer briefly."
SHAPES = {
    # mistralai/Mistral-7B-Instruct-v0.2's config.json, with SmolLM2's vocabulary
    "7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 32768, "rope_theta": 1e6,
           "sliding_window": None},
    # Yi-34B-like: a Llama with 60 layers, GQA with 8 KV heads
    "34b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 7168,
            "intermediate_size": 20480, "num_hidden_layers": 60, "num_attention_heads": 56,
            "num_key_value_heads": 8, "max_position_embeddings": 32768, "rope_theta": 5e6},
}
LABELS = {"7b": "7B (Mistral-7B shape)", "34b": "34B (Yi-34B-like, 60 layers)"}
CSV_FIELDS = ["model_shape", "gpus", "target_tokens", "prompt_tokens", "queries", "full_ttft_ms",
              "blend_ttft_ms", "speedup", "lmcache_hit_pct", "full_engine_ms", "blend_engine_ms"]
HIT_RE = re.compile(r"Total tokens (\d+), Inference Engine computed tokens: (\d+), LMCache hit tokens: (\d+)")


# ------------------------------------------------------------------ model folder
def make_model(shape: str, out: Path, tokenizer: Path) -> Path:
    config = {**SHAPES[shape], "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2,
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "attention_dropout": 0.0, "initializer_range": 0.02}
    config["rope_parameters"] = {"rope_theta": config["rope_theta"], "rope_type": "default"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    return out


# ------------------------------------------------------------------ selftest on the GPU
def selftest(out: Path | None = None) -> dict:
    """Our 4-D gather/scatter against LMCache's compiled op on the same data in its 5-D layout."""
    import lmcache.c_ops as ops
    import torch

    from helpers.gpu.plugin import paged_kv_transfer

    torch.manual_seed(0)
    nb, bs, nh, hs, n = 2048, 16, 8, 128, 12000
    slots = torch.randperm(nb * bs, device="cuda")[:n]  # padding (-1) is covered by the CPU tests
    res = {}
    for layout in ("NB_BS_NH_CS", "NB_NH_BS_CS"):
        shape = (nb, bs, nh, 2 * hs) if layout == "NB_BS_NH_CS" else (nb, nh, bs, 2 * hs)
        paged = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        split = paged.unflatten(-1, (2, hs))  # -> [2, NB, BS, NH, HS], LMCache's flash-attn layout
        five = (split.permute(3, 0, 1, 2, 4) if layout == "NB_BS_NH_CS" else split.permute(3, 0, 2, 1, 4))
        five = five.contiguous()
        fmt = ops.EngineKVFormat.NL_X_TWO_NB_BS_NH_HS
        got, want = (torch.zeros(2, n, nh * hs, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ops.single_layer_kv_transfer(want, five, slots, ops.TransferDirection.D2H, fmt, token_major=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        paged_kv_transfer(got, paged, slots, layout, to_paged=False)
        torch.cuda.synchronize()
        d2h_ms = (time.perf_counter() - t0) * 1e3
        lmc = torch.randn(2, n, nh * hs, device="cuda", dtype=torch.bfloat16)
        paged_back, five_back = torch.zeros_like(paged), torch.zeros_like(five)
        ops.single_layer_kv_transfer(lmc, five_back, slots, ops.TransferDirection.H2D, fmt, token_major=False)
        t0 = time.perf_counter()
        paged_kv_transfer(lmc, paged_back, slots, layout, to_paged=True)
        torch.cuda.synchronize()
        h2d_ms = (time.perf_counter() - t0) * 1e3
        split_back = paged_back.unflatten(-1, (2, hs))
        mine = (split_back.permute(3, 0, 1, 2, 4) if layout == "NB_BS_NH_CS"
                else split_back.permute(3, 0, 2, 1, 4))
        res[layout] = {"d2h_equal": bool(torch.equal(got, want)),
                       "h2d_equal": bool(torch.equal(mine, five_back)),
                       "d2h_ms": round(d2h_ms, 2), "h2d_ms": round(h2d_ms, 2), "tokens": n}
    res["ok"] = all(r["d2h_equal"] and r["h2d_equal"] for r in res.values())
    if out:
        out.write_text(json.dumps(res, indent=2))
    print("selftest:", json.dumps(res))
    return res


# ------------------------------------------------------------------ benchmark
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


def ttft(client, model: str, ids: list[int]) -> float:
    """Seconds to the first streamed choice (max_tokens 1: the prefill).

    The ids go in `extra_body`: given as `prompt=`, the openai SDK walks the list item by item
    (~0.3 s of client CPU for 32K ids), which would land in both engines' TTFT."""
    t0 = time.perf_counter()
    first = None
    for event in client.completions.create(model=model, prompt="", extra_body={"prompt": ids}, max_tokens=1,
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


def timed(client, e, model: str, ids: list[int]) -> tuple[float, float | None]:
    """(client TTFT ms, engine-side TTFT ms or None)."""
    before = engine_ttft(e.url)
    ms = ttft(client, model, ids) * 1e3
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


def bench(label: str, gpus: str, sizes: list[int], queries: int, out: Path, precompute: bool,
          deadline: float, merges: tuple[int, ...] = (1,)) -> list[dict]:
    import openai

    blend, full = eng.find("blend"), eng.find("full")
    clients = {e.name: openai.OpenAI(base_url=e.url + "/v1", api_key="local", max_retries=0, timeout=900)
               for e in (blend, full)}
    model = blend.model or clients["blend"].models.list().data[0].id
    tok = gpu.tokenizer_for(model)
    base, source = corpus_chunks()
    docs = {m: merge_chunks(base, m) for m in merges}
    for m, chunks in docs.items():
        if precompute or m > 1:  # the launcher precomputes the corpus chunks, not merged documents
            print(f"precompute (merge {m}):", eng.precompute(blend, list(chunks.values()), progress=False),
                  flush=True)
    overhead = len(chat_prompt_ids(tok, [], QUESTION)) + 8
    costs = {m: {n: len(tok.encode(t, add_special_tokens=False)) + len(separator_ids(tok))
                 for n, t in chunks.items()} for m, chunks in docs.items()}  # a chunk brings a separator
    rows, raw = [], []
    for size, m in ((size, m) for size in sizes for m in merges):
        if time.time() > deadline:
            print(f"skipping {size} (merge {m}): out of time", flush=True)
            continue
        chunks, samples = docs[m], []
        for k in range(queries + 1):  # the first is a warm-up
            names = pick(costs[m], size - overhead, f"{label}-{size}-{k}" + (f"-m{m}" if m > 1 else ""))
            texts = [chunks[n] for n in names]
            p_blend = p_full = chat_prompt_ids(tok, texts, QUESTION)  # identical ids for both
            offset = blend.log.stat().st_size
            s = {"size": size, "merge": m, "query": k, "chunks": len(names), "blend_tokens": len(p_blend),
                 "full_tokens": len(p_full), "warmup": k == 0}
            try:
                s["blend_ms"], s["blend_engine_ms"] = timed(clients["blend"], blend, model, p_blend)
                s["full_ms"], s["full_engine_ms"] = timed(clients["full"], full, model, p_full)
            except openai.APIError as err:
                s["error"] = str(err)[:300]
            time.sleep(0.2)  # let the engine's log reach the file
            hits = log_hits(blend.log, offset)
            if hits:
                s["logged_total"], s["hit_tokens"] = hits[-1]
            samples.append(s)
            print(json.dumps(s), flush=True)
        raw += samples
        good = [s for s in samples if not s["warmup"] and "blend_ms" in s]
        if not good:
            continue
        blend_ms = statistics.median(s["blend_ms"] for s in good)
        full_ms = statistics.median(s["full_ms"] for s in good)
        eng_ms = {n: [s[f"{n}_engine_ms"] for s in good if s.get(f"{n}_engine_ms")]
                  for n in ("blend", "full")}
        hit = [s["hit_tokens"] / s["logged_total"] for s in good if s.get("logged_total")]
        rows.append({"model_shape": label, "gpus": gpus, "target_tokens": size,
                     "prompt_tokens": int(statistics.median(s["blend_tokens"] for s in good)),
                     "queries": len(good), "full_ttft_ms": round(full_ms, 1),
                     "blend_ttft_ms": round(blend_ms, 1), "speedup": round(full_ms / blend_ms, 2),
                     "lmcache_hit_pct": round(100 * statistics.median(hit), 1) if hit else "",
                     **{f"{n}_engine_ms": round(statistics.median(v), 1) if v else ""
                        for n, v in eng_ms.items()},
                     "merge": m, "chunks": int(statistics.median(s["chunks"] for s in good))})
        write_results(out, label, rows, raw, source, merged=merges != (1,))
    return rows


def write_results(out: Path, label: str, rows: list[dict], raw: list[dict], source: str,
                  merged: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    slug = label.split()[0].lower()
    with open(out / f"ttft_{slug}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS + (["merge", "chunks"] if merged else []), extrasaction="ignore")
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (r["target_tokens"], r["merge"])))
    (out / f"raw_{slug}.json").write_text(json.dumps({"chunks": source, "samples": raw}, indent=1))


# ------------------------------------------------------------------ the device run
def device(shape: str, out: Path, sizes: list[int], queries: int, budget_s: float, run_selftest: bool,
           merges: tuple[int, ...] = (1,)) -> int:
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    notes = {"shape": shape}
    model = ROOT / ".gpu" / "models" / shape
    if not (model / "config.json").exists():
        make_model(shape, model, ROOT / ".cache" / "smollm2-f32")
    if run_selftest:
        # in a process of its own, so its CUDA memory is gone before the engines start
        test = subprocess.run([sys.executable, __file__, "selftest", str(out / "selftest.json")],
                              capture_output=True, text=True)
        notes["selftest_rc"] = test.returncode
        print(test.stdout + test.stderr[-3000:], flush=True)
    gpus = gpu.visible_gpus()
    layout = f"{len(gpus)}x H200" if len(gpus) >= 2 else "1x H200 (shared)"
    t0 = time.time()
    launch = subprocess.run(["./launch_engines.sh", "--backend", "vllm", "--model", str(model),
                             "--load-format", "dummy", "--timeout", "420"],
                            cwd=ROOT, capture_output=True, text=True)
    notes["launch_s"] = round(time.time() - t0, 1)
    notes["launch_rc"] = launch.returncode
    (out / f"launch_{shape}.log").write_text(launch.stdout + launch.stderr)
    print(launch.stdout + launch.stderr, flush=True)
    rows = []
    try:
        if launch.returncode == 0:
            precomputed = "chunk KV ready" in launch.stdout
            rows = bench(LABELS[shape], layout, sizes, queries, out, not precomputed, t_start + budget_s,
                         merges)
    finally:
        log = runtime.RUN_DIR / "blend.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        notes["plugin_active_lines"] = text.count("kvblend plugin active")
        notes["double_unpin_lines"] = text.count("Double unpin")
        notes["model_registered"] = "Registering vllm model for vllm-instance" in text
        notes["blender_created"] = "Creating blender for vllm-instance" in text
        notes["logged_requests_with_hits"] = sum(1 for m in HIT_RE.finditer(text) if int(m[3]) > 0)
        eng.stop()
        for name in ("blend", "full"):
            src = runtime.RUN_DIR / f"{name}.log"
            if src.exists():  # the last 4 MB is plenty and stays under the copy-back limit
                data = src.read_bytes()[-4_000_000:]
                (out / f"{name}_{shape}.log").write_bytes(data)
        notes["rows"] = rows
        notes["wall_s"] = round(time.time() - t_start, 1)
        (out / f"notes_{shape}.json").write_text(json.dumps(notes, indent=2))
        print(json.dumps(notes, indent=2), flush=True)
    return 0 if rows else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("shape", choices=sorted(SHAPES))
    m.add_argument("dir", type=Path)
    m.add_argument("--tokenizer", type=Path, default=ROOT / ".cache" / "smollm2-f32")
    s = sub.add_parser("selftest")
    s.add_argument("out", type=Path, nargs="?")
    for p in (sub.add_parser("bench"), sub.add_parser("device")):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--sizes", default="32768,16384,8192,4096,2048")
        p.add_argument("--queries", type=int, default=4)
        p.add_argument("--budget-s", type=float, default=500, help="stop starting new sizes after this")
        p.add_argument("--merge", default="1", help="join N consecutive chunks into one document; "
                       "a list (1,4) measures each size with each")
        if p.prog.endswith("bench"):
            p.add_argument("--label", required=True)
            p.add_argument("--gpus", default="")
            p.add_argument("--precompute", action="store_true")
        else:
            p.add_argument("--shape", choices=sorted(SHAPES), required=True)
            p.add_argument("--selftest", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "model":
        print(make_model(a.shape, a.dir, a.tokenizer))
        return 0
    if a.cmd == "selftest":
        return 0 if selftest(a.out)["ok"] else 1
    sizes = [int(x) for x in a.sizes.split(",")]
    merges = tuple(int(x) for x in a.merge.split(","))
    if a.cmd == "bench":
        rows = bench(a.label, a.gpus, sizes, a.queries, a.out, a.precompute, time.time() + a.budget_s, merges)
        return 0 if rows else 1
    return device(a.shape, a.out, sizes, a.queries, a.budget_s, a.selftest, merges)


if __name__ == "__main__":
    sys.exit(main())
