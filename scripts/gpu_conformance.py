"""Is GPU blending right for every architecture and RoPE variant it accepts? The tiny checkpoints
(scripts/tiny_checkpoints.py) on the fast path, against the CPU float32 reference on the same ids.

    python scripts/gpu_conformance.py OUT [ARCH ...]     # on one GPU; writes OUT/conformance.csv

Per checkpoint two blend engines (bf16, one GPU, the fast path): ratio 0.15 at check layer 1 (the
default), and ratio 0 at check layer 0, where every layer past the first reads re-rotated cached K
(the launcher takes ratios in (0, 1]: this engine's LMCache config is rewritten to 0).
No full vLLM engine: the reference is the CPU (helpers/conformance.py),
and the noise floor is the CPU's bf16 full prefill against its float32 one, on the same ids.
Checks (helpers/conformance.py: CHECKS): same_pos (nothing moves; reference: full prefill),
moved_r0 (QA prompts of 4 chunks and one of 12, about 8K tokens), moved_r0.15. Engines of `WAVE`
checkpoints start together, while the CPU computes their references. The negative control (Llama-3.1
re-rotated with unscaled frequencies, LMCache's way) is measured on the CPU on the same prompts and
written as its own rows (card CPU): a settings switch for it would be a wrong path in the product.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import tiny_checkpoints as tc  # noqa: E402

from helpers.settings import GpuBlendSettings  # noqa: E402

# docs/benchmarks/gpu_conformance.csv's columns; run_id and commit are filled in when a run is published
FIELDS = ["date", "run_id", "commit", "card", "architecture", "rope_type", "check", "prompts", "max_tokens",
          "top20_kl", "first_token_agree", "floor", "threshold", "passed", "engine"]
WAVE = int(os.environ.get("KVBLEND_CONFORMANCE_WAVE", "4"))
MAX_MODEL_LEN = 16384
ENGINES = {"r0.15": (0.15, 1), "r0": None}  # name -> (ratio, check layer); r0 from CHECKS


def threshold(check: str, floor: float) -> float:
    """How far the GPU may be from the reference: two bf16 computations (the gpu tier's 2 x floor
    + 0.002); at ratio 0.15 selection itself differs a little between bf16 and float32, so 3 x floor
    + 0.003 (on the CPU, Llama-3.1 re-rotated unscaled is 0.022 there against a floor of 0.0044, at
    ratio 0 0.106: ratio 0 is the sharp RoPE check)."""
    return (3 * floor + 0.003) if check == "moved_r0.15" else (2 * floor + 0.002)


def engine_for(check: str) -> str:
    return "r0" if check == "moved_r0" else "r0.15"


def reference(path: Path, arch: str):
    """CPU side of one checkpoint: prompts, reference top-20 per prompt, the bf16 floor per check,
    and, for Llama-3.1, the negative control's rows."""
    import torch

    from helpers import conformance as cf

    t0 = time.time()
    ref = cf.Reference(path)
    bf16 = cf.Reference(path, torch.bfloat16)
    prompts = cf.prompts(ref.tok)
    answers = [cf.top_logprobs(ref.check(p)) for p in prompts]
    floors: dict[str, list[float]] = {}
    short = {tuple(p.ids) for p in prompts if len(p.chunks) <= 4}
    cache: dict = {}
    for p in prompts:
        if tuple(p.ids) in short:  # the floor on the short prompts (a bf16 CPU prefill of 8K is slow)
            if tuple(p.ids) not in cache:
                cache[tuple(p.ids)] = cf.score([cf.top_logprobs(ref.full(p.ids))],
                                               [cf.top_logprobs(bf16.full(p.ids))])[0]
            floors.setdefault(p.check, []).append(cache[tuple(p.ids)])
    floor = {c: statistics.fmean(v) for c, v in floors.items()}
    negative = []
    if arch == "llama31":
        wrong = cf.rerotation(ref, cf.unscaled_cache(tc.rope_of(arch)["rope_theta"], ref.runner.head_dim))
        for check in ("moved_r0", "moved_r0.15"):
            ratio, layer = cf.CHECKS[check]
            ps = [(p, a) for p, a in zip(prompts, answers, strict=True) if p.check == check]
            got = [cf.top_logprobs(ref.blend(p.ids, ratio, layer, rerotate=wrong)) for p, _ in ps]
            kl, agree = cf.score([a for _, a in ps], got)
            negative.append({"check": f"negative_control_{check}", "prompts": len(ps), "top20_kl": kl,
                             "first_token_agree": agree, "floor": floor[check],
                             "max_tokens": max(len(p.ids) for p, _ in ps), "engine": "cpu unscaled rope"})
    print(f"{arch}: CPU reference in {time.time() - t0:.0f} s, floor {floor}", flush=True)
    return prompts, answers, floor, negative


