"""Conformance of blending across architectures: the CPU float32 reference and the checks.

The reference is the embedded engine's blend (`ModelRunner.blend_cached`) on a checkpoint loaded
through transformers' own classes (its rotary embedding, scaling included), in float32, on exactly
the ids a GPU blend engine gets (`chat_prompt_ids`): the segments LMCache cuts at its separator are
cached alone from position 0 (as the launcher's precompute stores them), the separators and the
question are always computed. Three checks per checkpoint (`CHECKS`):

- `same_pos`: nothing moves (one chunk, then the question, no chat prefix): blend == full prefill;
- `moved_r0`: chunks moved, (almost) nothing recomputed past layer 0: every deeper layer reads
  re-rotated cached K, the sharpest RoPE test;
- `moved_r0.15`: chunks moved, the default ratio.

`tests/test_conformance.py` runs it on the CPU (with a negative control: Llama-3.1 re-rotated with
unscaled frequencies must fail), `tests/gpu/test_conformance.py` against the GPU path.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .metrics import topk_kl
from .prompts import DEFAULT_SYSTEM, chat_prompt_ids, chat_segment_ids, separator_ids

TOPK = 20
# ratio and check layer of each check. "moved_r0": layer 0 computed for every token (the check
# layer), no cached token recomputed past it: layers 1.. read only re-rotated cached K (the GPU path
# at ratio 0; the embedded engine's own ratio 0 would reuse layer 0 too)
CHECKS = {"same_pos": (0.15, 1), "moved_r0": (0.0, 0), "moved_r0.15": (0.15, 1)}


@dataclass
class Prompt:
    check: str
    ids: list[int]
    chunks: list[str]


def prompts(tok, n_same: int = 3, n_moved: int = 3, n_far: int = 1, far_chunks: int = 12,
            seed: int = 0) -> list[Prompt]:
    """QA prompts from the corpus: `same_pos` (the gold chunk, the question), moved ones (the gold
    chunk and 3 others, shuffled, in the chat template) for both moved checks, plus `n_far` prompts
    of `far_chunks` chunks (about 8K tokens: chunks moved by thousands) for `moved_r0`."""
    from .corpus import load_chunks, load_qa

    chunks, qa = load_chunks(), load_qa()
    names = sorted(chunks)
    rng = random.Random(seed)
    out: list[Prompt] = []
    sep = separator_ids(tok)
    for q in qa[:n_same]:
        _, chunk, question = chat_segment_ids(tok, [chunks[q["chunk"]]], q["question"], DEFAULT_SYSTEM)
        out.append(Prompt("same_pos", chunk + sep + question, [chunks[q["chunk"]]]))
    for i, q in enumerate(qa[n_same: n_same + n_moved + n_far]):
        k = 3 if i < n_moved else far_chunks - 1
        order = [q["chunk"], *rng.sample([n for n in names if n != q["chunk"]], k)]
        rng.shuffle(order)
        texts = [chunks[n] for n in order]
        ids = chat_prompt_ids(tok, texts, q["question"], DEFAULT_SYSTEM)
        checks = ("moved_r0", "moved_r0.15") if i < n_moved else ("moved_r0",)
        out += [Prompt(c, ids, texts) for c in checks]
    return out


def split_at(ids: list[int], sep: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each segment between separators (LMCache's SegmentTokenDatabase's cut)."""
    spans, start, i, n = [], 0, 0, len(sep)
    while i <= len(ids) - n:
        if ids[i: i + n] == sep:
            spans.append((start, i))
            start = i = i + n
        else:
            i += 1
    spans.append((start, len(ids)))
    return spans


