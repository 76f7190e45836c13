"""Exact causal masks for selected queries: query i (the token at positions[i]) sees keys
0..positions[i]. FlexAttention block masks built on the device (no n x N mask, no host sync), and
`SplitMask`, the same split into each q-block's unmasked prefix and its diagonal."""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK = 128  # FlexAttention's block size (queries and keys)


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

