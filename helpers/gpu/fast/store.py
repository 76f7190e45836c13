"""The fast path's GPU chunk store: each chunk's K/V for every layer in pages of GPU memory, taken
out of the engine's share of the card (vLLM's KV cache shrinks by as much)."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

log = logging.getLogger("vllm.kvblend_plugin")  # a child of vLLM's logger: lands in the engine log
PAGE = 16  # tokens per page of the chunk store


class ChunkStore:
    """Chunks' K/V for every layer in GPU memory: `kv[layer, 0 or 1, row]` is a token's K or V
    (`[kv_heads * head_size]`, as LMCache stores them: rotated at the positions in `pos[row]`).

    Rows come in pages of PAGE tokens, so chunks of any length come and go without fragmenting.
    Eviction is least recently used first and never touches the chunks of the prompt in hand."""

    def __init__(self, layers: int, kv_dim: int, capacity_tokens: int, dtype, device, page: int = PAGE):
        self.page = page
        pages = capacity_tokens // page
        self.kv = torch.empty(layers, 2, pages * page, kv_dim, dtype=dtype, device=device)
        self.pos = torch.zeros(pages * page, dtype=torch.long, device=device)
        self.pages = pages
        self.free = list(range(pages))
        self.chunks: OrderedDict = OrderedDict()  # key -> (rows on the device, pages)

    @classmethod
    def bytes_per_token(cls, layers: int, kv_dim: int, dtype) -> int:
        return layers * 2 * kv_dim * torch.empty((), dtype=dtype).element_size() + 8

    def holds(self, key) -> bool:
        """Whether the chunk is here; safe from LMCache's lookup thread (no LRU update)."""
        return key in self.chunks

    def fits(self, lengths) -> bool:
        """Whether chunks of these lengths fit at once (else a prompt of them falls back)."""
        return sum(-(-n // self.page) for n in lengths) <= self.pages

    def rows(self, key):
        """The chunk's rows (a host tensor: prompts index with it before one copy to the device),
        or None; a hit makes it the most recently used."""
        hit = self.chunks.get(key)
        if hit is None:
            return None
        self.chunks.move_to_end(key)
        return hit[0]

    def allocate(self, key, n_tokens: int, keep=()):
        """Rows for a new chunk of n_tokens, evicting least recently used chunks not in `keep`;
        None when even that cannot make room (the caller falls back, nothing is lost)."""
        need = -(-n_tokens // self.page)
        if need > len(self.free):
            for old in [k for k in self.chunks if k not in keep]:
                self.free += self.chunks.pop(old)[1]
                if need <= len(self.free):
                    break
        if need > len(self.free):
            return None
        pages, self.free = self.free[:need], self.free[need:]
        base = torch.tensor(pages, dtype=torch.long).repeat_interleave(self.page) * self.page
        rows = (base + torch.arange(self.page).repeat(need))[:n_tokens]
        self.chunks[key] = (rows, pages)
        return rows

    def cached(self, layer: int, k_or_v: int, index: torch.Tensor) -> torch.Tensor:
        """K (0) or V (1) of `layer` at store rows `index`: [len(index), kv_dim], a new tensor.
        Indexing the first axis of a contiguous [rows, kv_dim] copies whole rows (PyTorch's
        vectorized gather); `kv[layer][:, index]` took its generic element-wise index kernel
        (`scripts/bench_attention.py` times both)."""
        return self.kv[layer, k_or_v][index]

    def drop(self, key) -> None:
        if key in self.chunks:
            self.free += self.chunks.pop(key)[1]


class StoreFull(Exception):
    """The GPU chunk store cannot hold all of one prompt's chunks."""


def check_store_fits(gb: float, utilization: float, total_bytes: int, model_bytes: int) -> None:
    """Raise a RuntimeError that says what to change when a `gb` GB store leaves too little of the
    engine's share of GPU memory (2 GB at least for activations and the KV cache)."""
    share = utilization * total_bytes
    room = share - model_bytes - 2e9
    if gb * 1e9 > room:
        raise RuntimeError(
            f"The GPU chunk store of {gb:g} GB does not fit: --gpu-memory-utilization {utilization} gives "
            f"this engine {share / 1e9:.1f} GB, the model takes {model_bytes / 1e9:.1f} GB, and vLLM needs "
            f"2 GB or more for activations and its KV cache. Lower --gpu-kv-store-gb (to at most "
            f"{max(room, 0) / 1e9:.1f}) or raise --gpu-memory-utilization.")


def model_dtype(vllm_config) -> torch.dtype:
    """The dtype the model computes K/V in, from its config: vLLM's `model_config.dtype` (a
    torch.dtype once vLLM has resolved "auto"), else the checkpoint's `torch_dtype`. Never from a
    weight: quantized layers (AWQ, GPTQ) have no `weight`, FP8 ones an fp8 one, while their K/V are
    computed in the model's dtype."""
    model_config = vllm_config.model_config
    dtype = getattr(model_config, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        hf_config = getattr(model_config, "hf_config", None)
        dtype = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:  # not fp8
        raise RuntimeError(f"kvblend: cannot tell the dtype of the model's K/V from its config (got "
                           f"{dtype!r}); pass --dtype bfloat16 (or float16) to vllm serve.")
    return dtype


def build_store(model, gb: float, dtype: torch.dtype, device) -> ChunkStore | None:
    """The GPU chunk store for a loaded vLLM model, `gb` GB (None for 0), K/V in `dtype`."""
    if gb <= 0:
        return None
    layers = model.model.layers
    attn = layers[0].self_attn.attn
    kv_dim = attn.num_kv_heads * attn.head_size
    per_token = ChunkStore.bytes_per_token(len(layers), kv_dim, dtype)
    return ChunkStore(len(layers), kv_dim, int(gb * 1e9) // per_token, dtype, device)


def make_store(worker, model, gb: float) -> ChunkStore | None:
    """The store of `gb` GB for a vLLM worker's loaded model, its bytes counted as the model's so
    that vLLM's KV cache shrinks by as much (within --gpu-memory-utilization); a clear error when
    it cannot fit; None for 0 GB (every prompt then goes through LMCache's blender)."""
    if gb <= 0:
        log.warning("fast blend path without a GPU chunk store (store_gb 0): prompts go through LMCache's "
                    "blender")
        return None
    cache_config = getattr(worker, "cache_config", None) or worker.vllm_config.cache_config
    util = float(cache_config.gpu_memory_utilization)
    device = getattr(worker, "device", None) or next(model.parameters()).device
    used = int(worker.model_runner.model_memory_usage)
    check_store_fits(gb, util, torch.cuda.get_device_properties(device).total_memory, used)
    dtype = model_dtype(worker.vllm_config)
    store = build_store(model, gb, dtype, device)
    worker.model_runner.model_memory_usage = used + int(gb * 1e9)
    log.info("fast blend path: GPU chunk store of %g GB (%d tokens, %s)", gb, store.pos.numel(), dtype)
    return store
