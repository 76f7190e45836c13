"""On a GPU: our 4-D KV gather/scatter against LMCache's compiled op, equal and timed.

    python scripts/check_kv_transfer.py [OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def selftest(out: Path | None = None) -> dict:
    """Our 4-D gather/scatter against LMCache's compiled op on the same data in its 5-D layout."""
    import lmcache.c_ops as ops
    import torch

    from helpers.gpu.kv_transfer import paged_kv_transfer

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



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?")
    return 0 if selftest(ap.parse_args(argv).out)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
