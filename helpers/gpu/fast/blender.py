"""The fast path's pass (`FastBlender`) and its hook into LMCache's blender (`wrap_blend`).

A chunk missing from the GPU chunk store is read once from LMCache's host store (all layers) and
kept, least recently used out first. When a prompt's chunks cannot all fit, or anything here fails,
that request falls back to LMCache's blender with our fixes (the `fixed` path), logged and counted
(`FastPath`, and `kvblend_fast_path_fallbacks_total` on vLLM's /metrics)."""

from __future__ import annotations

import functools
import logging

import torch

from ...selection import select_tokens
from ...settings import GPU_BLEND, GpuBlendSettings
from ..rope import Rerotate
from . import FastPath, count_fallback, tp_group
from .attention import attend_selected, prefix_split
from .graphs import GRAPH_MAX_TOKENS, Tail, Tails
from .masks import exact_causal_mask
from .store import ChunkStore, StoreFull
from .timing import Clock

log = logging.getLogger("vllm.kvblend_plugin")


def embed(model, ids):
    """Token embeddings, by whichever name this vLLM model class gives them (as LMCache does)."""
    for name in ("embed_input_ids", "get_input_embeddings"):
        if hasattr(model, name):
            return getattr(model, name)(ids)
    return model.model.embed_tokens(ids)


def deviation(fresh, cached) -> torch.Tensor:
    """Each token's squared distance between fresh and cached K (or V), [tokens, kv_dim] -> [tokens]."""
    return ((fresh.float() - cached.float()) ** 2).sum(dim=1)


class FastBlender:
    """Blends prompts for one LMCache blender (`lmc`, an LMCBlender) over its vLLM model."""

    def __init__(self, lmc, store: ChunkStore, settings: GpuBlendSettings = GPU_BLEND):
        self.lmc = lmc
        self.model = lmc.layerwise_model.vllm_model
        self.layers = list(self.model.model.layers)
        self.store = store
        self.settings = settings
        self.deviation = settings.deviation
        self.check = min(lmc.common_metadata.check_layers)
        self.ratio = float(lmc.common_metadata.recomp_ratios[0])
        self.tp_group = tp_group()  # ranks holding other KV heads select with this one (None: one rank)
        self.full_attention = lmc.layerwise_model.lmc_attn_layers  # FlashAttention, all queries
        # K from old to new positions with the served model's own rotary embedding (its scaling
        # included; LMCache's fused_rotary_emb ignores it), its cache kept on the store's device
        self.rerotate = Rerotate(self.layers[0].self_attn.rotary_emb, store.kv.device)
        self.rerotate.cache_for(store.kv.dtype, store.kv.device)  # before any CUDA graph capture
        self.process_qkv = getattr(lmc.layerwise_model, "_process_qkv", lambda q, k, v, layer: (q, k, v))
        self.tails = Tails(graphs=store.kv.device.type == "cuda" and settings.graphs)
        self.clock = None  # the previous prompt's
        # SplitMask's pages (0: none), from how many keys
        self.split, self.split_from = prefix_split(settings.prefix_attention)

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
        clock = Clock(self.store.kv.device, self.settings.timing)
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
                selected = self.select(fresh, old, gaps)
                q, residual = q[selected], residual[selected]
                mask = exact_causal_mask(selected, n_all, self.split_for(n_all))
                out = self.attend(q, keys, values, mask, attn.attn.impl.scale)
            hidden, _ = attn.o_proj(out.reshape(q.shape[0], heads * d))
            hidden, residual = layer.post_attention_layernorm(hidden, residual)
            hidden = layer.mlp(hidden)
        clock.mark("head")
        bucketed = n_all <= GRAPH_MAX_TOKENS  # kept, and on the GPU replayed as a graph
        tail = self.tails.get(selected.numel(), n_all, hidden, kvcaches, self.split_for, bucketed)
        tail.fill(hidden, residual, selected, index, old_positions, slot_mapping)
        if tail.graph is not None:
            tail.graph.replay()
            how = "graph"
        else:
            self._tail(tail, kvcaches)
            how = "eager"
            if self.tails.graphs and bucketed:  # the next prompt of this bucket replays it
                self.tails.capture(tail, lambda: self._tail(tail, kvcaches))
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
            out = self.attend(q.view(-1, heads, d), keys, values, t.block_mask, attn.attn.impl.scale)
            hidden, _ = attn.o_proj(out.reshape(t.n_pad, heads * d))
            hidden, residual = layer.post_attention_layernorm(hidden, residual)
            hidden = layer.mlp(hidden)

    def select(self, fresh, cached, gaps) -> torch.Tensor:
        """The tokens to recompute past the check layer, the same on every tensor-parallel rank."""
        return select_tokens(deviation(fresh, cached), self.ratio, gaps, self.tp_group)

    def split_for(self, n_keys: int) -> int:
        """exact_causal_mask's `split` for a prompt of n_keys tokens (settings.prefix_attention)."""
        return self.split if n_keys >= self.split_from else 0

    def attend(self, q, k, v, mask, scale: float) -> torch.Tensor:
        """attend_selected with this engine's FlexAttention settings."""
        s = self.settings
        return attend_selected(q, k, v, mask, scale, s.flex_options, s.flex_autotune)


def wrap_blend(original, path: FastPath):
    """Wrap `LMCBlender.blend`: blend in one pass (`FastBlender`) when the GPU chunk store can hold
    the prompt's chunks; else, or if it fails, that prompt alone goes to LMCache's blender with our
    fixes (each fallback logged with the engine's count, and counted on vLLM's /metrics). After a
    failure the next prompt gets a new FastBlender (fresh buffers and graphs): one error, e.g. a
    transient OOM, costs one prompt."""

    @functools.wraps(original)
    def blend(self, tokens, mask=None, **kwargs):
        if path.store is None:
            return original(self, tokens, mask, **kwargs)
        try:
            fast = getattr(self, "_kvblend_fast", None)
            if fast is None:
                fast = self._kvblend_fast = FastBlender(self, path.store, path.settings)
            if fast.blend(tokens, mask, kwargs["kvcaches"], kwargs["slot_mapping"]):
                return None
            path.fallbacks += 1
            count_fallback("no_room")
            log.info("fast blend path: no room in the GPU chunk store (or no chunk hit): this prompt goes "
                     "through LMCache's blender (fallback %d of this engine)", path.fallbacks)
        except Exception:
            self._kvblend_fast = None
            path.fallbacks += 1
            path.failures += 1
            count_fallback("error")
            log.exception("fast blend path failed: this prompt goes through LMCache's blender (with our "
                          "fixes), the next one tries the fast path again (failure %d, fallback %d of this "
                          "engine)", path.failures, path.fallbacks)
        return original(self, tokens, mask, **kwargs)

    blend._kvblend = True
    return blend
