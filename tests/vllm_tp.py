"""Token selection across tensor-parallel ranks through vLLM 0.26's own process groups, on the CPU:
two processes join vLLM's distributed environment (gloo) and its tensor-parallel group, as a vLLM
engine with --tensor-parallel-size 2 does, each holding half of the KV heads; the fast path finds
vLLM's group itself (`helpers.gpu.fast.tp_group`) and the mended blender selects through it. Run by
tests/test_against_vllm.py in a process of its own; tests/test_tp_selection.py is the same with a
plain gloo group standing in for vLLM's.

    python -m tests.vllm_tp     # prints one JSON object
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import upstream_python  # noqa: E402

WORLD = 2


def rank_main(rank: int, rendezvous: str, out: str) -> None:
    upstream_python.use_on_cpu()
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel, parallel_state

    from helpers.gpu import fast
    from helpers.gpu.fast import blender as bl
    from helpers.selection import select_tokens
    from tests.test_tp_selection import GAPS, RATIO, fast_selection, kv, mended_selection, shard

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_distributed_environment(world_size=WORLD, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"file://{rendezvous}")
        initialize_model_parallel(tensor_model_parallel_size=WORLD)
        fresh, cached = (shard(t, rank) for t in kv())
        group = fast.tp_group()
        result = {
            "tp_world_size": parallel_state.get_tp_group().world_size,
            "found_vllms_group": group is parallel_state.get_tp_group().device_group,
            "alone": select_tokens(bl.deviation(fresh, cached), RATIO, GAPS).tolist(),
            "fast": fast_selection(fresh, cached).tolist(),
            "mended": mended_selection(fresh, cached).tolist(),
        }
        torch.save(result, f"{out}.{rank}")
        torch.distributed.barrier()  # both ranks done
    os._exit(0)  # without gloo's teardown at exit, which aborts a rank now and then (SIGABRT)


def main() -> None:
    from helpers.gpu.fast import blender as bl
    from helpers.selection import select_tokens
    from tests.test_tp_selection import GAPS, RATIO, kv

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(f"{tmp}/rendezvous", f"{tmp}/sel"), nprocs=WORLD, join=True)
        ranks = [torch.load(f"{tmp}/sel.{r}") for r in range(WORLD)]
    fresh, cached = kv()
    one_rank = select_tokens(bl.deviation(fresh, cached), RATIO, GAPS).tolist()  # every head
    print(json.dumps({"one_rank": one_rank, "ranks": ranks}))


if __name__ == "__main__":
    main()
