"""LMCache 0.5.3's blender, mended (the `fixed` path, and the fast path's fallback).

3. Recomputed tokens see the future: past the check layer the blender runs FlashAttention with
   `causal=True` over n selected queries and N keys, which aligns the causal mask to the end (the
   i-th selected token attends keys 0..N-n+i). `selected_attention` attends with the exact mask.
4. Layers below the check layer are never written back: vLLM's cache gets the retrieved KV, zeros
   at the gaps between segments. `process_qkv` writes every computed K/V back, selects the ratio
   among cached tokens and always recomputes the gaps (as the embedded engine does).

And cached K is re-rotated with the served model's own rotary embedding (`served_rope`): LMCache
builds its own without the model's RoPE scaling, which moves a Llama-3.x key to wrong angles.
"""

from __future__ import annotations

import functools

from ..settings import GPU_DEVIATION, GpuBlendSettings


def process_qkv(self, q, k, v, residual, layer_id, attn_output, attn_metadata,
                deviation: str = GPU_DEVIATION):
    """`LMCBlender.process_qkv` with faults 3 and 4 mended (see the module docstring); `deviation`
    is bound by `mend_blender`.

    Called by LMCache's layer-wise model for every layer of a blended prompt, between the QKV
    projection and attention. Until the check layer every token is computed: its fresh K/V replace
    the retrieved ones (which vLLM's cache then receives). At the check layer the tokens to
    recompute are selected; past it only they are computed and overwrite their cached rows."""
    import torch

    from ..selection import select_tokens
    from .fast import tp_group
    from .fast.blender import deviation as token_deviation

    old_k, old_v = self.gpu_connector.get_kv(layer_id)
    if attn_output is None:
        attn_output = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if self.metadata.positions is None:
        self.metadata.positions = torch.arange(q.shape[0], device=q.device, dtype=torch.int64)
    rotary = self.layerwise_model.vllm_model.model.layers[layer_id].self_attn.rotary_emb
    q, k = rotary(self.metadata.positions, q, k)

    selected = self.metadata.imp_indices
    if selected is not None:  # past the check layer: only the selected tokens were computed
        old_k[selected] = k
        old_v[selected] = v
        return q, old_k, old_v, residual, attn_output, attn_metadata

    if layer_id in self.common_metadata.check_layers:
        gaps = self.gpu_connector.current_gap_positions  # the separators: rows nothing cached
        fresh, cached = (v, old_v) if deviation == "v" else (k, old_k)
        selected = select_tokens(token_deviation(fresh, cached), self.common_metadata.recomp_ratios[0], gaps,
                                 tp_group())
        self.metadata.imp_indices = selected
        self.metadata.positions = self.metadata.positions[selected]
        attn_metadata.update_from_top_indices(selected)
        attn_metadata.kvblend_query_positions = selected  # for `selected_attention`
        old_k.copy_(k)  # every token keeps the fresh K/V computed here
        old_v.copy_(v)
        return (q[selected], old_k, old_v, residual[selected], attn_output[: selected.numel()],
                attn_metadata)

    old_k.copy_(k)  # below the check layer: all tokens computed, all written back
    old_v.copy_(v)
    return q, k, v, residual, attn_output, attn_metadata


def selected_attention(original, flex_options: dict | None = None, autotune: bool = False):
    """Wrap `LMCFlashAttnBackend.forward_contiguous`: when the queries are a subset of the keys'
    positions, attend with the exact causal mask instead of FlashAttention's end-aligned one.

    FlexAttention does it at FlashAttention-like speed: the queries are sorted by position, so a
    block of 128 of them needs the key blocks up to its last position, fully unmasked below its
    first one. The block mask is built once per prompt and reused by every layer."""

    @functools.wraps(original)
    def forward_contiguous(self, query, key, value, output, attn_metadata, **kwargs):
        positions = getattr(attn_metadata, "kvblend_query_positions", None)
        if positions is None or positions.numel() == key.shape[0]:
            return original(self, query, key, value, output, attn_metadata, **kwargs)
        from .fast.attention import attend_selected
        from .fast.masks import exact_causal_mask

        block_mask = getattr(attn_metadata, "kvblend_block_mask", None)
        if block_mask is None:
            block_mask = attn_metadata.kvblend_block_mask = exact_causal_mask(positions, key.shape[0])
        output.copy_(attend_selected(query, key, value, block_mask, self.vllm_attn_impl.scale, flex_options,
                                     autotune))
        return output

    forward_contiguous._kvblend = True
    return forward_contiguous


def served_rope(original):
    """Wrap `LMCBaseModel.__init__`: its `fused_rotary_emb` (what LMCache's connector re-rotates
    retrieved K with) becomes the served layer's rotary embedding (`helpers/gpu/rope.py`)."""

    @functools.wraps(original)
    def __init__(self, vllm_model, *args, **kwargs):
        original(self, vllm_model, *args, **kwargs)
        from .rope import Rerotate

        rotary = vllm_model.model.layers[0].self_attn.rotary_emb
        cache = getattr(rotary, "cos_sin_cache", None)
        self.fused_rotary_emb = Rerotate(rotary, None if cache is None else cache.device)

    __init__._kvblend = True
    return __init__


def mend_blender(settings: GpuBlendSettings) -> None:
    """Faults 3 and 4: our `process_qkv` for LMCache's blender, exact masks for selected tokens; and
    the served model's RoPE for re-rotating retrieved K."""
    from lmcache.v1.compute.attention import flash_attn
    from lmcache.v1.compute.blend import blender
    from lmcache.v1.compute.models import base

    if not getattr(base.LMCBaseModel.__init__, "_kvblend", False):
        base.LMCBaseModel.__init__ = served_rope(base.LMCBaseModel.__init__)

    blender.LMCBlender.process_qkv = functools.partialmethod(process_qkv, deviation=settings.deviation)
    backend = flash_attn.LMCFlashAttnBackend
    if not getattr(backend.forward_contiguous, "_kvblend", False):
        backend.forward_contiguous = selected_attention(backend.forward_contiguous, settings.flex_options,
                                                        settings.flex_autotune)
