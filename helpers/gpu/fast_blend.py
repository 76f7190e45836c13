"""The fast blend path (`--blend-path fast`): CacheBlend for one prompt in one pass over vLLM's layers.

LMCache 0.5.3 blends a prompt through generators that, for every layer, fetch each chunk's KV from
host memory (a thread hop), copy it to a GPU buffer, synchronize the whole device, re-rotate it,
zero the gaps, compute, and scatter it into vLLM's paged cache with a gather that syncs the host
again. `FastBlender.blend` does the same algorithm, with issue 9's fixes, as one loop:

    ids -> embed
    for each layer:
        norm -> qkv -> rotary (new positions)
        cached K/V of every chunk token: two row gathers (K, V) from the GPU chunk store, K
            re-rotated to the new positions (LMCache's fused kernel)
        below the check layer: every token computed, its fresh K/V kept
        at the check layer:    select the gap tokens + ceil(ratio x cached) cached tokens whose
                               fresh K (or V) deviates most; every token keeps its fresh K/V
        past it:               only the selected tokens are computed; they overwrite their rows
        K/V of all tokens -> vLLM's paged cache (vLLM's own `reshape_and_cache_flash`)
        attention (all queries: FlashAttention; selected ones: FlexAttention, exact causal mask;
                   KVBLEND_PREFIX_ATTENTION=flash: FlashAttention for the keys below each block of
                   selected queries, FlexAttention for the rest, merged: `SplitMask`)
        -> o_proj -> norm -> MLP             (skipped at the last layer: only its K/V are used)

No device-wide sync, no host sync, no per-chunk work inside the layer loop. The layers past the
check layer (all but two or three) take their inputs from buffers padded to a few bucketed sizes
(`Tail`), so on the GPU they run as one CUDA graph, captured the first time a bucket is seen and
replayed after: on an H200 the eager loop's ~700 kernel launches took more host time than the GPU
work they launch on short prompts (7B: 91 -> 65 ms TTFT at 1.8K tokens). Past GRAPH_MAX_TOKENS the
work is GPU-bound and runs eagerly, unpadded. Chunks live in
`ChunkStore`, a paged arena in GPU memory sized by `--gpu-kv-store-gb` and accounted against
`--gpu-memory-utilization` (its bytes are added to the model's, so vLLM's KV cache shrinks by as
much). A chunk missing there is read once from LMCache's host store (all layers) and kept, least
recently used out first. When a prompt's chunks cannot all fit, or anything here fails, the request
falls back to LMCache's blender with our fixes (the `fixed` path), logged once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..selection import select_tokens

log = logging.getLogger("vllm.kvblend_plugin")

STORE_ENV = "KVBLEND_GPU_KV_STORE_GB"
GRAPHS_ENV = "KVBLEND_FAST_GRAPHS"  # "0": the layers past the check layer run eagerly
TIMING_ENV = "KVBLEND_FAST_TIMING"  # "1": log each prompt's host and GPU time per phase
LOOKUP_ENV = "KVBLEND_FAST_LOOKUP"  # "0": LMCache's own lookup, per-layer pins and all (an A/B)
FLEX_ENV = "KVBLEND_FLEX_OPTIONS"  # JSON: FlexAttention kernel options (BLOCK_N, num_warps...)
AUTOTUNE_ENV = "KVBLEND_FLEX_AUTOTUNE"  # "1": Triton autotunes FlexAttention at its first call (an A/B)
PREFIX_ENV = "KVBLEND_PREFIX_ATTENTION"  # auto|flex|flash|flash16: keys below each q-block (SplitMask)
MAX_TAILS = 12  # buckets kept (their buffers and graphs), least recently used out first
GRAPH_MAX_TOKENS = 12288  # longer prompts are GPU-bound: their tail runs eagerly, barely padded
PAGE = 16  # tokens per page of the chunk store
BLOCK = 128  # FlexAttention's block size (queries and keys)


def store_gb(environ=None) -> float:
    """The GPU chunk store's size in GB, from KVBLEND_GPU_KV_STORE_GB (default 4)."""
    value = (os.environ if environ is None else environ).get(STORE_ENV, "4")
    try:
        gb = float(value)
    except ValueError:
        raise ValueError(f"{STORE_ENV} must be a number of GB, got {value!r}") from None
    if gb < 0:
        raise ValueError(f"{STORE_ENV} must be >= 0, got {gb}")
    return gb


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
        (`gpu_validate.py flex` times both)."""
        return self.kv[layer, k_or_v][index]

    def drop(self, key) -> None:
        if key in self.chunks:
            self.free += self.chunks.pop(key)[1]


def exact_causal_blocks(positions: torch.Tensor, n_keys: int, block: int = BLOCK):
    """FlexAttention's block lists for queries at sorted `positions` attending keys 0..own position.

    For the q-block of queries i..i+block-1 (positions lo..hi), key blocks wholly at or below lo are
    full (no mask to evaluate), key blocks from there up to hi's are partial (the mask decides), and
    none beyond. Returns (kv_num, kv_idx, full_num, full_idx), shaped [1, 1, q_blocks(, kv_blocks)]."""
    n = positions.numel()
    q_blocks, kv_blocks = -(-n // block), -(-n_keys // block)
    padded = torch.cat([positions, positions[-1:].expand(q_blocks * block - n)]).view(q_blocks, block)
    lo, hi = padded[:, 0], padded[:, -1]
    full_num = torch.div(lo + 1, block, rounding_mode="floor")
    kv_num = torch.div(hi, block, rounding_mode="floor") - full_num + 1
    cols = torch.arange(kv_blocks, device=positions.device)
    kv_idx = (full_num[:, None] + cols[None, :]).clamp(max=kv_blocks - 1)
    full_idx = cols[None, :].expand(q_blocks, kv_blocks)

    def shape(t):
        return t.to(torch.int32)[None, None].contiguous()

    return shape(kv_num), shape(kv_idx), shape(full_num), shape(full_idx)


class SplitMask(NamedTuple):
    """Selected queries' attention in two parts, as vLLM's cascade attention splits a shared prefix
    from the rest, but per q-block: the keys wholly below a q-block's first position are seen by
    every row of it, so FlashAttention takes them unmasked (each q-block one varlen "sequence" over
    its first `prefix` keys, read through the page `table`); FlexAttention takes the rest
    (`diagonal`: the partial key blocks, exact causal mask); their log-sum-exps merge the two
    (`merge_attention`). With scattered queries the prefix is nearly all of the work at 32K keys."""
    diagonal: object  # a BlockMask without full blocks
    cu_q: torch.Tensor  # int32 [q_blocks + 1]: where each q-block's rows start
    prefix: torch.Tensor  # int32 [q_blocks]: keys 0..prefix-1, seen by all rows of the q-block
    table: torch.Tensor  # int32 [q_blocks, pages]: the keys in pages of `page` rows
    page: int


def exact_causal_mask(positions: torch.Tensor, n_keys: int, split: int = 0):
    """A FlexAttention BlockMask: query i (the token at positions[i]) sees keys 0..positions[i].
    Built from block lists computed on the device: no n x N mask, no host sync. When there are a
    whole number of q-blocks, the mask reads `positions` itself: refill it (and `refill_mask`) and
    the same mask serves new positions, as a CUDA graph needs. `split` > 0: a SplitMask instead,
    its prefix keys in pages of 16 rows (`split` 16, vLLM's own page size) or as one page (any other)."""
    from torch.nn.attention.flex_attention import BlockMask

    pad = -(-positions.numel() // BLOCK) * BLOCK - positions.numel()  # last q-block's rows past n
    padded = torch.cat([positions, positions[-1:].expand(pad)]) if pad else positions

    kv_num, kv_idx, full_num, full_idx = exact_causal_blocks(positions, n_keys)
    prefix = (full_num[0, 0] * BLOCK).to(torch.int32)  # a split's: keys below each q-block's full blocks' end

    def sees(b, h, q_idx, kv_idx):
        return kv_idx <= padded[q_idx]

    def sees_past_prefix(b, h, q_idx, kv_idx):  # the block lists say as much; torch's eager path reads this
        return (kv_idx <= padded[q_idx]) & (kv_idx >= prefix[q_idx // BLOCK])

    lists = (kv_num, kv_idx, None, None) if split else (kv_num, kv_idx, full_num, full_idx)
    for extra in ({"seq_lengths": (positions.numel(), n_keys)}, {}):  # newest torch first
        try:
            mask = BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=BLOCK, mask_mod=sees_past_prefix if split
                                            else sees, **extra)
            break
        except TypeError:
            continue
    else:
        raise RuntimeError("torch's BlockMask.from_kv_blocks takes none of the known signatures")
    if not split:
        return mask
    n, page = positions.numel(), 16 if split == 16 else n_keys // 16 * 16
    cu_q = (torch.arange(full_num.shape[-1] + 1, device=positions.device) * BLOCK).clamp(max=n)
    table = torch.arange(n_keys // page, dtype=torch.int32, device=positions.device)
    table = table[None].expand(full_num.shape[-1], -1).contiguous()  # every q-block: the same pages
    return SplitMask(mask, cu_q.to(torch.int32), prefix, table, page)


MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def refill_mask(mask, positions: torch.Tensor, n_keys: int) -> None:
    """Rewrite `mask`'s block lists (and a SplitMask's prefix lengths) in place for new `positions`
    (same shapes)."""
    split = isinstance(mask, SplitMask)
    new = exact_causal_mask(positions, n_keys, mask.page if split else 0)
    if split:
        mask.prefix.copy_(new.prefix)
        mask, new = mask.diagonal, new.diagonal
    for name in MASK_TENSORS:
        old = getattr(mask, name, None)
        if old is not None:
            old.copy_(getattr(new, name))


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


_FLEX = {}
ONE_PAGE = 1 << 40  # SplitMask's page size for "the keys as one page"
SPLIT_MIN_KEYS = 16384  # `auto` splits from here: per layer on an H100 (session 13) the split took
# 3.24 against 4.12 ms at 32K keys, 0.54 against 0.48 ms at 8K; a whole 7B request, 3.72x against 3.44x
# at 32K on that H100 and 3.59x against 3.39x on an H200, 16K a tie on both, 8K the same on the H100
PREFIX_CHOICES = {"auto": (ONE_PAGE, SPLIT_MIN_KEYS), "flex": (0, 0), "flash": (ONE_PAGE, 0),
                  "flash16": (16, 0)}  # KVBLEND_PREFIX_ATTENTION -> (split, from how many keys)


def prefix_split(environ=None) -> tuple[int, int]:
    """(exact_causal_mask's `split`, the fewest keys it is used for) from KVBLEND_PREFIX_ATTENTION:
    `auto` (default: FlashAttention for each q-block's prefix from SPLIT_MIN_KEYS keys up, where it
    is faster), `flex` (FlexAttention for all keys), `flash` (the split at every length, the keys as
    one page) or `flash16` (the same in pages of 16 rows)."""
    value = (os.environ if environ is None else environ).get(PREFIX_ENV, "auto").strip().lower()
    if value not in PREFIX_CHOICES:
        raise ValueError(f"{PREFIX_ENV} must be one of {', '.join(PREFIX_CHOICES)}, got {value!r}")
    return PREFIX_CHOICES[value]


def flex_options(environ=None) -> dict:
    """FlexAttention kernel options from KVBLEND_FLEX_OPTIONS (a JSON object, e.g. `{"BLOCK_N": 128,
    "num_warps": 8, "num_stages": 2}`; default: torch's own choice for this GPU). `gpu_validate.py
    flex` times a few of them on the device and prints the fastest exact one."""
    value = (os.environ if environ is None else environ).get(FLEX_ENV, "").strip()
    try:
        options = json.loads(value) if value else {}
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise ValueError(f"{FLEX_ENV} must be a JSON object of FlexAttention kernel options, "
                         f'such as {{"BLOCK_N": 128}}; got {value!r}')
    return options


def flex_attention_fn(device_type: str):
    """FlexAttention compiled into one fused block-sparse kernel on the GPU (once, any length);
    its eager reference elsewhere (the CPU tests). KVBLEND_FLEX_AUTOTUNE=1 lets Triton time 7 tilings
    at the first calls (about 15 s each compile) instead of torch's fixed choice for this GPU: no
    gain on an H100 (session 11, docs/gpu.md), an A/B for other GPUs."""
    if device_type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        if device_type == "cuda":
            mode = "max-autotune-no-cudagraphs" if os.environ.get(AUTOTUNE_ENV) == "1" else None
            _FLEX[device_type] = torch.compile(flex_attention, dynamic=True, mode=mode)
        else:
            _FLEX[device_type] = flex_attention
    return _FLEX[device_type]


def attend_selected(q, k, v, mask, scale: float, options: dict | None = None) -> torch.Tensor:
    """q [n, heads, d] (tokens at the mask's positions), k/v [N, kv_heads, d] -> [n, heads, d].

    FlexAttention's main kernel, also for few queries (its decoding kernel finds no configuration
    for these shapes on H200: "NoValidChoicesError"), on contiguous [1, heads, tokens, d] copies:
    the layout the `gpu` tier validated. Views without the copies (session 9's way) were 4.5-11%
    slower at 32K keys on H100s, copy included (`gpu_validate.py flex`, session 11, docs/gpu.md).
    `mask`: a BlockMask, or a SplitMask (FlashAttention for each q-block's prefix, FlexAttention
    for the rest). `options`: kernel options (default: KVBLEND_FLEX_OPTIONS's, on the GPU). Should
    either kernel fail, the same exact mask through SDPA (slower, logged once)."""
    split = isinstance(mask, SplitMask)
    block_mask = mask.diagonal if split else mask
    qt, kt, vt = (t.transpose(0, 1).contiguous()[None] for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if options is None:
        if "options" not in _FLEX:
            _FLEX["options"] = flex_options()
        options = _FLEX["options"] if q.device.type == "cuda" else {}
    try:
        out = flex_attention_fn(q.device.type)(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                                               kernel_options={"FORCE_USE_FLEX_ATTENTION": True, **options},
                                               **(lse_request() if split else {}))
        if split:
            (out, lse), (head, head_lse) = out, attend_prefix(q, k, v, mask, scale)
            lse = getattr(lse, "lse", lse)  # AuxOutput, or the tensor itself (older torch)
            return merge_attention(head, head_lse, out[0].transpose(0, 1), lse[0])
    except Exception as err:
        if not _FLEX.get("warned"):
            _FLEX["warned"] = True
            log.exception("FlexAttention failed (%s): selected tokens attend through SDPA", err)
        rows, cols = torch.arange(q.shape[0], device=q.device), torch.arange(k.shape[0], device=q.device)
        dense = block_mask.mask_mod(0, 0, rows[:, None], cols[None, :])
        if split:  # and the prefix: the whole causal mask
            dense |= cols[None, :] < mask.prefix[rows // BLOCK, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=dense[None, None], scale=scale,
                                             enable_gqa=gqa)
    return out[0].transpose(0, 1)


def lse_request() -> dict:
    """flex_attention's argument asking for the log-sum-exp too, in this torch's words."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


def attend_prefix(q, k, v, mask: SplitMask, scale: float):
    """Each q-block's rows over keys 0..prefix-1, unmasked: (out [n, heads, d], lse [heads, n]; a
    q-block without prefix gets lse -inf). On the GPU vLLM's FlashAttention (varlen, paged, as its
    prefill reads vLLM's cache); else the same sums in plain PyTorch (the CPU tests)."""
    kv_heads, d, rows = k.shape[1], k.shape[2], mask.table.shape[1] * mask.page
    if q.device.type == "cuda":
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        if "fa" not in _FLEX:
            _FLEX["fa"] = flash_version()
        k_pages, v_pages = (t[:rows].contiguous().view(-1, mask.page, kv_heads, d) for t in (k, v))
        return flash_attn_varlen_func(q, k_pages, v_pages, max_seqlen_q=BLOCK, cu_seqlens_q=mask.cu_q,
                                      max_seqlen_k=rows, seqused_k=mask.prefix, block_table=mask.table,
                                      softmax_scale=scale, causal=False, return_softmax_lse=True,
                                      num_splits=1, fa_version=_FLEX["fa"])
    group, wide = q.shape[1] // kv_heads, torch.promote_types(q.dtype, torch.float32)
    rows_block = torch.arange(q.shape[0], device=q.device) // BLOCK
    sees = torch.arange(k.shape[0], device=q.device) < mask.prefix[rows_block, None]
    scores = torch.einsum("nhd,khd->hnk", q.to(wide), k.to(wide).repeat_interleave(group, 1)) * scale
    lse = torch.logsumexp(scores.masked_fill(~sees, -math.inf), dim=-1)
    weights = torch.exp(scores - lse[..., None]).masked_fill(~sees, 0)
    out = torch.einsum("hnk,khd->nhd", weights, v.to(wide).repeat_interleave(group, 1))
    return out.to(q.dtype), lse


def flash_version() -> int:
    """vLLM's FlashAttention version for this GPU (3 on Hopper), as its attention backend picks it."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    return get_flash_attn_version() or 2


def merge_attention(a, lse_a, b, lse_b) -> torch.Tensor:
    """Attention over two disjoint key sets -> over their union: each part weighted by its share of
    the softmax mass, exp(lse_part - lse_all). a/b [n, heads, d], lse [heads, n]."""
    wide = torch.promote_types(b.dtype, torch.float32)
    lse_a, lse_b = lse_a.to(wide), lse_b.to(wide)
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = (torch.exp(part - lse).transpose(0, 1)[..., None] for part in (lse_a, lse_b))
    return (torch.where(wa > 0, a.to(wide) * wa, 0) + b.to(wide) * wb).to(b.dtype)


def embed(model, ids):
    """Token embeddings, by whichever name this vLLM model class gives them (as LMCache does)."""
    for name in ("embed_input_ids", "get_input_embeddings"):
        if hasattr(model, name):
            return getattr(model, name)(ids)
    return model.model.embed_tokens(ids)


def deviation(fresh, cached) -> torch.Tensor:
    """Each token's squared distance between fresh and cached K (or V), [tokens, kv_dim] -> [tokens]."""
    return ((fresh.float() - cached.float()) ** 2).sum(dim=1)


class StoreFull(Exception):
    """The GPU chunk store cannot hold all of one prompt's chunks."""


class FastBlender:
    """Blends prompts for one LMCache blender (`lmc`, an LMCBlender) over its vLLM model."""

    def __init__(self, lmc, store: ChunkStore | None, deviation: str = "k"):
        self.lmc = lmc
        self.model = lmc.layerwise_model.vllm_model
        self.layers = list(self.model.model.layers)
        self.store = store
        self.deviation = deviation
        self.check = min(lmc.common_metadata.check_layers)
        self.ratio = float(lmc.common_metadata.recomp_ratios[0])
        self.full_attention = lmc.layerwise_model.lmc_attn_layers  # FlashAttention, all queries
        self.rerotate = lmc.layerwise_model.fused_rotary_emb  # K from old to new positions
        cache = getattr(self.rerotate, "cos_sin_cache", None)
        if cache is not None:  # LMCache copies it to the GPU on every call when it lives on the host
            self.rerotate.cos_sin_cache = cache.to(self.layers[0].self_attn.qkv_proj.weight.device)
        self.process_qkv = getattr(lmc.layerwise_model, "_process_qkv", lambda q, k, v, layer: (q, k, v))
        self.tails: OrderedDict = OrderedDict()  # bucket -> Tail
        self.graphs = self.store.kv.device.type == "cuda" and os.environ.get(GRAPHS_ENV, "1") != "0"
        self.pool = self.clock = None
        self.split, self.split_from = prefix_split()  # SplitMask's pages (0: none), from how many keys

    # -------------------------------------------------------------- the chunks
    def segments(self, tokens, mask):
        """(start, end, key) of each segment LMCache's token database cuts the prompt into."""
        return list(self.lmc.cache_engine.token_database.process_tokens(tokens=tokens, mask=mask))

    def load(self, key, keep) -> torch.Tensor | None:
        """Rows of the chunk `key` in the GPU store, read from LMCache's host store when missing
        there; None when LMCache has not got it; StoreFull when the store has no room for it."""
        rows = self.store.rows(key)
        if rows is not None:
            return rows
        engine = self.lmc.cache_engine
        objs = [engine.storage_manager.get(k) for k in key.split_layers(len(self.layers))]
        try:
            if any(o is None for o in objs) or objs[0].metadata.cached_positions is None:
                return None
            rows = self.store.allocate(key, objs[0].tensor.shape[1], keep)
            if rows is None:
                raise StoreFull(key)
            device = self.store.kv.device
            at = rows.to(device)
            for layer, obj in enumerate(objs):  # [2, tokens, kv_dim] each, in pinned host memory
                self.store.kv[layer][:, at] = obj.tensor.to(device, non_blocking=True)
            self.store.pos[at] = objs[0].metadata.cached_positions.to(device)
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # before LMCache may reuse the memory
            return rows
        finally:
            for o in objs:
                if o is not None:
                    o.ref_count_down()

    # -------------------------------------------------------------- the pass
    @torch.inference_mode()
    def blend(self, tokens, mask, kvcaches, slot_mapping) -> bool:
        """Blend `tokens` into vLLM's paged cache at `slot_mapping`. False: not done (no chunk hit,
        or no room in the store): the caller falls back to LMCache's blender."""
        if self.clock is not None:  # the previous prompt's, long finished: no wait
            self.clock.report()
        clock = Clock(self.store.kv.device, os.environ.get(TIMING_ENV) == "1")
        device = self.store.kv.device
        ids = torch.as_tensor(tokens, dtype=torch.long)
        n_all = ids.numel()
        index = torch.full((n_all,), -1, dtype=torch.long)  # store row of each token, -1: gap
        segments = self.segments(ids, mask)
        keep = {key for _, _, key in segments}
        for start, end, key in segments:
            try:
                rows = self.load(key, keep)
            except StoreFull:
                return False
            if rows is None:
                break  # as LMCache: the first chunk it has not got ends the reuse
            index[start:end] = rows
        is_gap = index < 0
        n_gaps = int(is_gap.sum())
        if n_gaps == n_all:
            return False
        gaps = torch.nonzero(is_gap).squeeze(1).to(device, non_blocking=True)
        index = index.clamp(min=0).to(device, non_blocking=True)  # gap rows: anything, recomputed
        clock.mark("load")
        how = self._forward(ids.to(device, non_blocking=True), index, gaps, kvcaches, slot_mapping, clock)
        clock.finish(n_all, how)
        self.clock = clock if clock.cuda else clock.report()  # on the GPU, reported by the next prompt
        return True

    def _forward(self, ids, index, gaps, kvcaches, slot_mapping, clock) -> str:
        """Layers 0..check for every token (selecting at the check layer), then the tail."""
        n_all = ids.numel()
        positions = torch.arange(n_all, device=ids.device)
        old_positions = self.store.pos[index]
        hidden, residual = embed(self.model, ids), None
        full_meta = self.full_attention[0].init_attn_metadata(input_ids=ids)
        for i in range(self.check + 1):
            layer = self.layers[i]
            attn = layer.self_attn
            if residual is None:
                residual, hidden = hidden, layer.input_layernorm(hidden)
            else:
                hidden, residual = layer.input_layernorm(hidden, residual)
            qkv, _ = attn.qkv_proj(hidden)
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k, v = self.process_qkv(q, k, v, layer)
            q, k = attn.rotary_emb(positions, q, k)
            heads, kv_heads, d = attn.attn.num_heads, attn.attn.num_kv_heads, attn.attn.head_size
            q, keys, values = q.view(n_all, heads, d), k.view(n_all, kv_heads, d), v.view(n_all, kv_heads, d)
            attn.attn.impl.do_kv_cache_update(attn.attn, keys, values, kvcaches[i], slot_mapping)
            if i == len(self.layers) - 1:
                return "no tail"
            if i < self.check:
                out = self.full_attention[i].forward_contiguous(q, keys, values, torch.empty_like(q),
                                                                full_meta)
            else:  # the check layer: which cached tokens deviate most from a fresh computation?
                fresh, old = (v, self.store.cached(i, 1, index)) if self.deviation == "v" else \
                    (k, self.rerotate(old_positions, positions, self.store.cached(i, 0, index)))
                selected = select_tokens(deviation(fresh, old), self.ratio, gaps)
                q, residual = q[selected], residual[selected]
                mask = exact_causal_mask(selected, n_all, self.split_for(n_all))
                out = attend_selected(q, keys, values, mask, attn.attn.impl.scale)
            hidden, _ = attn.o_proj(out.reshape(q.shape[0], heads * d))
            hidden, residual = layer.post_attention_layernorm(hidden, residual)
            hidden = layer.mlp(hidden)
        clock.mark("head")
        bucketed = n_all <= GRAPH_MAX_TOKENS  # kept, and on the GPU replayed as a graph
        tail = self._tail_for(selected.numel(), n_all, hidden, kvcaches, bucketed)
        tail.fill(hidden, residual, selected, index, old_positions, slot_mapping)
        if tail.graph is not None:
            tail.graph.replay()
            how = "graph"
        else:
            self._tail(tail, kvcaches)
            how = "eager"
            if self.graphs and bucketed:  # the next prompt of this bucket replays it
                self._capture(tail, kvcaches)
                how = "eager + capture"
        clock.mark("tail")
        return how

    def _tail(self, t: Tail, kvcaches) -> None:
        """The layers past the check layer, on `t`'s buffers: only the selected rows are computed;
        every other token keeps its cached K/V, re-rotated to its new position. Each layer's K/V of
        all tokens go to vLLM's paged cache; the last layer's output feeds nothing."""
        hidden, residual = t.hidden, t.residual
        for i in range(self.check + 1, len(self.layers)):
            layer = self.layers[i]
            attn = layer.self_attn
            hidden, residual = layer.input_layernorm(hidden, residual)
            qkv, _ = attn.qkv_proj(hidden)
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k, v = self.process_qkv(q, k, v, layer)
            q, k = attn.rotary_emb(t.positions, q, k)
            # every token's cached K/V, K re-rotated (in place) to its new position
            keys = self.rerotate(t.old_positions, t.new_positions, self.store.cached(i, 0, t.index))
            values = self.store.cached(i, 1, t.index)
            keys[t.rows], values[t.rows] = k, v
            heads, kv_heads, d = attn.attn.num_heads, attn.attn.num_kv_heads, attn.attn.head_size
            keys, values = keys.view(t.n_keys, kv_heads, d), values.view(t.n_keys, kv_heads, d)
            attn.attn.impl.do_kv_cache_update(attn.attn, keys, values, kvcaches[i], t.slots)
            if i == len(self.layers) - 1:
                break
            out = attend_selected(q.view(-1, heads, d), keys, values, t.block_mask, attn.attn.impl.scale)
            hidden, _ = attn.o_proj(out.reshape(t.n_pad, heads * d))
            hidden, residual = layer.post_attention_layernorm(hidden, residual)
            hidden = layer.mlp(hidden)

    # -------------------------------------------------------------- buckets and CUDA graphs
    def split_for(self, n_keys: int) -> int:
        """exact_causal_mask's `split` for a prompt of n_keys tokens (KVBLEND_PREFIX_ATTENTION)."""
        return self.split if n_keys >= self.split_from else 0

    def _tail_for(self, n: int, n_all: int, hidden, kvcaches, bucketed: bool = True) -> Tail:
        """The bucket's Tail (made when new; least recently used ones dropped past MAX_TAILS), or
        else a Tail of this prompt's size (padded to whole q-blocks only), not kept."""
        if not bucketed:
            n_pad = -(-n // BLOCK) * BLOCK
            split = self.split_for(n_all)  # as the check layer chose
            return Tail(n_pad, n_all + 1, hidden.shape[-1], hidden.dtype, hidden.device, split)
        key = (bucket(n), bucket(n_all + 1), kvcaches[0].data_ptr())  # +1: a spare row for padding
        tail = self.tails.pop(key, None)
        if tail is None:
            split = self.split_for(key[1])  # one choice per bucket
            tail = Tail(key[0], key[1], hidden.shape[-1], hidden.dtype, hidden.device, split)
            while len(self.tails) >= MAX_TAILS:
                self.tails.pop(next(iter(self.tails)))
        self.tails[key] = tail
        return tail

    def _capture(self, tail: Tail, kvcaches) -> None:
        """Record the tail's kernels as one CUDA graph (nothing runs while capturing). All graphs
        share one memory pool: they only write vLLM's cache and replay one at a time."""
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self._tail(tail, kvcaches)
            tail.graph = graph
        except Exception:
            self.graphs = False
            log.exception("fast blend path: CUDA graph capture failed; its layers run eagerly from now on")


class Clock:
    """Host and GPU time of each phase of one prompt, logged when KVBLEND_FAST_TIMING=1 (off: free).
    GPU times are read when the next prompt starts, so timing adds no sync."""

    def __init__(self, device, on: bool):
        self.on, self.cuda = on, on and device.type == "cuda"
        self.marks = [("start", time.perf_counter(), self._event())] if on else []
        self.what = ""

    def _event(self):
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, name: str) -> None:
        if self.on:
            self.marks.append((name, time.perf_counter(), self._event()))

    def finish(self, n_tokens: int, how: str) -> None:
        self.what = f"{n_tokens} tokens, tail {how}"

    def report(self) -> None:
        if not self.on:
            return None
        if self.cuda:
            self.marks[-1][2].synchronize()
        parts = []
        for (_, t0, e0), (name, t1, e1) in zip(self.marks, self.marks[1:], strict=False):
            gpu = f"/{e0.elapsed_time(e1):.1f}" if self.cuda else ""
            parts.append(f"{name} {1e3 * (t1 - t0):.1f}{gpu}")
        log.info("fast blend timing: %s; ms host/GPU: %s", self.what, ", ".join(parts))
        self.on = False  # once
        return None


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


def build_store(model, gb: float) -> ChunkStore | None:
    """The GPU chunk store for a loaded vLLM model, `gb` GB (None for 0)."""
    if gb <= 0:
        return None
    layers = model.model.layers
    attn = layers[0].self_attn.attn
    weight = layers[0].self_attn.qkv_proj.weight
    kv_dim = attn.num_kv_heads * attn.head_size
    per_token = ChunkStore.bytes_per_token(len(layers), kv_dim, weight.dtype)
    return ChunkStore(len(layers), kv_dim, int(gb * 1e9) // per_token, weight.dtype, weight.device)
