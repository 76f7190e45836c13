"""vLLM 0.26's 4-D KV layout for LMCache 0.5.3's GPU connector.

vLLM 0.26's FlashAttention keeps each layer's cache as one 4-D tensor, K and V packed in the last
axis: `[blocks, block_size, heads, 2*head_size]` (NHD) or `[blocks, heads, block_size, 2*head_size]`
(HND). LMCache names these layouts but its compiled `single_layer_kv_transfer` indexes a 5-D tensor
(`IndexError: Dimension out of range`); these two go to `paged_kv_transfer`, a PyTorch gather and
scatter by slot mapping, every other layout to the compiled op."""

from __future__ import annotations

# LMCache's names for vLLM 0.26's 4-D layouts -> the order of the middle axes
LAYOUTS = {"NL_X_NB_BS_NH_CS": "NB_BS_NH_CS", "NL_X_NB_NH_BS_CS": "NB_NH_BS_CS"}


def paged_kv_transfer(lmc, paged, slot_mapping, layout: str, to_paged: bool, token_major: bool = False):
    """Copy K and V between LMCache's buffer and one layer of vLLM's paged cache, by slot.

    `lmc` is LMCache's buffer, `[2, tokens, heads*head_size]` (or `[tokens, 2, ...]` when
    `token_major`); `paged` is one layer of vLLM's cache in `layout` ("NB_BS_NH_CS" or "NB_NH_BS_CS",
    last axis K then V). Token i lives at slot `slot_mapping[i]`, i.e. block `slot // block_size`,
    offset `slot % block_size`; a negative slot (padding) is skipped. `to_paged` copies LMCache ->
    vLLM (LMCache's H2D), else vLLM -> LMCache (D2H). Same semantics as LMCache's compiled op has for
    its 5-D layouts, for any strides of `paged` (advanced indexing, no reshape of the cache).
    """
    import torch

    if layout == "NB_BS_NH_CS":
        block_size, num_heads = paged.shape[1], paged.shape[2]
    elif layout == "NB_NH_BS_CS":
        num_heads, block_size = paged.shape[1], paged.shape[2]
    else:
        raise ValueError(f"unknown layout {layout!r}: expected NB_BS_NH_CS or NB_NH_BS_CS")
    head_size = paged.shape[3] // 2

    slots = slot_mapping.to(device=lmc.device, dtype=torch.long)
    tokens = torch.nonzero(slots >= 0).squeeze(1)  # positions in LMCache's buffer
    if tokens.numel() == 0:
        return
    slots = slots[tokens].to(paged.device)
    blocks, offsets = slots // block_size, slots % block_size
    # paged[where] is [n, heads, 2*head_size] in both layouts (advanced-index axes come first)
    where = (blocks, offsets) if layout == "NB_BS_NH_CS" else (blocks, slice(None), offsets)

    def lmc_index(kv):
        return (tokens, kv) if token_major else (kv, tokens)

    if to_paged:
        k = lmc[lmc_index(0)].reshape(-1, num_heads, head_size)
        v = lmc[lmc_index(1)].reshape(-1, num_heads, head_size)
        paged[where] = torch.cat([k, v], dim=-1).to(device=paged.device, dtype=paged.dtype)
    else:
        entries = paged[where].to(device=lmc.device, dtype=lmc.dtype)
        lmc[lmc_index(0)] = entries[..., :head_size].reshape(-1, num_heads * head_size)
        lmc[lmc_index(1)] = entries[..., head_size:].reshape(-1, num_heads * head_size)


class KVTransferOps:
    """Stands in for `lmcache.c_ops` inside LMCache's GPU connector module: the same module, except
    that `single_layer_kv_transfer` on a 4-D layout goes to `paged_kv_transfer`."""

    def __init__(self, ops):
        self._ops = ops
        self._layouts = {int(getattr(ops.EngineKVFormat, name)): layout for name, layout in LAYOUTS.items()}
        self._to_paged = int(ops.TransferDirection.H2D)

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def single_layer_kv_transfer(self, lmc, paged, slot_mapping, direction, engine_kv_format,
                                 token_major=False):
        layout = self._layouts.get(int(engine_kv_format))
        if layout is None or paged.dim() != 4:
            return self._ops.single_layer_kv_transfer(lmc, paged, slot_mapping, direction,
                                                      engine_kv_format, token_major=token_major)
        paged_kv_transfer(lmc, paged, slot_mapping, layout, int(direction) == self._to_paged, token_major)


def route_4d_kv_transfer() -> None:
    """Give LMCache's GPU connectors a `lmc_ops` whose KV transfer handles the 4-D layouts."""
    from lmcache.v1.gpu_connector import gpu_connectors

    if not isinstance(gpu_connectors.lmc_ops, KVTransferOps):
        gpu_connectors.lmc_ops = KVTransferOps(gpu_connectors.lmc_ops)