def device(out: Path, archs=None, timeout: float = 600) -> list[dict]:
    import httpx

    from helpers import conformance as cf
    from helpers import engines as eng
    from helpers.gpu import launch as gb
    from scripts.gpu_quality import first_token, gpu_name

    out.mkdir(parents=True, exist_ok=True)
    ckpts = Path(tempfile.mkdtemp(prefix="kvblend-tiny-"))  # 70 MB each: kept out of OUT
    archs = list(archs or tc.ARCHS)
    rows: list[dict] = []
    notes: dict = {"archs": archs, "wave": WAVE, "waves": []}
    card, date, t_start = gpu_name(), time.strftime("%Y-%m-%d"), time.time()
    port = 8200
    for w in range(0, len(archs), WAVE):
        wave, t_wave = archs[w: w + WAVE], time.time()
        paths = {a: tc.write(a, ckpts) for a in wave}
        share = round(0.8 / (len(ENGINES) * len(wave)), 3)
        engines: dict[tuple[str, str], object] = {}
        for a in wave:
            config = json.loads((paths[a] / "config.json").read_text())
            for name in ENGINES:
                ratio, layer = ENGINES[name] or cf.CHECKS["moved_r0"]
                engines[(a, name)] = gb.blend_engine(
                    f"conf_{a}_{name}", port, str(paths[a]),
                    settings=GpuBlendSettings(path="fast", store_gb=0.5), ratio=ratio or 0.5,
                    check_layer=layer, cpu_cache_gb=1.0, dtype="bfloat16",
                    gpu_memory_utilization=share, max_model_len=MAX_MODEL_LEN,
                    architecture=gb.served_architecture(config, str(paths[a])))
                if ratio == 0:
                    zero_ratio(engines[(a, name)])
                port += 1
        try:
            for e in engines.values():
                eng.launch(e)
            refs = {a: reference(paths[a], a) for a in wave}  # while the engines start
            failed = {}
            for key, e in engines.items():
                try:
                    eng.wait_healthy([e], max(60.0, timeout - (time.time() - t_wave)), progress=False)
                except eng.EngineError:
                    try:  # several starting together can fail vLLM's memory profiling: once more, alone
                        eng.launch(e)
                        eng.wait_healthy([e], 300, progress=False)
                    except eng.EngineError as err:
                        failed[key] = str(err)[-2000:]
                        print(f"{e.name} did not start: {failed[key]}", flush=True)
            t_up = time.time()
            with httpx.Client(timeout=600) as client:
                for a in wave:
                    prompts, answers, floor, negative = refs[a]
                    texts = list(dict.fromkeys(t for p in prompts for t in p.chunks))
                    for name in ENGINES:
                        if (a, name) not in failed:
                            gb.precompute(engines[(a, name)], texts, progress=False)
                    got = []
                    for p in prompts:
                        key = (a, engine_for(p.check))
                        got.append(None if key in failed else
                                   first_token(client, engines[key].url, str(paths[a]), p.ids, gb.NO_SAVE))
                    rope_type = tc.rope_of(a)["rope_type"]
                    for check in cf.CHECKS:
                        idx = [i for i, p in enumerate(prompts) if p.check == check]
                        kl, agree = cf.score([answers[i] for i in idx], [got[i] for i in idx])
                        limit = threshold(check, floor[check])
                        rows.append({"check": check, "prompts": len(idx), "top20_kl": kl,
                                     "first_token_agree": agree, "floor": floor[check], "threshold": limit,
                                     "passed": bool(kl <= limit), "engine": f"fast {engine_for(check)}",
                                     "max_tokens": max(len(prompts[i].ids) for i in idx),
                                     "card": card, "date": date, "architecture": a, "rope_type": rope_type})
                        print(rows[-1], flush=True)
                    for r in negative:
                        rows.append({**r, "threshold": threshold(r["check"].removeprefix("negative_control_"),
                                                                 r["floor"]),
                                     "card": "CPU", "date": date, "architecture": a, "rope_type": rope_type})
                        rows[-1]["passed"] = bool(r["top20_kl"] <= rows[-1]["threshold"])
                        print(rows[-1], flush=True)
            notes["waves"].append({"archs": wave, "start_s": round(t_up - t_wave, 1),
                                   "wall_s": round(time.time() - t_wave, 1), "failed": failed})
        finally:
            for e in engines.values():
                eng.stop_engine(e)
            with open(out / "logs.txt", "ab") as f:
                for e in engines.values():
                    if e.log.exists():
                        f.write(f"\n===== {e.name} =====\n".encode() + e.log.read_bytes()[-100_000:])
        write_csv(out / "conformance.csv", rows)
    shutil.rmtree(ckpts, ignore_errors=True)
    notes["wall_s"] = round(time.time() - t_start, 1)
    (out / "notes.json").write_text(json.dumps(notes, indent=1))
    return rows


def zero_ratio(engine) -> None:
    """The engine's LMCache config at ratio 0 (the fast path then recomputes no cached token)."""
    path = Path(engine.env["LMCACHE_CONFIG_FILE"])
    lines = path.read_text().splitlines()
    path.write_text("\n".join("blend_recompute_ratios: [0.0]" if line.startswith("blend_recompute_ratios")
                              else line for line in lines) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()})


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    os.environ.setdefault("KVBLEND_SHARE_GPU", "1")
    device(Path(sys.argv[1]), sys.argv[2:] or None)
