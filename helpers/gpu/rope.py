"""Re-rotating cached K with the served model's own rotary embedding, or refusing the model.

A chunk's K is cached rotated to the positions it was computed at; blending moves it to new ones.
LMCache re-rotates with a rotary embedding it builds itself with `rope_scaling=None`, so a model with
scaled RoPE (Llama-3.x's `llama3`, linear, YaRN) gets keys rotated by the wrong angles, silently.
Here the rotation comes from the served layer's `rotary_emb.cos_sin_cache` (vLLM's: `[max_pos,
rot_dim]`, cos in the first half, sin in the second), which holds the model's scaling.

Rotating by a position delta composes only for pure rotations. `llama3` and `linear` change the
frequencies only: pure. YaRN multiplies cos and sin by an attention factor (mscale): the rotation
cache here has it divided out, so the cached K keeps its factor and only turns. Dynamic NTK (its
frequencies follow the length), LongRoPE (short and long factors), M-RoPE, partial rotary
dimensions and the rest are refused at load by `check_rope`, with the rope type named.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("vllm.kvblend_plugin")

# rope types whose cos/sin are a rotation (times a constant): a position delta composes
SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")
# vLLM's classes for them (LinearScaling with one factor: one block of the cache)
SUPPORTED_CLASSES = ("RotaryEmbedding", "LinearScalingRotaryEmbedding", "Llama3RotaryEmbedding",
                     "YaRNScalingRotaryEmbedding")


class UnsupportedRope(ValueError):
    """The model's RoPE cannot be re-rotated by a position delta: blending would be wrong."""


def rope_parameters(hf_config) -> dict:
    """The model's RoPE parameters as one dict (rope_type, rope_theta, factor, ...) from a config
    object or a config.json dict, old style (`rope_scaling`, `rope_theta`) or new (`rope_parameters`)."""
    get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
    params = dict(get("rope_parameters") or {})
    for key, value in (get("rope_scaling") or {}).items():
        params.setdefault(key, value)
    if "type" in params:  # the old name
        params.setdefault("rope_type", params.pop("type"))
    if get("rope_theta") is not None:
        params.setdefault("rope_theta", get("rope_theta"))
    if get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", get("partial_rotary_factor"))
    params.setdefault("rope_type", "default")
    return params


def check_rope(hf_config) -> str:
    """The model's rope type when blending re-rotates it right; UnsupportedRope (naming it) if not.

    Call it at load, before any request: a model this refuses would otherwise answer wrong."""
    p = rope_parameters(hf_config)
    kind = p["rope_type"]
    if isinstance(p.get("rope_parameters"), dict) or any(isinstance(v, dict) for v in p.values()):
        raise UnsupportedRope("this model has a RoPE per attention type (e.g. sliding and full layers): "
                              "blending re-rotates cached keys with one rotary embedding; not supported.")
    if kind not in SUPPORTED_ROPE:
        raise UnsupportedRope(
            f"rope_type '{kind}' is not supported by blending: its rotary embedding is not a rotation "
            f"by the position delta (cached keys cannot be moved to new positions exactly). Supported: "
            f"{', '.join(SUPPORTED_ROPE)}. Serve this model without blending (--backend embedded or "
            f"plain vLLM).")
    if "mrope_section" in p:
        raise UnsupportedRope(f"rope_type '{kind}' with M-RoPE (mrope_section) is not supported by blending.")
    if float(p.get("partial_rotary_factor", 1.0)) != 1.0 or p.get("rope_dim"):
        raise UnsupportedRope(f"rope_type '{kind}' with a partial rotary dimension is not supported by "
                              "blending (LMCache's re-rotation turns the whole head).")
    return kind


