"""The layers past the check layer (all but two or three) as CUDA graphs: their inputs live in
buffers padded to a few bucketed sizes (`Tail`), so a graph captured the first time a bucket is
seen replays for every later prompt of it. On an H200 the eager loop's ~700 kernel launches took
more host time than the GPU work on short prompts (7B: 91 -> 65 ms TTFT at 1.8K tokens, 2026-12).
Past GRAPH_MAX_TOKENS the work is GPU-bound and runs eagerly, unpadded."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from .masks import BLOCK, exact_causal_mask, refill_mask

log = logging.getLogger("vllm.kvblend_plugin")
MAX_TAILS = 12  # buckets kept (their buffers and graphs), least recently used out first
GRAPH_MAX_TOKENS = 12288  # longer prompts are GPU-bound: their tail runs eagerly, barely padded


def bucket(n: int, least: int = BLOCK) -> int:
    """n rounded up to a multiple of `least` and to one of 8 sizes per doubling: few distinct shapes
    (each one a CUDA graph), at most 1/8 of padding past 8 x least."""
    step = max(least, (1 << max(n.bit_length() - 4, 0)) // least * least)
    return -(-n // step) * step


class Tail:
    """The inputs of the layers past the check layer for one bucket of shapes, in buffers that stay
    put (a CUDA graph replays on the same addresses): `n_pad` selected rows among `n_keys` tokens.

    Padding is inert and cheap: padded query rows come first, zeros at position 0 (they attend one
    key), their K/V go to a spare row past the prompt (never attended to, its slot -1: vLLM's cache
    op skips it); padded token rows gather store row 0 at position 0, never attended to either."""

    def __init__(self, n_pad: int, n_keys: int, hidden_size: int, dtype, device, split: int = 0):
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.n_pad, self.n_keys = n_pad, n_keys
        self.hidden = zeros(n_pad, hidden_size, dtype=dtype)
        self.residual = zeros(n_pad, hidden_size, dtype=dtype)
        self.rows, self.positions = zeros(n_pad), zeros(n_pad)  # where selected K/V go; positions
        self.index, self.old_positions, self.new_positions = zeros(n_keys), zeros(n_keys), zeros(n_keys)
        self.slots = torch.full((n_keys,), -1, dtype=torch.long, device=device)
        self.block_mask = self.graph = None
        self.split = split  # exact_causal_mask's

    def fill(self, hidden, residual, selected, index, old_positions, slot_mapping) -> None:
        n_all, p = index.numel(), self.n_pad - selected.numel()  # p padded query rows, first
        self.hidden[p:], self.residual[p:] = hidden, residual
        self.hidden[:p], self.residual[:p] = 0, 0
        self.rows[p:], self.rows[:p] = selected, self.n_keys - 1
        self.positions[p:], self.positions[:p] = selected, 0
        self.index[:n_all], self.index[n_all:] = index, 0
        self.old_positions[:n_all], self.old_positions[n_all:] = old_positions, 0
        torch.arange(self.n_keys, out=self.new_positions)
        self.new_positions[n_all:] = 0
        self.slots[:n_all], self.slots[n_all:] = slot_mapping, -1
        if self.block_mask is None:
            self.block_mask = exact_causal_mask(self.positions, self.n_keys, self.split)
        else:
            refill_mask(self.block_mask, self.positions, self.n_keys)



class Tails:
    """The Tail of each bucket, least recently used out past MAX_TAILS. Graphs share one memory
    pool: they only write vLLM's cache and replay one at a time."""

    def __init__(self, graphs: bool):
        self.kept: OrderedDict = OrderedDict()  # (rows bucket, keys bucket, cache address) -> Tail
        self.graphs = graphs  # capture graphs (off for good after a failed capture)
        self.pool = None

    def get(self, n: int, n_all: int, hidden, kvcaches, split_for, bucketed: bool = True) -> Tail:
        """The Tail for n selected rows among n_all tokens: its bucket's (made when new), or else
        one of this prompt's size (padded to whole q-blocks only), not kept. split_for(n_keys):
        exact_causal_mask's `split`."""
        if not bucketed:
            n_pad = -(-n // BLOCK) * BLOCK
            split = split_for(n_all)  # as the check layer chose
            return Tail(n_pad, n_all + 1, hidden.shape[-1], hidden.dtype, hidden.device, split)
        key = (bucket(n), bucket(n_all + 1), kvcaches[0].data_ptr())  # +1: a spare row for padding
        tail = self.kept.pop(key, None)
        if tail is None:
            split = split_for(key[1])  # one choice per bucket
            tail = Tail(key[0], key[1], hidden.shape[-1], hidden.dtype, hidden.device, split)
            while len(self.kept) >= MAX_TAILS:
                self.kept.pop(next(iter(self.kept)))
        self.kept[key] = tail
        return tail

    def capture(self, tail: Tail, run) -> None:
        """Record run()'s kernels (the tail's layers on its buffers) as one CUDA graph; nothing
        runs while capturing."""
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                run()
            tail.graph = graph
        except Exception:
            self.graphs = False
            log.exception("fast blend path: CUDA graph capture failed; its layers run eagerly from now on")
