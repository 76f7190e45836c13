"""CacheBlend's token selection, once, for every engine: the embedded engine (`embedded/blend.py`),
the GPU fast path and LMCache's blender as our plugin mends it. Torch only: importing it loads
neither transformers nor vLLM."""

from __future__ import annotations

import math

import torch


def select_tokens(deviation: torch.Tensor, ratio: float,
                  uncached: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """Sorted positions to recompute past the check layer.

    deviation [n_tokens]: how far each token's cached K (or V) is from the fresh one at the check
    layer (the values at `uncached` positions are ignored). uncached: positions with no cached KV
    (the question, LMCache's separators), always selected.

    The rounding rule: of the n_cached = n_tokens - len(uncached) cached tokens, the
    ceil(ratio x n_cached) of largest deviation are selected, at most n_cached: none at ratio 0
    (full KV reuse), at least one for any ratio > 0 when there is a cached token, all at ratio 1.
    No host sync: the uncached ones rank first by an infinite deviation, one top-k takes both.

    group: a torch.distributed process group whose ranks each hold some of the KV heads (vLLM's
    tensor-parallel group), or None. The deviation is a sum over heads, so its all-reduced sum is
    the whole model's, and every rank selects the same tokens (else each would recompute other
    tokens, and o_proj's all-reduce would add rows of different tokens)."""
    n_uncached = 0 if uncached is None else uncached.numel()
    n_cached = deviation.numel() - n_uncached
    take = max(0, min(n_cached, math.ceil(ratio * n_cached)))
    score = deviation.float()
    if group is not None:
        import torch.distributed as dist

        score = deviation.to(torch.float32, copy=True)  # the caller's tensor stays its rank's own
        dist.all_reduce(score, op=dist.ReduceOp.SUM, group=group)
    if n_uncached:
        score = score.index_fill(0, uncached.to(torch.long), math.inf)
    return torch.sort(torch.topk(score, n_uncached + take).indices).values
