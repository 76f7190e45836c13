"""vLLM general plugin that lets LMCache 0.5.3's CacheBlend run on vLLM 0.26.

vLLM calls `register()` in every process it starts (API server, engine core, workers) through the
entry point `vllm.general_plugins: kvblend_lmcache` declared in pyproject.toml. It does nothing
unless blending is configured (the blend engine's LMCache YAML says `enable_blending: true`), so a
plain vLLM engine, such as our baseline, runs untouched.

It closes two gaps between the two releases and mends two faults of LMCache's blender, by
monkeypatching at start-up (never on disk), and quiets one known LMCache warning (see `FirstOnly`):

1. **The blender cannot find the model.** LMCache's blender looks the vLLM model up under
   `ENGINE_NAME` in `VLLMModelTracker`, but nothing registers it there, so the engine dies with
   "vllm model for vllm-instance not found" (LMCache #4131). We register it right after
   `Worker.load_model`, which runs before the KV connector (and the blender with it) is built.
2. **The KV layout.** vLLM 0.26's FlashAttention keeps each layer's cache as one 4-D tensor with K
   and V packed in the last axis: `[blocks, block_size, heads, 2*head_size]` (NHD) or
   `[blocks, heads, block_size, 2*head_size]` (HND). LMCache detects these layouts (it names them
   `NL_X_NB_BS_NH_CS` and `NL_X_NB_NH_BS_CS`), but its compiled `single_layer_kv_transfer`, which
   the blending connector calls for every layer, indexes a 5-D tensor and fails with
   `IndexError: Dimension out of range (... got 4)`. We send those two layouts to
   `paged_kv_transfer`, a plain PyTorch gather/scatter by slot mapping; every other layout still
   goes to the compiled op.
3. **Recomputed tokens see the future** (LMCache's blender, any vLLM). Past the check layer the
   blender recomputes only the selected tokens and runs FlashAttention with `causal=True`,
   `cu_seqlens_q=[0, n]` and `cu_seqlens_k=[0, N]`. With fewer queries than keys FlashAttention
   aligns the causal mask to the *end*: the i-th selected token attends to keys 0..N-n+i instead of
   0..its own position, so nearly every recomputed K/V has read later tokens. `selected_attention`
   attends with the exact mask (query at position p sees keys 0..p), through FlexAttention.
4. **Layers below the check layer are never written back.** The blender computes them for every
   token but hands vLLM's cache the *retrieved* KV, where the gaps between segments (the separator
   tokens, never cached) are zeros: the question, which vLLM computes itself, attends to zero keys
   and values there at layer 0. `process_qkv` writes every layer's fresh K/V back for all tokens it
   computed, selects the ratio among *cached* tokens and always recomputes the gap tokens (as our
   embedded engine does).
Set `KVBLEND_BLEND_PATH=upstream` to run LMCache's blender as shipped (3 and 4 off), to compare, or
`KVBLEND_BLEND_PATH=fast` for our one-pass blender with a GPU chunk store (`fast_blend.py`, issue
10): the same algorithm as `fixed`, without LMCache's per-layer syncs and host copies.
"""

from __future__ import annotations

import functools
import logging
import os
import re

log = logging.getLogger("vllm.kvblend_plugin")  # a child of vLLM's logger: lands in the engine log

# LMCache's names for vLLM 0.26's 4-D layouts -> the order of the middle axes
LAYOUTS = {"NL_X_NB_BS_NH_CS": "NB_BS_NH_CS", "NL_X_NB_NH_BS_CS": "NB_NH_BS_CS"}


