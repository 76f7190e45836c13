"""Token selection agrees across tensor-parallel ranks: two processes in a torch.distributed gloo
group on the CPU, each holding half of the KV heads (as vLLM's tensor parallelism splits them),
select through `select_tokens`, the fast path's `FastBlender.select` and the mended blender's
`process_qkv`. Both ranks must pick the same tokens, and those of one rank holding every head.
(Blend engines with tensor parallelism are still refused at load: this is not yet run on GPUs.)"""

import os
import sys
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.gpu import fast, mended
from helpers.gpu.fast import blender as bl
from helpers.selection import select_tokens

N, KV_HEADS, D, RATIO, WORLD = 64, 4, 8, 0.2, 2
GAPS = torch.tensor([0, 1, 30, 31])  # separators: always selected


def kv():
    """Fresh and cached K at the check layer, [N, KV_HEADS * D], the whole model's heads. The two
    halves of the heads deviate at different tokens, so one rank alone would select other ones."""
    g = torch.Generator().manual_seed(7)
    cached = torch.randn(N, KV_HEADS * D, generator=g)
    fresh = cached + 0.1 * torch.randn(N, KV_HEADS * D, generator=g)
    half = KV_HEADS * D // WORLD
    fresh[5:15, :half] += 2.0  # rank 0's heads see these tokens move
    fresh[40:52, half:] += 2.0  # rank 1's heads see these
    fresh[20:23] += 1.0  # every head a little
    return fresh, cached


def shard(t, rank):
    half = t.shape[1] // WORLD
    return t[:, rank * half:(rank + 1) * half]


def fake_parallel_state(modules, world_size, group):
    """vllm.distributed.parallel_state with an initialized tensor-parallel group."""
    ps = types.ModuleType("vllm.distributed.parallel_state")
    ps.model_parallel_is_initialized = lambda: True
    ps.get_tp_group = lambda: types.SimpleNamespace(world_size=world_size, device_group=group)
    dist_mod = types.ModuleType("vllm.distributed")
    dist_mod.parallel_state = ps
    vllm = types.ModuleType("vllm")
    vllm.distributed = dist_mod
    modules.update({"vllm": vllm, "vllm.distributed": dist_mod,
                    "vllm.distributed.parallel_state": ps})


def mended_selection(fresh_k, cached_k):
    """LMCache's blender at its check layer, as our plugin mends it: the tokens it selects."""
    n = fresh_k.shape[0]
    old_k, old_v = cached_k.clone(), torch.zeros_like(cached_k)
    layer = types.SimpleNamespace(self_attn=types.SimpleNamespace(rotary_emb=lambda pos, q, k: (q, k)))
    lmc = types.SimpleNamespace(
        gpu_connector=types.SimpleNamespace(get_kv=lambda i: (old_k, old_v), current_gap_positions=GAPS),
        metadata=types.SimpleNamespace(positions=None, imp_indices=None),
        common_metadata=types.SimpleNamespace(check_layers=[1], recomp_ratios=[RATIO]),
        layerwise_model=types.SimpleNamespace(
            vllm_model=types.SimpleNamespace(model=types.SimpleNamespace(layers=[layer] * 2))))
    meta = types.SimpleNamespace(update_from_top_indices=lambda idx: None)
    mended.process_qkv(lmc, torch.zeros(n, 4), fresh_k, torch.zeros_like(fresh_k), torch.zeros(n, 4), 1, None,
                       meta, deviation="k")
    return lmc.metadata.imp_indices


def fast_selection(fresh_k, cached_k):
    """The fast path's selection at its check layer (`FastBlender.select`, its group as it finds it)."""
    me = types.SimpleNamespace(ratio=RATIO, tp_group=fast.tp_group())
    return bl.FastBlender.select(me, fresh_k, cached_k, GAPS)


def rank_main(rank, rendezvous, out):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        fake_parallel_state(sys.modules, WORLD, dist.group.WORLD)
        fresh, cached = (shard(t, rank) for t in kv())
        dev = bl.deviation(fresh, cached)
        result = {
            "alone": select_tokens(dev, RATIO, GAPS),
            "select_tokens": select_tokens(dev, RATIO, GAPS, dist.group.WORLD),
            "fast": fast_selection(fresh, cached),
            "mended": mended_selection(fresh, cached),
            "dev_untouched": torch.equal(dev, bl.deviation(fresh, cached)),
        }
        torch.save(result, f"{out}.{rank}")
        dist.barrier()  # both ranks done
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing gloo down: its teardown at exit aborts a rank now and then ("terminate
    # called without an active exception", SIGABRT), after the results are saved.
    os._exit(0)


def test_ranks_holding_half_the_heads_select_what_one_rank_with_all_would(tmp_path, monkeypatch):
    mp.spawn(rank_main, args=(str(tmp_path / "rendezvous"), str(tmp_path / "sel")), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"sel.{r}") for r in range(WORLD)]
    fresh, cached = kv()
    want = select_tokens(bl.deviation(fresh, cached), RATIO, GAPS)  # one rank, every head
    assert set(range(5, 15)) & set(want.tolist()) and set(range(40, 52)) & set(want.tolist())
    for r in got:
        for name in ("select_tokens", "fast", "mended"):
            assert r[name].tolist() == want.tolist(), name
        assert r["dev_untouched"]  # the all-reduce works on a copy
    # without the all-reduce the ranks disagree: the test would see a missing one
    assert got[0]["alone"].tolist() != got[1]["alone"].tolist()
    # one rank, no group: the same selection as before the group existed
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert fast.tp_group() is None
    assert fast_selection(fresh, cached).tolist() == want.tolist()
    assert mended_selection(fresh, cached).tolist() == want.tolist()


def test_one_rank_engines_all_reduce_nothing(monkeypatch):
    modules = {}
    fake_parallel_state(modules, 1, "a group of one")
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    assert fast.tp_group() is None
    modules["vllm.distributed.parallel_state"].get_tp_group = lambda: types.SimpleNamespace(
        world_size=2, device_group="the tp group")
    assert fast.tp_group() == "the tp group"
    modules["vllm.distributed.parallel_state"].model_parallel_is_initialized = lambda: False
    assert fast.tp_group() is None  # a process that set up no groups (vLLM's API server)
