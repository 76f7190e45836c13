"""Attention of the selected tokens past the check layer: FlexAttention with the exact causal mask
(`masks`), or, for long prompts, FlashAttention over each q-block's prefix keys merged with
FlexAttention over the rest; SDPA with the same mask should either kernel fail."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .masks import BLOCK, SplitMask

log = logging.getLogger("vllm.kvblend_plugin")

_FLEX = {}
ONE_PAGE = 1 << 40  # SplitMask's page size for "the keys as one page"
SPLIT_MIN_KEYS = 16384  # `auto` splits from here: per layer on an H100 (2026-12) the split took
# 3.24 against 4.12 ms at 32K keys, 0.54 against 0.48 ms at 8K; a whole 7B request, 3.72x against 3.44x
# at 32K on that H100 and 3.59x against 3.39x on an H200, 16K a tie on both, 8K the same on the H100
PREFIX_CHOICES = {"auto": (ONE_PAGE, SPLIT_MIN_KEYS), "flex": (0, 0), "flash": (ONE_PAGE, 0),
                  "flash16": (16, 0)}  # prefix_attention -> (split, from how many keys)


def prefix_split(choice: str) -> tuple[int, int]:
    """(exact_causal_mask's `split`, the fewest keys it is used for) for `prefix_attention`:
    `auto` (default: FlashAttention for each q-block's prefix from SPLIT_MIN_KEYS keys up, where it
    is faster), `flex` (FlexAttention for all keys), `flash` (the split at every length, the keys as
    one page) or `flash16` (the same in pages of 16 rows)."""
    return PREFIX_CHOICES[choice]


def flex_attention_fn(device_type: str, autotune: bool = False):
    """FlexAttention compiled into one fused block-sparse kernel on the GPU (once, any length);
    its eager reference elsewhere (the CPU tests). `autotune` lets Triton time 7 tilings at the
    first calls (about 15 s each compile) instead of torch's fixed choice for this GPU: no gain on
    an H100 (2026-12, docs/gpu.md), an A/B for other GPUs."""
    key = (device_type, autotune)
    if key not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        if device_type == "cuda":
            mode = "max-autotune-no-cudagraphs" if autotune else None
            _FLEX[key] = torch.compile(flex_attention, dynamic=True, mode=mode)
        else:
            _FLEX[key] = flex_attention
    return _FLEX[key]


def attend_selected(q, k, v, mask, scale: float, options: dict | None = None,
                    autotune: bool = False) -> torch.Tensor:
    """q [n, heads, d] (tokens at the mask's positions), k/v [N, kv_heads, d] -> [n, heads, d].

    FlexAttention's main kernel, also for few queries (its decoding kernel finds no configuration
    for these shapes on H200: "NoValidChoicesError"), on contiguous [1, heads, tokens, d] copies:
    the layout the `gpu` tier validated. Views without the copies were 4.5-11% slower at 32K keys
    on H100s (2026-12), copy included (`scripts/bench_attention.py`, docs/gpu.md).
    `mask`: a BlockMask, or a SplitMask (FlashAttention for each q-block's prefix, FlexAttention
    for the rest). `options`, `autotune`: GpuBlendSettings' flex_options and flex_autotune. Should
    either kernel fail, the same exact mask through SDPA (slower, logged once)."""
    split = isinstance(mask, SplitMask)
    block_mask = mask.diagonal if split else mask
    qt, kt, vt = (t.transpose(0, 1).contiguous()[None] for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    options = options or {}
    try:
        flex = flex_attention_fn(q.device.type, autotune)
        out = flex(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=gqa,
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

