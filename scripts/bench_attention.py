"""On a GPU: the fast path's attention of the selected tokens, exact and timed, per kernel option.

    python scripts/bench_attention.py [OUT.json] [--variants N] [--autotune]

The selected queries' attention (FlexAttention with the exact causal mask; split: FlashAttention for
each q-block's prefix keys) against a dense masked reference and SDPA's full causal attention, with
each of FLEX_VARIANTS' kernel options, and the chunk store's row gathers. `best` is the fastest exact
option set (GpuBlendSettings.flex_options).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers.gpu.fast import attention as at  # noqa: E402
from helpers.gpu.fast import masks as mk  # noqa: E402
from helpers.gpu.fast import store as st  # noqa: E402


def gpu_ms(fn, *args, repeat: int = 5, **kwargs) -> float:
    """Mean GPU wall time of fn(*args, **kwargs) in ms, after one warm-up call."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn(*args, **kwargs)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(*args, **kwargs)
    sync()
    return round((time.perf_counter() - t0) / repeat * 1e3, 3)


# FlexAttention kernel options to try on the device (bf16, head size 128); {}: torch's default for the
# card (on sm90 in torch 2.13's source: BLOCK_M 128, BLOCK_N 64, 3 stages, 8 warps; the device has 2.11)
FLEX_VARIANTS = [
    {},
    {"USE_TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_stages": 2, "num_warps": 8},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_stages": 2, "num_warps": 8, "USE_TMA": True},
]


def gather_check(device: str = "cuda", sizes=(8192, 32768), rows: int = 40_000) -> dict:
    """One layer's cached K and V of 8K and 32K prompt tokens gathered from a 7B-shaped chunk store
    (in pages of 16 rows, shuffled): across the row axis of [2, rows, kv_dim] (the old way)
    against ChunkStore.cached's two first-axis gathers; ms each, and whether they agree."""
    import torch

    store = st.ChunkStore(2, 1024, rows, torch.bfloat16, device)
    store.kv.normal_()
    pages = torch.randperm(store.pages)

    def row_axis(index):
        return store.kv[1][:, index]

    def first_axis(index):
        return store.cached(1, 0, index), store.cached(1, 1, index)

    res = {}
    for n in sizes:
        index = (pages[:, None] * store.page + torch.arange(store.page)).flatten()[:n].to(device)
        res[str(n)] = {"row_axis_ms": gpu_ms(row_axis, index), "first_axis_ms": gpu_ms(first_axis, index),
                       "equal": bool(torch.equal(row_axis(index), torch.stack(first_axis(index))))}
    return res


FLEX_SHAPES = ((300, 5), (8192, 1229), (32768, 4915))  # (keys, selected queries): 15% past 300


