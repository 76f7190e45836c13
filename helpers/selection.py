"""CacheBlend's token selection, once, for every engine: the embedded engine (`embedded/blend.py`),
the GPU fast path and LMCache's blender as our plugin mends it. Torch only: importing it loads
neither transformers nor vLLM."""

from __future__ import annotations

import math

import torch


def select_tokens(deviation: torch.Tensor, ratio: float,
                  uncached: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted positions to recompute past the check layer.

    deviation [n_tokens]: how far each token's cached K (or V) is from the fresh one at the check
    layer (the values at `uncached` positions are ignored). uncached: positions with no cached KV
    (the question, LMCache's separators), always selected.

    The rounding rule: of the n_cached = n_tokens - len(uncached) cached tokens, the
    ceil(ratio x n_cached) of largest deviation are selected, at most n_cached: none at ratio 0
    (full KV reuse), at least one for any ratio > 0 when there is a cached token, all at ratio 1.
    No host sync: the uncached ones rank first by an infinite deviation, one top-k takes both."""
    n_uncached = 0 if uncached is None else uncached.numel()
    n_cached = deviation.numel() - n_uncached
    take = max(0, min(n_cached, math.ceil(ratio * n_cached)))
    score = deviation.float()
    if n_uncached:
        score = score.index_fill(0, uncached.to(torch.long), math.inf)
    return torch.sort(torch.topk(score, n_uncached + take).indices).values