def rotation_cache(rotary_emb) -> torch.Tensor:
    """The layer's cos|sin cache [max_pos, rot_dim] in float32, each (cos, sin) pair scaled to unit
    length (YaRN's attention factor divided out): a pure rotation per position."""
    name = type(rotary_emb).__name__
    head, rot = getattr(rotary_emb, "head_size", None), getattr(rotary_emb, "rotary_dim", None)
    if name not in SUPPORTED_CLASSES and not getattr(rotary_emb, "kvblend_supported", False):
        raise UnsupportedRope(f"the served model's rotary embedding is vLLM's {name}: blending re-rotates "
                              f"only {', '.join(SUPPORTED_CLASSES)}.")
    if len(getattr(rotary_emb, "scaling_factors", [1.0])) > 1:
        raise UnsupportedRope("linear RoPE scaling with several factors (LoRA) is not supported by blending.")
    if rot is not None and head is not None and rot != head:
        raise UnsupportedRope(f"partial rotary dimension ({rot} of {head}) is not supported by blending.")
    compute = getattr(rotary_emb, "_compute_cos_sin_cache", None)
    cache = compute() if callable(compute) else rotary_emb.cos_sin_cache  # float32 before vLLM's cast
    cache = cache.to(torch.promote_types(cache.dtype, torch.float32))
    half = cache.shape[1] // 2
    norm = torch.sqrt(cache[:, :half] ** 2 + cache[:, half:] ** 2).repeat(1, 2)
    return cache / norm


def rerotate_torch(old_positions, new_positions, key, head_size: int, cache, is_neox: bool) -> None:
    """K [tokens, heads, head_size] from old to new positions, in place (LMCache's op, in PyTorch)."""
    half = cache.shape[1] // 2
    old, new = cache[old_positions].to(key.dtype), cache[new_positions].to(key.dtype)
    oc, os, nc, ns = (t.unsqueeze(1) for t in (old[:, :half], old[:, half:], new[:, :half], new[:, half:]))
    if is_neox:
        x, y = key[..., :half], key[..., half: 2 * half]
    else:
        x, y = key[..., 0: 2 * half: 2], key[..., 1: 2 * half: 2]
    xr, yr = x * oc + y * os, y * oc - x * os  # undo the old rotation
    xo, yo = xr * nc - yr * ns, yr * nc + xr * ns  # apply the new one
    if is_neox:
        key[..., :half], key[..., half: 2 * half] = xo, yo
    else:
        key[..., 0: 2 * half: 2], key[..., 1: 2 * half: 2] = xo, yo


class Rerotate:
    """`rerotate(old_positions, new_positions, k)`: cached K [tokens, kv_heads * head_size] turned in
    place from the positions it was cached at to new ones, with the served layer's rotary embedding
    (LMCache's `fused_rotary_emb` interface). On CUDA with LMCache, its fused kernel does the turn
    (with our cache); elsewhere PyTorch."""

    def __init__(self, rotary_emb, device=None):
        self.head_size = rotary_emb.head_size
        self.is_neox_style = rotary_emb.is_neox_style
        self.cache = rotation_cache(rotary_emb)  # float32
        if device is not None:
            self.cache = self.cache.to(device)
        self.by_dtype: dict = {}
        self.kernel = None
        if self.cache.device.type == "cuda":
            try:
                import lmcache.c_ops as ops

                self.kernel = ops.rotary_embedding_k_fused
            except (ImportError, AttributeError):
                log.info("LMCache's fused re-rotation kernel not found: re-rotating in PyTorch")

    def cache_for(self, dtype, device) -> torch.Tensor:
        """The cache in the keys' dtype and device (the kernel reads both as one type)."""
        key = (dtype, device)
        if key not in self.by_dtype:
            self.by_dtype[key] = self.cache.to(device=device, dtype=dtype).contiguous()
        return self.by_dtype[key]

    def __call__(self, old_positions, new_positions, k):
        n = k.shape[0]
        heads = k.view(n, -1, self.head_size)
        cache = self.cache_for(k.dtype, k.device)
        if self.kernel is not None and k.is_cuda:
            self.kernel(old_positions, new_positions, heads, self.head_size, cache, self.is_neox_style)
        else:
            rerotate_torch(old_positions, new_positions, heads, self.head_size, cache, self.is_neox_style)
        return heads.view(n, -1)