def blending_enabled(environ=None) -> bool:
    """True when this vLLM process is a blend engine: LMCache's config enables blending."""
    environ = os.environ if environ is None else environ
    if environ.get("LMCACHE_ENABLE_BLENDING", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    path = environ.get("LMCACHE_CONFIG_FILE", "")
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return False
    match = re.search(r"^enable_blending\s*:\s*(\S+)", text, re.MULTILINE)
    return bool(match) and match.group(1).strip("'\"").lower() in ("true", "yes", "on", "1")


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


class FirstOnly(logging.Filter):
    """Lets the first record that contains `text` through and drops the rest (counted in `dropped`).

    LMCache 0.5.3's layer-wise blending unpins each retrieved memory object twice and warns
    "Double unpin occurred ... Setting pin count back to 0" for every layer of every chunk: some
    1,500 lines per 32K-token request, written in the engine's step, on the time to first token."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.dropped = text, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        self.dropped += 1
        return self.dropped == 1


BLEND_PATHS = ("fast", "fixed", "upstream")  # KVBLEND_BLEND_PATH; the first is the default


def blend_path(environ=None) -> str:
    """`fast` (default: our one-pass blender, `fast_blend.py`), `fixed` (LMCache's blender with
    faults 3 and 4 mended) or `upstream` (LMCache's blender as shipped), from KVBLEND_BLEND_PATH."""
    environ = os.environ if environ is None else environ
    path = environ.get("KVBLEND_BLEND_PATH", BLEND_PATHS[0]).strip().lower()
    if path not in BLEND_PATHS:
        raise ValueError(f"KVBLEND_BLEND_PATH must be one of {', '.join(BLEND_PATHS)}, got {path!r}")
    return path


def deviation(environ=None) -> str:
    """What the check layer compares: `k` (LMCache's choice, the default) or `v` (CacheBlend's
    original code and our embedded engine), from KVBLEND_BLEND_DEVIATION."""
    dev = (os.environ if environ is None else environ).get("KVBLEND_BLEND_DEVIATION", "k").strip().lower()
    if dev not in ("k", "v"):
        raise ValueError(f"KVBLEND_BLEND_DEVIATION must be 'k' or 'v', got {dev!r}")
    return dev


def process_qkv(self, q, k, v, residual, layer_id, attn_output, attn_metadata):
    """`LMCBlender.process_qkv` with faults 3 and 4 mended (see the module docstring).

    Called by LMCache's layer-wise model for every layer of a blended prompt, between the QKV
    projection and attention. Until the check layer every token is computed: its fresh K/V replace
    the retrieved ones (which vLLM's cache then receives). At the check layer the tokens to
    recompute are selected; past it only they are computed and overwrite their cached rows."""
    import torch

    from ..selection import select_tokens
    from .fast_blend import deviation as token_deviation

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
        fresh, cached = (v, old_v) if deviation() == "v" else (k, old_k)
        selected = select_tokens(token_deviation(fresh, cached), self.common_metadata.recomp_ratios[0], gaps)
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


def selected_attention(original):
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
        from .fast_blend import attend_selected, exact_causal_mask

        block_mask = getattr(attn_metadata, "kvblend_block_mask", None)
        if block_mask is None:
            block_mask = attn_metadata.kvblend_block_mask = exact_causal_mask(positions, key.shape[0])
        output.copy_(attend_selected(query, key, value, block_mask, self.vllm_attn_impl.scale))
        return output

    forward_contiguous._kvblend = True
    return forward_contiguous


def _mend_blender() -> None:
    """Faults 3 and 4: our `process_qkv` for LMCache's blender, exact masks for selected tokens."""
    from lmcache.v1.compute.attention import flash_attn
    from lmcache.v1.compute.blend import blender

    blender.LMCBlender.process_qkv = process_qkv
    backend = flash_attn.LMCFlashAttnBackend
    if not getattr(backend.forward_contiguous, "_kvblend", False):
        backend.forward_contiguous = selected_attention(backend.forward_contiguous)


_FAST = {"store": None, "failed": False}


def fast_blend(original):
    """Wrap `LMCBlender.blend`: blend in one pass (`fast_blend.FastBlender`) when the GPU chunk store
    can hold the prompt's chunks; else, or if it fails, LMCache's blender with our fixes (logged)."""

    @functools.wraps(original)
    def blend(self, tokens, mask=None, **kwargs):
        from . import fast_blend as fb

        if _FAST["store"] is not None and not _FAST["failed"]:
            fast = getattr(self, "_kvblend_fast", None)
            try:
                if fast is None:
                    fast = self._kvblend_fast = fb.FastBlender(self, _FAST["store"], deviation())
                if fast.blend(tokens, mask, kwargs["kvcaches"], kwargs["slot_mapping"]):
                    return None
                log.info("fast blend path: no room in the GPU chunk store (or no chunk hit): "
                         "this prompt goes through LMCache's blender")
            except Exception:
                _FAST["failed"] = True
                log.exception("fast blend path failed: this and every later prompt go through "
                              "LMCache's blender (with our fixes)")
        return original(self, tokens, mask, **kwargs)

    blend._kvblend = True
    return blend


def store_first_lookup(original):
    """Wrap `LMCacheEngine.lookup` for the fast path: a chunk held in the GPU chunk store is a hit
    without asking LMCache's storage. Layer-wise, LMCache 0.5.3 checks and pins the key of every
    layer of every chunk and unpins them after the load (about 11 ms at 8K tokens for a 7B model,
    while the scheduler waits on the lookup); the fast path never reads the host copy of a chunk it
    holds, so that copy needs no pin. Other chunks are checked and pinned as LMCache does. A prompt
    whose chunks cannot all fit the store goes to LMCache's blender, which reads every chunk from
    the host: it gets LMCache's own lookup, pins and all."""

    @functools.wraps(original)
    def lookup(self, tokens=None, hashes=None, offsets=None, search_range=None, lookup_id=None,
               pin=False, request_configs=None):
        store = _FAST["store"]
        if (store is None or _FAST["failed"] or not self.use_layerwise or tokens is None
                or not self.is_healthy()):
            return original(self, tokens, hashes, offsets, search_range, lookup_id, pin, request_configs)
        segments = list(self.token_database.process_tokens(tokens=tokens, request_configs=request_configs))
        if not store.fits([end - start for start, end, _ in segments]):
            return original(self, tokens, hashes, offsets, search_range, lookup_id, pin, request_configs)
        stats, hit = self.stats_monitor.on_lookup_request(len(tokens)), 0
        for _, end, key in segments:
            if not store.holds(key):
                layer_keys = key.split_layers(self.num_layers)
                found, where = self.storage_manager.batched_contains(
                    layer_keys, search_range or self.retrieve_locations, pin)
                if found != self.num_layers or len(where) != 1:
                    for location, pinned in where.items() if pin else ():
                        self.storage_manager.batched_unpin(pinned, [location])  # LMCache leaks these
                    break
                if pin:
                    self.lookup_pins[lookup_id][next(iter(where))].extend(layer_keys)
            hit = end
        self.stats_monitor.on_lookup_finished(stats, hit)
        if pin:
            self.storage_manager.touch_cache()
        return hit

    lookup._kvblend = True
    return lookup


def _make_fast_store(worker, model) -> None:
    """The fast path's GPU chunk store, its bytes counted as the model's so that vLLM's KV cache
    shrinks by as much (within --gpu-memory-utilization); a clear error when it cannot fit."""
    import torch

    from . import fast_blend as fb

    gb = fb.store_gb()
    options = fb.flex_options()  # a bad KVBLEND_FLEX_OPTIONS stops the engine here, with its message
    if options:
        log.info("fast blend path: FlexAttention kernel options %s", options)
    split, split_from = fb.prefix_split()  # a bad KVBLEND_PREFIX_ATTENTION stops it here too
    if split:
        log.info("fast blend path: each q-block's prefix keys through FlashAttention from %d keys (%s)",
                 split_from, fb.PREFIX_ENV)
    if gb <= 0:
        log.warning("fast blend path without a GPU chunk store (%s=0): prompts go through LMCache's "
                    "blender", fb.STORE_ENV)
        return
    cache_config = getattr(worker, "cache_config", None) or worker.vllm_config.cache_config
    util = float(cache_config.gpu_memory_utilization)
    device = next(model.parameters()).device
    used = int(worker.model_runner.model_memory_usage)
    fb.check_store_fits(gb, util, torch.cuda.get_device_properties(device).total_memory, used)
    _FAST["store"] = fb.build_store(model, gb)
    worker.model_runner.model_memory_usage = used + int(gb * 1e9)
    log.info("fast blend path: GPU chunk store of %g GB (%d tokens)", gb, _FAST["store"].pos.numel())


def _register_model_after_load() -> None:
    """Wrap `Worker.load_model` so the loaded model is registered for LMCache's blender (and, on the
    fast path, gets its GPU chunk store)."""
    from vllm.v1.worker import gpu_worker

    original = gpu_worker.Worker.load_model
    if getattr(original, "_kvblend", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        from lmcache.integration.vllm.utils import ENGINE_NAME
        from lmcache.v1.compute.models.utils import VLLMModelTracker

        VLLMModelTracker.register_model(ENGINE_NAME, self.model_runner.get_model())
        if blend_path() == "fast":
            _make_fast_store(self, self.model_runner.get_model())
        return result

    load_model._kvblend = True
    gpu_worker.Worker.load_model = load_model


def _route_4d_kv_transfer() -> None:
    """Give LMCache's GPU connectors a `lmc_ops` whose KV transfer handles the 4-D layouts."""
    from lmcache.v1.gpu_connector import gpu_connectors

    if not isinstance(gpu_connectors.lmc_ops, KVTransferOps):
        gpu_connectors.lmc_ops = KVTransferOps(gpu_connectors.lmc_ops)


def register() -> None:
    """vLLM's entry point: activate both fixes in this process if blending is configured."""
    if not blending_enabled():
        return
    try:
        _register_model_after_load()
        _route_4d_kv_transfer()
        if blend_path() in ("fixed", "fast"):
            _mend_blender()  # the fast path falls back to the mended blender
        if blend_path() == "fast":
            from lmcache.v1.compute.blend import blender

            if not getattr(blender.LMCBlender.blend, "_kvblend", False):
                blender.LMCBlender.blend = fast_blend(blender.LMCBlender.blend)
            from lmcache.v1.cache_engine import LMCacheEngine

            from .fast_blend import LOOKUP_ENV

            wrapped = getattr(LMCacheEngine.lookup, "_kvblend", False)
            if os.environ.get(LOOKUP_ENV, "1") != "0" and not wrapped:
                LMCacheEngine.lookup = store_first_lookup(LMCacheEngine.lookup)
    except ImportError as err:  # vLLM or LMCache missing: the engine itself will say so
        log.warning("kvblend plugin inactive, cannot import %s", err.name or err)
        return
    lmcache_memory = logging.getLogger("lmcache.v1.memory_management")
    if not any(isinstance(f, FirstOnly) for f in lmcache_memory.filters):
        lmcache_memory.addFilter(FirstOnly("Double unpin"))
    log.info("kvblend plugin active: model registered for LMCache's blender, 4-D KV transfer in PyTorch, "
             "blend path %s", blend_path())