class Reference:
    """A checkpoint on the CPU through transformers (float32 by default) and the embedded engine's
    blend, on GPU-style ids."""

    def __init__(self, path, dtype: torch.dtype = torch.float32):
        from .embedded.blend import ModelRunner
        from .embedded.model import load_model

        model, tok, _ = load_model(str(path), dtype)
        self.runner = ModelRunner(model, tok, model_id=str(path))
        self.tok = tok
        self.sep = separator_ids(tok)
        self.shift = 0  # every position of a prompt moved by this many (chunk KV stays at 0..n-1)
        self._rope = self.runner.rope
        self.runner.rope = lambda positions: self._rope(positions + self.shift)
        self.kv: dict[tuple, torch.Tensor] = {}

    def segment_kv(self, seg: list[int]) -> torch.Tensor:
        """A segment's KV computed alone at positions 0..n-1 [layers, 2, kv, n, d], K pre-rotary."""
        key = tuple(seg)
        if key not in self.kv:
            shift, self.shift = self.shift, 0
            try:
                self.kv[key] = self.runner.compute_chunk_kv(seg)
            finally:
                self.shift = shift
        return self.kv[key]

    def layout(self, ids: list[int]):
        """(cached KV [layers, 2, kv, n, d], positions of the uncached tokens, old position of each
        cached token) of a GPU prompt: every segment but the last cached alone."""
        r = self.runner
        kv = torch.zeros(r.n_layers, 2, r.n_kv, len(ids), r.head_dim, dtype=r.dtype)
        cached = torch.zeros(len(ids), dtype=torch.bool)
        old = torch.zeros(len(ids), dtype=torch.long)
        spans = split_at(ids, self.sep)
        for start, end in spans[:-1]:
            if end > start:
                kv[:, :, :, start:end] = self.segment_kv(ids[start:end])
                cached[start:end] = True
                old[start:end] = torch.arange(end - start)
        return kv, torch.nonzero(~cached).squeeze(1), old

    def full(self, ids: list[int], shift: int = 0) -> torch.Tensor:
        self.shift = shift
        try:
            return self.runner.full_prefill(ids).logits
        finally:
            self.shift = 0

    def blend(self, ids: list[int], ratio: float, check_layer: int, shift: int = 0, rerotate=None
              ) -> torch.Tensor:
        """Next-token logits of the blend. `rerotate(k_pre, old, new)` changes the cached pre-rotary
        K the way a re-rotation from old to new positions would (None: exact, as the engine)."""
        from .settings import BlendSettings

        kv, uncached, old = self.layout(ids)
        if rerotate is not None:
            new = torch.arange(len(ids)) + shift
            is_cached = torch.ones(len(ids), dtype=torch.bool)
            is_cached[uncached] = False
            for layer in range(kv.shape[0]):
                kv[layer, 0][:, is_cached] = rerotate(kv[layer, 0][:, is_cached], old[is_cached],
                                                      new[is_cached])
        from .embedded import blend as engine

        cfg = BlendSettings(ratio=ratio or 1e-9, check_layer=check_layer, deviation="k")
        select = engine.select_tokens
        if ratio == 0:  # the GPU's ratio 0: the check layer runs, then the uncached tokens only
            engine.select_tokens = lambda dev, _, unc: select(dev, 0.0, unc)
        self.shift = shift
        try:
            return self.runner.blend_cached(ids, kv, uncached, cfg).logits
        finally:
            self.shift = 0
            engine.select_tokens = select

    def check(self, p: Prompt) -> torch.Tensor:
        """The reference logits of a prompt for its check (`same_pos`: the full prefill)."""
        if p.check == "same_pos":
            return self.full(p.ids)
        ratio, layer = CHECKS[p.check]
        return self.blend(p.ids, ratio, layer)


def unscaled_cache(theta: float, head_dim: int, max_pos: int = 1 << 17) -> torch.Tensor:
    """cos|sin [max_pos, head_dim] of plain frequencies: what LMCache's fused_rotary_emb turns
    cached K with (it builds its rotary embedding with rope_scaling=None)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


class ServedRotary:
    """The checkpoint's rotary embedding with vLLM's interface (cos|sin cache [max_pos, head_dim],
    the attention factor included, as vLLM's), from transformers' own: what helpers/gpu/rope.py
    gets from the served model."""

    def __init__(self, ref: Reference, max_pos: int = 1 << 16):
        cos, sin = ref._rope(torch.arange(max_pos))
        half = ref.runner.head_dim // 2
        self.cos_sin_cache = torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1).float()
        self.head_size = self.rotary_dim = ref.runner.head_dim
        self.is_neox_style = True


ServedRotary.__name__ = "RotaryEmbedding"  # rope.rotation_cache accepts vLLM's class names


def rerotation(ref: Reference, cache: torch.Tensor):
    """A `Reference.blend(rerotate=...)` for a GPU-style re-rotation: K rotated at its old positions
    by the model's RoPE (as LMCache stores it), turned to the new ones with `cache` by LMCache's op
    (`rope.rerotate_torch`), then expressed pre-rotary again for the engine (which rotates it with
    the model's RoPE at the new positions: exact when `cache` is the model's own rotation)."""
    from .gpu.rope import rerotate_torch

    d = ref.runner.head_dim

    def turn(k_pre, old, new):  # k_pre [kv, n, d]
        cos_o, sin_o = ref._rope(old)
        k = ref.runner.rotate_k(k_pre[None], cos_o, sin_o)[0].transpose(0, 1).contiguous()  # [n, kv, d]
        rerotate_torch(old, new, k, d, cache, True)
        cos_n, sin_n = ref._rope(new)
        m2 = cos_n ** 2 + sin_n ** 2  # YaRN's attention factor squared (1 elsewhere)
        return ref.runner.rotate_k(k.transpose(0, 1)[None], cos_n / m2, -sin_n / m2)[0]

    return turn


def top_logprobs(logits: torch.Tensor, k: int = TOPK) -> dict:
    """{"token", "top": {id: logprob}}, as the GPU engines report them."""
    lp = torch.log_softmax(logits.float(), -1)
    values, ids = lp.topk(k)
    return {"token": int(ids[0]), "top": dict(zip(ids.tolist(), values.tolist(), strict=True))}


def score(ref: list[dict], got: list[dict]) -> tuple[float, float]:
    """(mean top-20 KL of got to ref, share of first tokens equal)."""
    pairs = [(a, b) for a, b in zip(ref, got, strict=True) if a and b]
    if not pairs:
        return float("nan"), 0.0
    kl = sum(topk_kl(a["top"], b["top"]) for a, b in pairs) / len(pairs)
    return kl, sum(a["token"] == b["token"] for a, b in pairs) / len(pairs)
