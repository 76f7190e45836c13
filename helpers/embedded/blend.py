"""CacheBlend (Yao et al., EuroSys 2025, arXiv 2405.16444) in plain PyTorch, on transformers' layers.

The idea in four steps, for a prompt `prefix # # chunk_1 # # ... # # chunk_m # # question`:

1. Every segment but the question has its KV computed *alone*, at positions 0..n-1, once, and kept
   in a store keyed by its token ids (`chunk_kv`). Reordering chunks changes nothing there.
2. For a new prompt, the cached KV of its segments is laid side by side. K is stored before rotary
   embedding and rotated to each token's new absolute position, so positions are exact (`rerotate`).
3. What a cached KV misses is cross-attention: chunk_2's tokens never saw chunk_1. Layers below the
   *check layer* are recomputed for all tokens (cheap: one or two layers); at the check layer the
   fresh V (or K) is compared with the cached one and the `ratio` of cached tokens that deviate most
   is selected (`select_tokens`, helpers/selection.py). The question's tokens are never cached and
   always computed.
4. Deeper layers compute only the selected tokens: their fresh K/V overwrite the cached entries and
   they attend over the whole merged cache with an exact causal mask (`forward_layers`).
   `blend_cached` does steps 2-4 for any layout of cached and uncached tokens.

ratio = 1.0 recomputes everything and equals a full prefill; ratio = 0 is "full KV reuse": cached KV
as is, only the question computed (the paper's baseline that goes wrong).

Two choices differ from LMCache's blender:
- deviation on V, as CacheBlend's original code (LMCache compares K; `BlendSettings.deviation`
  switches it). The two are close: on the QA prompts with chunks stored alone K is a little closer
  to a full prefill (`docs/benchmarks/blend_gap_study.csv`, notebook 02's "K or V?"), which is why
  the GPU keeps LMCache's K; this engine keeps V so notebook 02 can show CacheBlend's own rule;
- `ratio` counts cached tokens only (LMCache: all tokens), and at the check layer every token keeps
  its fresh K/V (computed anyway for the deviation; LMCache keeps the cached one for unselected).

Tensors have no batch dimension except where transformers' helpers want one: a hidden state is
`[tokens, hidden]`, a layer's cache `[kv_heads, tokens, head_dim]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from ..selection import select_tokens
from ..settings import BLEND, BlendSettings
from .kvstore import ChunkKVStore, chunk_key


@dataclass
class Prefill:
    """A prompt's KV cache (post-rotary K, V per layer, with room to decode) and its next-token logits."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int
    logits: torch.Tensor
    info: dict = field(default_factory=dict)