def flex_check(out: Path | None = None, device: str = "cuda", shapes=FLEX_SHAPES, gather=None,
               variants=FLEX_VARIANTS, autotune: bool = False) -> dict:
    """The fast path's attention on this GPU, for few and many selected queries, with the inputs the
    tail has (q: a view of the qkv rows; K/V: ChunkStore.cached's token-major rows): exact against
    a dense masked reference, and timed against SDPA's full causal attention over all tokens. The
    tail's way (attend_selected: head-major copies, then FlexAttention) with each of FLEX_VARIANTS'
    kernel options, and once without the copies (`views_ms`: FlexAttention on token-major views, the
    old way), and split (`flash_ms`, `flash16_ms`: FlashAttention for each q-block's prefix
    keys, FlexAttention for the rest; `flash_speedup` over the tail's way). `best`: the fastest exact
    options over the 8K and 32K shapes (what GpuBlendSettings.flex_options takes). `device`, `shapes` and
    `gather` (gather_check's sizes and rows) let
    tests/test_gpu_backend.py run it small on the CPU before the device does; `variants`, fewer option
    sets (each one compiles anew: `--variants 1` times torch's default alone, in about a minute);
    `autotune`, also the tail's way compiled with Triton's autotuning (flex_autotune:
    `autotune_ms`, `autotune_over_default`)."""
    import torch
    import torch.nn.functional as F


    def views(q, k, v, mask, scale):  # the strided way: no copies, the kernel reads the strides
        qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))
        out = at.flex_attention_fn(device)(qt, kt, vt, block_mask=mask, scale=scale, enable_gqa=True,
                                           kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
        return out[0].transpose(0, 1)

    res, dev, scale = {"variants": [json.dumps(o) for o in variants]}, device, 128 ** -0.5
    names = [f"{n_keys}x{n_sel}" for n_keys, n_sel in shapes]
    cases, sel_of = [], {}
    torch._dynamo.reset()
    for name, (n_keys, n_sel) in zip(names, shapes, strict=True):
        torch.manual_seed(0)
        q, k, v = (torch.randn(n_keys, h, 128, device=dev, dtype=torch.bfloat16) for h in (32, 8, 8))
        sel = torch.sort(torch.randperm(n_keys, device=dev)[:n_sel]).values
        mask = mk.exact_causal_mask(sel, n_keys)
        dense = torch.arange(n_keys, device=dev)[None, :] <= sel[:, None]
        ref = F.scaled_dot_product_attention(q[sel].transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=dense[None, None],
                                             enable_gqa=True)[0].transpose(0, 1)
        # q as the tail has it: a [tokens, heads, d] view of the wider qkv rows
        qkv = torch.cat([q[sel].flatten(1), q.new_zeros(n_sel, 2048)], dim=1)
        args = (qkv[:, :4096].view(n_sel, 32, 128), k, v, mask, scale)
        res[name] = {"sdpa_causal_all_ms": gpu_ms(F.scaled_dot_product_attention, q.transpose(0, 1)[None],
                                                  k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                                  is_causal=True, enable_gqa=True),
                     "views_ms": gpu_ms(views, *args),
                     "views_err": float((views(*args).float() - ref.float()).abs().max())}
        cases.append((name, args, ref))
        sel_of[name] = sel
    totals = [0.0] * len(variants)
    for i, options in enumerate(variants):
        torch._dynamo.reset()  # each variant compiles anew (dynamo's recompile limit)
        for name, args, ref in cases:
            at._FLEX.pop("warned", None)
            err = float((at.attend_selected(*args, options).float() - ref.float()).abs().max())
            ms = gpu_ms(at.attend_selected, *args, options)
            if at._FLEX.get("warned"):  # FlexAttention failed with these options: SDPA answered
                err, ms = float("inf"), float("inf")
            res[name][f"variant_{i}_ms"], res[name][f"variant_{i}_err"] = ms, err
            if name != names[0]:
                totals[i] += ms if err < 0.05 else float("inf")
    torch._dynamo.reset()
    for name, (q, k, v, _, scale), ref in cases:  # FlashAttention for each q-block's prefix keys
        for split, page in (("flash", at.ONE_PAGE), ("flash16", 16)):
            at._FLEX.pop("warned", None)
            args = (q, k, v, mk.exact_causal_mask(sel_of[name], k.shape[0], page), scale, {})
            err = float((at.attend_selected(*args).float() - ref.float()).abs().max())
            ms = gpu_ms(at.attend_selected, *args)
            if at._FLEX.get("warned"):  # FlashAttention or FlexAttention failed: SDPA answered
                err, ms = float("inf"), float("inf")
            res[name][f"{split}_ms"], res[name][f"{split}_err"] = ms, err
    res["ok"] = all(res[s][f"{v}_err"] < 0.05 for s in names for v in ("variant_0", "views", "flash"))
    res["views_over_copies"] = round(sum(res[s]["views_ms"] for s in names[1:]) / totals[0], 3)
    for split in ("flash", "flash16"):  # > 1: the split beats FlexAttention alone (torch's options)
        res[f"{split}_speedup"] = round(totals[0] / sum(res[s][f"{split}_ms"] for s in names[1:]), 3)
    if autotune:  # the tail's way once more, compiled anew with Triton's autotuning
        torch._dynamo.reset()
        for name, args, ref in cases:
            err = (at.attend_selected(*args, {}, True).float() - ref.float()).abs().max()
            res[name]["autotune_err"] = float(err)
            res[name]["autotune_ms"] = gpu_ms(at.attend_selected, *args, {}, True)
        tuned = sum(res[s]["autotune_ms"] for s in names[1:])
        res["autotune_over_default"] = round(totals[0] / tuned, 3)
        res["ok"] = res["ok"] and all(res[s]["autotune_err"] < 0.05 for s in names)
    res["gather"] = gather_check(device, **(gather or {}))
    best = min(range(len(totals)), key=totals.__getitem__)
    res["best"] = variants[best] if totals[best] < float("inf") else {}
    res["best_over_default"] = round(totals[0] / totals[best], 3) if totals[best] < float("inf") else None
    if out:
        out.write_text(json.dumps(res, indent=2))
    print("flex:", json.dumps(res))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--variants", type=int, default=len(FLEX_VARIANTS),
                    help="time only the first N kernel option sets (1: torch's default)")
    ap.add_argument("--autotune", action="store_true", help="also time FlexAttention autotuned by Triton")
    a = ap.parse_args(argv)
    res = flex_check(a.out, variants=FLEX_VARIANTS[:max(a.variants, 1)], autotune=a.autotune)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