class ModelRunner:
    """Runs one model both ways: a full prefill (the baseline) and a blended prefill from cached
    chunk KV, then decoding. No server, no sampling: `generate.Generator` and the notebooks drive it."""

    def __init__(self, model, tokenizer, store: ChunkKVStore | None = None, model_id: str = "model"):
        self.model, self.tok, self.model_id = model, tokenizer, model_id
        self.store = store if store is not None else ChunkKVStore()
        cfg = model.config
        self.layers = model.model.layers
        self.n_layers = cfg.num_hidden_layers
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_len = cfg.max_position_embeddings
        self.dtype = model.dtype

    # ---------------------------------------------------------------- tokens
    def tokenize(self, segments: list[str], add_bos: bool = False) -> list[list[int]]:
        """Each segment on its own, no special tokens (a chat template already wrote them). With
        add_bos, the first segment gets the tokenizer's BOS, as a plain completion prompt would."""
        ids = [self.tok.encode(s, add_special_tokens=False) for s in segments]
        bos = self.tok.bos_token_id
        if add_bos and bos is not None and ids and (not ids[0] or ids[0][0] != bos):
            ids[0] = [bos, *ids[0]]
        return [s for s in ids if s]

    # ---------------------------------------------------------------- one transformer layer
    def rope(self, positions: torch.Tensor):
        """cos, sin for absolute positions, from the model's own rotary embedding."""
        dummy = torch.empty(0, dtype=self.dtype)
        return self.model.model.rotary_emb(dummy, positions[None])

    def project(self, layer, h: torch.Tensor):
        """Norm + Q/K/V projections for hidden states h [t, hidden] -> q [heads, t, d], k/v [kv, t, d]."""
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        t = h.shape[0]
        q = attn.q_proj(x).view(t, -1, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(t, -1, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(t, -1, self.head_dim).transpose(0, 1)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms, applied before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v

    @staticmethod
    def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotary embedding of q [heads, t, d] and k [kv, t, d], cos/sin [1, t, d] (transformers')."""
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        return q[0], k[0]

    @staticmethod
    def rotate_k(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The same rotation for K alone (re-rotating cached keys needs no query)."""
        return k * cos + rotate_half(k) * sin

    def finish(self, layer, h, q, k_all, v_all, q_pos: torch.Tensor, n_keys: int):
        """Attention of queries at positions q_pos over keys 0..n_keys-1, then o_proj, residual, MLP."""
        k_all, v_all = k_all[:, :n_keys], v_all[:, :n_keys]
        if q.shape[1] == n_keys:  # every position present: plain causal attention
            mask, causal = None, True
        elif q.shape[1] == 1 and q_pos[0] == n_keys - 1:  # decoding the newest token
            mask, causal = None, False
        else:  # a subset: query i sees the keys at positions <= its own
            mask, causal = torch.arange(n_keys)[None, :] <= q_pos[:, None], False
        o = F.scaled_dot_product_attention(
            q[None], k_all[None], v_all[None], attn_mask=mask, is_causal=causal,
            scale=layer.self_attn.scaling, enable_gqa=True,
        )[0]
        h = h + layer.self_attn.o_proj(o.transpose(0, 1).reshape(q.shape[1], -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def forward_layers(self, h, pos, cos, sin, k_cache, v_cache, n_keys, layers: range):
        """Run tokens at positions `pos` (hidden states h) through `layers`, writing their fresh K/V
        into the cache and attending over cache[:n_keys]. Returns h after the last layer."""
        for i in layers:
            layer = self.layers[i]
            q, k, v = self.project(layer, h)
            q, k = self.rotate(q, k, cos, sin)
            k_cache[i][:, pos] = k
            v_cache[i][:, pos] = v
            h = self.finish(layer, h, q, k_cache[i], v_cache[i], pos, n_keys)
        return h

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the final hidden state of the last token only (the vocabulary
        projection is large; computing it for every prompt token would be wasted)."""
        return self.model.lm_head(self.model.model.norm(h_last[None]))[0].float()

    def new_cache(self, n_tokens: int, room: int):
        shape = (self.n_kv, n_tokens + room, self.head_dim)
        k = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        return k, v

    # ---------------------------------------------------------------- step 1: chunk KV, alone
    @torch.inference_mode()
    def compute_chunk_kv(self, ids: list[int]) -> torch.Tensor:
        """KV of one segment computed alone at positions 0..n-1: [layers, 2, kv, n, d], K pre-rotary."""
        n = len(ids)
        pos = torch.arange(n)
        cos, sin = self.rope(pos)
        h = self.model.model.embed_tokens(torch.tensor(ids))
        out = torch.empty(self.n_layers, 2, self.n_kv, n, self.head_dim, dtype=self.dtype)
        for i, layer in enumerate(self.layers):
            q, k, v = self.project(layer, h)
            out[i, 0], out[i, 1] = k, v
            q, k = self.rotate(q, k, cos, sin)
            h = self.finish(layer, h, q, k, v, pos, n)
        return out

    def chunk_kv(self, ids: list[int]) -> tuple[torch.Tensor, bool]:
        """The segment's KV from the store, computing and storing it on a miss. Returns (kv, hit)."""
        key = chunk_key(self.model_id, ids)
        kv = self.store.get(key)
        if kv is not None:
            return kv, True
        kv = self.compute_chunk_kv(ids)
        self.store.put(key, kv)
        return kv, False

    # ---------------------------------------------------------------- step 2: re-rotation
    def rerotate(self, k_pre: torch.Tensor, start: int) -> torch.Tensor:
        """Cached pre-rotary K [kv, n, d] rotated to positions start..start+n-1 (blend_prefill does the
        same inline, with cos/sin computed once for all layers). Rotating from the
        stored pre-rotary K is exactly what a prefill does at those positions; rotating an already
        rotated K by the position delta would add a rounding error of its own."""
        cos, sin = self.rope(torch.arange(start, start + k_pre.shape[1]))
        return self.rotate_k(k_pre, cos, sin)

    # ---------------------------------------------------------------- full prefill (the baseline)
    @torch.inference_mode()
    def full_prefill(self, ids: list[int], room: int = 0) -> Prefill:
        t0 = time.perf_counter()
        n = len(ids)
        self.check_length(n + room)
        pos = torch.arange(n)
        cos, sin = self.rope(pos)
        k, v = self.new_cache(n, room)
        h = self.model.model.embed_tokens(torch.tensor(ids))
        h = self.forward_layers(h, pos, cos, sin, k, v, n, range(self.n_layers))
        logits = self.logits(h[-1])
        ms = (time.perf_counter() - t0) * 1e3
        return Prefill(k, v, n, logits, {"mode": "full", "n_tokens": n, "timings_ms": {"prefill": ms}})

    # ---------------------------------------------------------------- steps 1-4: blended prefill
    @torch.inference_mode()
    def blend_prefill(self, segments: list[list[int]], cfg: BlendSettings | None = None, room: int = 0,
                      explain: bool = False) -> Prefill:
        """Prefill `segments` (token ids; the last one is the question) reusing cached chunk KV."""
        lap = Laps()
        ids = [t for s in segments for t in s]
        n = len(ids)
        self.check_length(n + room)
        cached_segs = segments[:-1]
        n_cached = n - len(segments[-1])

        # Step 1: the chunks' own KV (computed now if never seen: the first request pays once).
        kvs, hits = [], 0
        for seg in cached_segs:
            kv, hit = self.chunk_kv(seg)
            kvs.append(kv)
            hits += hit
        lap("chunk_kv")
        question = torch.zeros(self.n_layers, 2, self.n_kv, n - n_cached, self.head_dim, dtype=self.dtype)
        cached = torch.cat([*kvs, question], dim=3)  # [layers, 2, kv, n, d]; the question has none
        info = {"mode": "blend", "n_tokens": n, "n_cached": n_cached, "chunk_hits": hits,
                "chunk_misses": len(cached_segs) - hits}
        return self.blend_cached(ids, cached, torch.arange(n_cached, n), cfg, room, explain, lap, info)

    @torch.inference_mode()
    def blend_cached(self, ids: list[int], cached: torch.Tensor, uncached: torch.Tensor,
                     cfg: BlendSettings | None = None, room: int = 0, explain: bool = False,
                     lap: Laps | None = None, info: dict | None = None) -> Prefill:
        """Steps 2-4 for tokens `ids` whose KV computed alone is `cached` [layers, 2, kv, n, d] (K
        pre-rotary), except at the positions `uncached` (their rows are ignored, their tokens always
        computed). The last token must be uncached: its logits are the prefill's."""
        cfg, lap = cfg or BLEND, lap or Laps()
        n = len(ids)
        self.check_length(n + room)
        full_reuse = cfg.ratio <= 0
        check = 0 if full_reuse else min(cfg.check_layer, self.n_layers - 1)

        # Step 2: lay the cached KV into the merged cache, K rotated to its new positions. Layers
        # below the check layer are recomputed for every token, so they need no cached copy.
        pos = torch.arange(n)
        cos, sin = self.rope(pos)
        k_cache, v_cache = self.new_cache(n, room)
        for i in range(check, self.n_layers):
            k_cache[i][:, :n] = self.rotate_k(cached[i, 0], cos, sin)
            v_cache[i][:, :n] = cached[i, 1]
        lap("rerotate")

        h = self.model.model.embed_tokens(torch.tensor(ids))
        info = {**(info or {}), "ratio": cfg.ratio, "check_layer": check, "deviation_on": cfg.deviation}
        if full_reuse:
            sel = uncached
            h = h[sel]
        else:
            # Step 3a: layers below the check layer, all tokens, exactly as a full prefill.
            h = self.forward_layers(h, pos, cos, sin, k_cache, v_cache, n, range(check))
            lap("full_layers")
            # Step 3b: at the check layer compute every token's fresh K/V, measure how far the
            # cached KV is from it, keep the most deviating cached tokens plus the uncached ones.
            layer = self.layers[check]
            q, k, v = self.project(layer, h)
            fresh, old = (v, cached[check, 1]) if cfg.deviation == "v" else (k, cached[check, 0])
            dev = ((fresh.float() - old.float()) ** 2).sum(dim=(0, 2))  # [n], both pre-rotary
            sel = select_tokens(dev, cfg.ratio, uncached)
            # The check layer's fresh K/V are already paid for: keep them for every token.
            q, k = self.rotate(q, k, cos, sin)
            k_cache[check][:, :n] = k
            v_cache[check][:, :n] = v
            h = self.finish(layer, h[sel], q[:, sel], k_cache[check], v_cache[check], sel, n)
            lap("check_layer")
            if explain:
                is_cached = torch.ones(n, dtype=torch.bool)
                is_cached[uncached] = False
                info["deviation"] = dev[is_cached].tolist()
                info["selected"] = sel.tolist()

        # Step 4: deeper layers compute only the selected tokens against the merged cache.
        h = self.forward_layers(h, sel, cos[:, sel], sin[:, sel], k_cache, v_cache, n,
                                range(check + 1 if not full_reuse else 0, self.n_layers))
        logits = self.logits(h[-1])
        lap("partial_layers")
        info["n_recomputed"] = int(sel.numel())
        info["timings_ms"] = lap.times
        return Prefill(k_cache, v_cache, n, logits, info)

    # ---------------------------------------------------------------- decoding
    @torch.inference_mode()
    def decode_step(self, state: Prefill, token: int) -> torch.Tensor:
        """Append one token to the cache (there must be room) and return the next logits."""
        p = state.length
        pos = torch.tensor([p])
        cos, sin = self.rope(pos)
        h = self.model.model.embed_tokens(pos.new_tensor([token]))
        h = self.forward_layers(h, pos, cos, sin, state.k, state.v, p + 1, range(self.n_layers))
        state.length = p + 1
        state.logits = self.logits(h[-1])
        return state.logits

    def check_length(self, n: int) -> None:
        if n > self.max_len:
            raise ContextTooLong(n, self.max_len)


class Laps:
    """Milliseconds per named phase, each since the previous one: `lap("name")`, then `lap.times`."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = (now - self.clock) * 1e3
        self.clock = now


class ContextTooLong(ValueError):
    def __init__(self, n: int, limit: int):
        super().__init__(
            f"The prompt plus max_tokens needs {n} tokens, but the model's context is {limit}. "
            "Use fewer or shorter chunks, or a smaller max_tokens."
        )
        self.n, self.limit = n, limit
