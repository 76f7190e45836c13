"""helpers/gpu/fast/ on CPU, in float64 (or, with KVBLEND_TEST_DEVICE=cuda on a GPU, in float32
with the tail replayed as CUDA graphs), over a small Llama built with vLLM's layer
interfaces (fused-residual RMSNorm, qkv_proj/o_proj returning (out, bias), rotary_emb(positions, q,
k), an attention impl with `do_kv_cache_update`) and LMCache's (token database, host store of
per-layer chunk KV with their cached positions, re-rotation). Neither is installed here.

What must hold: the paged KV the fast path writes equals a full prefill's when nothing has to be
repaired (each chunk at the positions it was cached at: any ratio) and when everything is recomputed
(ratio 1.0, chunks reordered); the chunk store evicts least recently used chunks, never the prompt's
own, and says when it cannot fit; the FlexAttention block lists are exact."""

import collections
import functools
import logging
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F

from helpers.gpu.fast import FastPath
from helpers.gpu.fast import attention as at
from helpers.gpu.fast import blender as bl
from helpers.gpu.fast import graphs as gr
from helpers.gpu.fast import masks as mk
from helpers.gpu.fast import store as st
from helpers.gpu.fast.lookup import store_first_lookup
from helpers.settings import GPU_BLEND, GpuBlendSettings

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
H, HEADS, KV_HEADS, D, LAYERS, VOCAB, SEP = 32, 4, 2, 16, 4, 50, (48, 49)
DEVICE = os.environ.get("KVBLEND_TEST_DEVICE", "cpu")
DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
close = functools.partial(torch.testing.assert_close,
                          **({} if DEVICE == "cpu" else {"atol": 2e-4, "rtol": 2e-4}))


# ------------------------------------------------------------------ a Llama with vLLM's interfaces
def rope(x, positions, heads, sign=1.0):
    """Neox-style rotary embedding of [T, heads*D] at `positions` (sign -1 undoes it)."""
    x = x.view(x.shape[0], heads, D)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=DTYPE, device=x.device) / D))
    angles = positions.to(x.device, DTYPE)[:, None] * inv[None, :] * sign
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).reshape(x.shape[0], heads * D)


class RotaryEmbedding:
    """vLLM's interface (its class name, `rotary_emb(positions, q, k)`, the cos|sin cache the fast
    path re-rotates cached K with: helpers/gpu/rope.py)."""

    head_size = rotary_dim = D
    is_neox_style = True

    def __init__(self, max_position: int = 4096):
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=DTYPE) / D))
        angles = torch.arange(max_position, dtype=DTYPE)[:, None] * inv[None, :]
        self.cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1)

    def __call__(self, positions, q, k):
        return rope(q, positions, HEADS), rope(k, positions, KV_HEADS)


class Norm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(H, dtype=DTYPE))

    def forward(self, x, residual=None):
        if residual is not None:
            x = residual = x + residual
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return y if residual is None else (y, residual)


class Linear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x), None


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(H, 2 * H, dtype=DTYPE)
        self.down = torch.nn.Linear(2 * H, H, dtype=DTYPE)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


class Impl:
    scale = D ** -0.5

    @staticmethod
    def do_kv_cache_update(layer, key, value, kv_cache, slot_mapping):  # a flat [slots, 2, kv_heads, D]
        kv_cache[slot_mapping] = torch.stack([key, value], dim=1)


def make_model():
    with torch.device(DEVICE):
        return _make_model()


def _make_model():
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        attn = types.SimpleNamespace(num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=D, impl=Impl())
        self_attn = types.SimpleNamespace(
            qkv_proj=Linear(H, (HEADS + 2 * KV_HEADS) * D, dtype=DTYPE),
            o_proj=Linear(HEADS * D, H, dtype=DTYPE), q_size=HEADS * D, kv_size=KV_HEADS * D,
            attn=attn,
            rotary_emb=RotaryEmbedding())
        layers.append(types.SimpleNamespace(input_layernorm=Norm(), post_attention_layernorm=Norm(),
                                            self_attn=self_attn, mlp=Mlp()))
    embed = torch.nn.Embedding(VOCAB, H, dtype=DTYPE)
    return types.SimpleNamespace(model=types.SimpleNamespace(layers=layers, embed_tokens=embed))


def causal(q, k, v):
    """Full causal attention, q [T, heads, D], k/v [T, kv_heads, D]."""
    rep = HEADS // KV_HEADS
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
                                         v.repeat_interleave(rep, 1).transpose(0, 1), is_causal=True)
    return out.transpose(0, 1)


@torch.no_grad()
def full_prefill(model, ids):
    """Every layer's rotated K and V ([layers, T, kv_heads*D] each) of a plain causal prefill."""
    pos = torch.arange(len(ids), device=DEVICE)
    hidden, residual, ks, vs = model.model.embed_tokens(torch.tensor(ids, device=DEVICE)), None, [], []
    for layer in model.model.layers:
        a = layer.self_attn
        if residual is None:
            residual, hidden = hidden, layer.input_layernorm(hidden)
        else:
            hidden, residual = layer.input_layernorm(hidden, residual)
        q, k, v = a.qkv_proj(hidden)[0].split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q, k = a.rotary_emb(pos, q, k)
        ks.append(k)
        vs.append(v)
        out = causal(q.view(-1, HEADS, D), k.view(-1, KV_HEADS, D), v.view(-1, KV_HEADS, D))
        hidden = a.o_proj(out.reshape(-1, HEADS * D))[0]
        hidden, residual = layer.post_attention_layernorm(hidden, residual)
        hidden = layer.mlp(hidden)
    return torch.stack(ks), torch.stack(vs)


# ------------------------------------------------------------------ LMCache's side
class Key(tuple):
    def split_layers(self, n):
        return [(self, i) for i in range(n)]


class HostObj:
    def __init__(self, kv, positions):
        self.tensor, self.metadata, self.refs = kv, types.SimpleNamespace(cached_positions=positions), 1

    def ref_count_down(self):
        self.refs -= 1


class Host:
    """LMCache's host store: per (chunk key, layer) a [2, T, kv_dim] object and its positions."""

    def __init__(self):
        self.objs, self.gets = {}, 0

    def get(self, layer_key):
        self.gets += 1
        return self.objs.get(layer_key)


def segments(ids):
    """LMCache's SegmentTokenDatabase: cut at SEP, key each segment by its tokens."""
    out, start = [], 0
    for i in range(len(ids) - 1):
        if tuple(ids[i:i + 2]) == SEP:
            out.append((start, i))
            start = i + 2
    out.append((start, len(ids)))
    return [(s, e, Key(ids[s:e])) for s, e in out if e > s]


def precompute(model, host, ids):
    """What a precompute request leaves in LMCache: every segment's KV at its positions here."""
    ks, vs = full_prefill(model, ids)
    for s, e, key in segments(ids):
        for layer in range(LAYERS):
            kv = torch.stack([ks[layer, s:e], vs[layer, s:e]])
            host.objs[(key, layer)] = HostObj(kv, torch.arange(s, e))


class FullAttention:
    def init_attn_metadata(self, input_ids):
        return None

    def forward_contiguous(self, q, k, v, out, meta):
        out.copy_(causal(q, k, v))
        return out


def blender(model, host, ratio, check_layer=1):
    def rerotate(old, new, k):
        return rope(rope(k, old, KV_HEADS, sign=-1.0), new, KV_HEADS)

    def process_tokens(tokens, mask):
        return segments(tokens.tolist())

    return types.SimpleNamespace(
        layerwise_model=types.SimpleNamespace(vllm_model=model, lmc_attn_layers=[FullAttention()] * LAYERS,
                                              fused_rotary_emb=rerotate),
        common_metadata=types.SimpleNamespace(check_layers=[check_layer], recomp_ratios=[ratio]),
        cache_engine=types.SimpleNamespace(token_database=types.SimpleNamespace(process_tokens=process_tokens),
                                           storage_manager=host))


def store(tokens=256):
    return st.ChunkStore(LAYERS, KV_HEADS * D, tokens, DTYPE, DEVICE, page=4)


def run_fast(model, host, ids, ratio, chunk_store=None, settings=GPU_BLEND):
    """Blend `ids` with the fast path; the paged caches it wrote, as [layers, T, kv_dim] K and V."""
    caches = [torch.full((len(ids) + 8, 2, KV_HEADS, D), float("nan"), dtype=DTYPE, device=DEVICE)
              for _ in range(LAYERS)]
    slots = torch.arange(len(ids), device=DEVICE) + 8 - 3  # any slots; written where vLLM says
    fast = bl.FastBlender(blender(model, host, ratio), chunk_store or store(), settings)
    assert fast.blend(ids, None, caches, slots)
    kv = torch.stack([c[slots] for c in caches])  # [layers, T, 2, kv_heads, D]
    return kv[:, :, 0].flatten(2), kv[:, :, 1].flatten(2)


SYS, CHUNK_A, CHUNK_B, QUESTION = [1, 2, 3, 4, 5], list(range(10, 27)), list(range(30, 41)), [7, 8, 9]


def test_nothing_moved_gives_the_full_prefill_at_any_ratio():
    """Chunk at the positions it was cached at: the cached KV is right, blending must keep it so
    (a wrong mask, re-rotation or write-back shows here)."""
    model, host = make_model(), Host()
    ids = SYS + list(SEP) + CHUNK_A
    precompute(model, host, ids)
    want_k, want_v = full_prefill(model, ids)
    for ratio in (0.05, 0.3, 1.0):
        k, v = run_fast(model, host, ids, ratio)
        close(k, want_k)
        close(v, want_v)


def test_ratio_one_is_a_full_prefill_when_chunks_move():
    model, host = make_model(), Host()
    precompute(model, host, SYS + list(SEP) + CHUNK_A)
    precompute(model, host, SYS + list(SEP) + CHUNK_B)
    ids = SYS + list(SEP) + CHUNK_B + list(SEP) + CHUNK_A  # reordered: A moved, B never cached here
    want_k, want_v = full_prefill(model, ids)
    k, v = run_fast(model, host, ids, 1.0)
    close(k, want_k)
    close(v, want_v)
    # a low ratio repairs part of it: nearer the full prefill than the cached KV, farther than 1.0
    k_low, _ = run_fast(model, host, ids, 0.3)
    assert 0 < (k_low[-1] - want_k[-1]).norm() < 1e3


def test_the_question_segment_and_separators_are_recomputed():
    """Tokens with no cached KV (separators, an uncached tail) are computed at every layer."""
    model, host = make_model(), Host()
    precompute(model, host, SYS + list(SEP) + CHUNK_A)
    ids = SYS + list(SEP) + CHUNK_A + list(SEP) + QUESTION  # QUESTION: no cache entry
    want_k, _ = full_prefill(model, ids)
    k, _ = run_fast(model, host, ids, 0.05)
    close(k, want_k)  # nothing moved, the tail computed exactly


def test_a_bucket_serves_prompts_one_after_another(caplog):
    """Prompts of one bucket share the tail's buffers (on the GPU: one CUDA graph, replayed): the
    second prompt must see nothing of the first, and padding must change nothing."""
    model, host = make_model(), Host()
    precompute(model, host, SYS + list(SEP) + CHUNK_A)
    precompute(model, host, SYS + list(SEP) + CHUNK_B)
    fast = bl.FastBlender(blender(model, host, 1.0), store(), GpuBlendSettings(timing=True))
    caches = [torch.empty(64, 2, KV_HEADS, D, dtype=DTYPE, device=DEVICE)
              for _ in range(LAYERS)]  # vLLM's: for good
    for ids in (SYS + list(SEP) + CHUNK_A + list(SEP) + CHUNK_B,
                SYS + list(SEP) + CHUNK_B + list(SEP) + CHUNK_A + list(SEP) + QUESTION):
        for c in caches:
            c.fill_(float("nan"))
        slots = torch.arange(len(ids), device=DEVICE) + 2
        with caplog.at_level(logging.INFO, logger="vllm.kvblend_plugin"):
            assert fast.blend(ids, None, caches, slots)
        want_k, want_v = full_prefill(model, ids)
        kv = torch.stack([c[slots] for c in caches])
        close(kv[:, :, 0].flatten(2), want_k)
        close(kv[:, :, 1].flatten(2), want_v)
    assert len(fast.tails.kept) == 1  # both prompts in one bucket
    # on the GPU a prompt's times are logged when the next one starts, and the second one replays
    assert caplog.text.count("fast blend timing: ") == (2 if DEVICE == "cpu" else 1)
    assert "tail eager" in caplog.text
    assert (next(iter(fast.tails.kept.values())).graph is not None) == (DEVICE == "cuda")


def test_long_prompts_run_unbucketed(monkeypatch):
    """Past GRAPH_MAX_TOKENS the tail runs eagerly on buffers of the prompt's own size."""
    monkeypatch.setattr(bl, "GRAPH_MAX_TOKENS", 10)
    model, host = make_model(), Host()
    precompute(model, host, SYS + list(SEP) + CHUNK_A)
    precompute(model, host, SYS + list(SEP) + CHUNK_B)
    ids = SYS + list(SEP) + CHUNK_B + list(SEP) + CHUNK_A
    want_k, want_v = full_prefill(model, ids)
    k, v = run_fast(model, host, ids, 1.0)
    close(k, want_k)
    close(v, want_v)


def test_buckets_are_few_and_pad_little():
    sizes = {gr.bucket(n) for n in range(1, 40000)}
    assert len(sizes) < 80 and all(s % mk.BLOCK == 0 for s in sizes)
    for n in (1, 127, 128, 129, 1000, 1025, 8006, 8300, 32768, 33000):
        assert n <= gr.bucket(n) <= max(128, n * 1.125 + 128)


def test_chunks_are_read_from_the_host_once_then_served_from_the_store():
    model, host = make_model(), Host()
    precompute(model, host, SYS + list(SEP) + CHUNK_A)
    s = store()
    ids = SYS + list(SEP) + CHUNK_A
    run_fast(model, host, ids, 0.15, s)
    gets = host.gets
    assert gets == 2 * LAYERS and all(o.refs == 0 for o in host.objs.values())  # handed back
    run_fast(model, host, ids, 0.15, s)
    assert host.gets == gets  # the second prompt never touched the host store


def test_store_evicts_least_recently_used_never_the_prompts_own():
    s = st.ChunkStore(1, 2, 12, torch.float32, "cpu", page=4)  # 3 pages
    a = s.allocate("a", 4)
    assert s.allocate("b", 5) is not None and len(s.free) == 0  # b takes 2 pages
    assert s.rows("a").tolist() == a.tolist()  # a used: now b is the oldest
    c = s.allocate("c", 3, keep={"a", "c"})
    assert c is not None and s.rows("b") is None and s.rows("a") is not None
    assert s.allocate("d", 8, keep={"a", "c"}) is None  # cannot fit without its own chunks: None
    assert s.rows("a") is not None and s.rows("c") is not None  # and nothing was lost
    rows = s.allocate("e", 9)
    assert rows is not None and len(set(rows.tolist())) == 9 and s.rows("a") is None


def test_cached_rows_are_the_stored_rows_in_the_asked_order():
    s = st.ChunkStore(2, 3, 8, torch.float32, "cpu", page=4)
    s.kv.copy_(torch.arange(s.kv.numel(), dtype=torch.float32).view_as(s.kv))
    index = torch.tensor([5, 0, 7, 5])
    for layer in (0, 1):
        assert torch.equal(torch.stack([s.cached(layer, 0, index), s.cached(layer, 1, index)]),
                           s.kv[layer][:, index])


def test_fast_blend_says_no_without_hits_and_with_no_room():
    model, host = make_model(), Host()
    ids = SYS + list(SEP) + CHUNK_A
    caches = [torch.zeros(len(ids), 2, KV_HEADS, D, dtype=DTYPE, device=DEVICE) for _ in range(LAYERS)]
    fast = bl.FastBlender(blender(model, host, 0.15), store())
    assert not fast.blend(ids, None, caches, torch.arange(len(ids), device=DEVICE))  # nothing precomputed
    precompute(model, host, ids)
    tiny = bl.FastBlender(blender(model, host, 0.15), store(tokens=8))
    assert not tiny.blend(ids, None, caches, torch.arange(len(ids), device=DEVICE))  # 22 tokens: no room


@pytest.mark.parametrize("n_keys,picked", [(300, [0, 1, 2, 127, 128, 200, 299]),
                                           (1000, sorted(set(torch.randint(0, 1000, (400,)).tolist())))])
def test_block_lists_are_exact(n_keys, picked):
    """Every key block a q-block may see is listed (full or partial); a full one is wholly visible."""
    positions = torch.tensor(picked)
    lists = mk.exact_causal_blocks(positions, n_keys, block=16)
    kv_num, kv_idx, full_num, full_idx = (t[0, 0] for t in lists)
    for qb in range(kv_num.numel()):
        rows = positions[qb * 16:(qb + 1) * 16]
        full = set(full_idx[qb, :full_num[qb]].tolist())
        partial = set(kv_idx[qb, :kv_num[qb]].tolist())
        assert not full & partial
        for kb in range(math.ceil(n_keys / 16)):
            keys = torch.arange(kb * 16, min((kb + 1) * 16, n_keys))
            visible = keys[None, :] <= rows[:, None]
            if kb in full:
                assert visible.all()
            elif visible.any():
                assert kb in partial


def test_exact_mask_attention_matches_causal_rows():
    torch.manual_seed(1)
    n = 300
    q, k, v = (torch.randn(n, h, D, dtype=DTYPE) for h in (HEADS, KV_HEADS, KV_HEADS))
    picked = torch.tensor(sorted(set(torch.randint(0, n, (150,)).tolist()) | {0, n - 1}))
    out = at.attend_selected(q[picked], k, v, mk.exact_causal_mask(picked, n), D ** -0.5)
    close(out, causal(q, k, v)[picked])


@pytest.mark.parametrize("page", [at.ONE_PAGE, 16])
def test_split_attention_matches_causal_rows(page):
    """prefix_attention flash(16): each q-block's prefix keys apart (FlashAttention on the
    GPU, its plain-PyTorch twin here), the rest through FlexAttention, merged by log-sum-exp: the
    same rows as the one exact mask, also for a q-block with no prefix; refilled in place for new
    positions (as a CUDA graph replays it), the mask equals a new one."""
    torch.manual_seed(2)
    n = 700
    q, k, v = (torch.randn(n, h, D, dtype=DTYPE) for h in (HEADS, KV_HEADS, KV_HEADS))
    picked = torch.sort(torch.randperm(n)[:256]).values
    mask = mk.exact_causal_mask(picked, n, page)
    assert mask.prefix[0] == 0 < mask.prefix[1] and mask.cu_q.tolist() == [0, 128, 256]
    assert mask.page == (16 if page == 16 else 688)
    close(at.attend_selected(q[picked], k, v, mask, D ** -0.5), causal(q, k, v)[picked])
    other = torch.sort(torch.randperm(n)[:256]).values
    picked.copy_(other)  # as Tail.fill: the positions in place, then the mask
    mk.refill_mask(mask, picked, n)
    fresh = mk.exact_causal_mask(other, n, page)
    assert torch.equal(mask.prefix, fresh.prefix)
    assert torch.equal(mask.diagonal.kv_indices, fresh.diagonal.kv_indices)
    close(at.attend_selected(q[other], k, v, mask, D ** -0.5), causal(q, k, v)[other])


def test_prefix_attention_is_chosen_by_name():
    assert at.prefix_split("auto") == (at.ONE_PAGE, at.SPLIT_MIN_KEYS)  # long prompts only
    assert at.prefix_split("flex") == (0, 0)
    assert at.prefix_split("flash16") == (16, 0)
    assert at.prefix_split("flash") == (at.ONE_PAGE, 0)


@pytest.mark.parametrize("name", ["flash", "flash16", "auto"])
def test_split_attention_blends_long_prompts_as_a_full_prefill(monkeypatch, name):
    """The fast path with prefix_attention set, on prompts of several q-blocks (chunks moved,
    ratio 1.0, one prompt bucketed and one run unbucketed): still a full prefill, and the prefix did
    go through attend_prefix (`auto` from 300 keys here, so that this prompt is long enough)."""
    monkeypatch.setitem(at.PREFIX_CHOICES, "auto", (at.ONE_PAGE, 300))
    calls, attend_prefix = [], at.attend_prefix
    monkeypatch.setattr(at, "attend_prefix", lambda *a: calls.append(1) or attend_prefix(*a))
    model, host = make_model(), Host()
    long_a, long_b = CHUNK_A * 12, CHUNK_B * 15  # 204 and 165 tokens
    precompute(model, host, SYS + list(SEP) + long_a)
    precompute(model, host, SYS + list(SEP) + long_b)
    ids = SYS + list(SEP) + long_b + list(SEP) + long_a + list(SEP) + QUESTION
    want_k, want_v = full_prefill(model, ids)
    for graph_max in (bl.GRAPH_MAX_TOKENS, 10):
        monkeypatch.setattr(bl, "GRAPH_MAX_TOKENS", graph_max)
        k, v = run_fast(model, host, ids, 1.0, store(tokens=512), GpuBlendSettings(prefix_attention=name))
        close(k, want_k)
        close(v, want_v)
    assert calls


def test_store_that_does_not_fit_says_what_to_change():
    st.check_store_fits(4, 0.4, 140e9, 15e9)  # 56 GB share, 15 GB model: fits
    with pytest.raises(RuntimeError, match="Lower --gpu-kv-store-gb .* or raise --gpu-memory-utilization"):
        st.check_store_fits(40, 0.4, 140e9, 15e9)


def test_selected_attention_on_views_of_wider_rows():
    """The tail passes q/k/v as views into one qkv row: the masked answer all the same."""
    n, n_sel = 40, 9
    torch.manual_seed(0)
    qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * D, dtype=DTYPE)
    q, k, v = (t.view(n, -1, D) for t in qkv.split([HEADS * D, KV_HEADS * D, KV_HEADS * D], dim=1))
    sel = torch.sort(torch.randperm(n)[:n_sel]).values
    out = at.attend_selected(q[sel], k, v, mk.exact_causal_mask(sel, n), D ** -0.5, {})
    close(out, causal(q, k, v)[sel])


def test_plugin_falls_back_to_lmcache_when_the_fast_path_cannot(monkeypatch, caplog):
    calls = []

    def original(self, tokens, mask=None, **kwargs):
        calls.append("lmcache")

    class Fast:
        def __init__(self, *a):
            pass

        def blend(self, tokens, mask, kvcaches, slot_mapping):
            calls.append("fast")
            if tokens == "boom":
                raise RuntimeError("boom")
            return tokens == "fits"

    monkeypatch.setattr(bl, "FastBlender", Fast)
    path = FastPath(store=object())
    blend = bl.wrap_blend(original, path)
    lmc = types.SimpleNamespace()
    blend(lmc, "fits", None, kvcaches=[], slot_mapping=None)
    with caplog.at_level(logging.INFO, logger="vllm.kvblend_plugin"):
        blend(lmc, "no room", None, kvcaches=[], slot_mapping=None)
    assert calls == ["fast", "fast", "lmcache"] and "(fallback 1 of this engine)" in caplog.text
    fast = lmc._kvblend_fast
    with caplog.at_level(logging.ERROR, logger="vllm.kvblend_plugin"):
        blend(lmc, "boom", None, kvcaches=[], slot_mapping=None)  # e.g. a transient OOM
    assert "fast blend path failed" in caplog.text and "(failure 1, fallback 2 of this engine)" in caplog.text
    assert calls[-2:] == ["fast", "lmcache"] and (path.fallbacks, path.failures) == (2, 1)
    calls.clear()
    blend(lmc, "fits", None, kvcaches=[], slot_mapping=None)
    blend(lmc, "fits", None, kvcaches=[], slot_mapping=None)
    assert calls == ["fast", "fast"]  # that prompt fell back alone: the fast path stays on
    assert lmc._kvblend_fast is not fast  # with a new blender (fresh buffers and graphs)
    path.store = None  # no store: LMCache's blender, not counted
    blend(lmc, "fits", None, kvcaches=[], slot_mapping=None)
    assert calls[-1] == "lmcache" and path.fallbacks == 2


def quantized_model():
    """A vLLM model whose qkv_proj has no `weight` (AWQ/GPTQ keep qweight, scales, zeros)."""
    attn = types.SimpleNamespace(num_kv_heads=KV_HEADS, head_size=D)
    qkv = types.SimpleNamespace(qweight=torch.zeros(4, dtype=torch.int32))
    layer = types.SimpleNamespace(self_attn=types.SimpleNamespace(attn=attn, qkv_proj=qkv))
    return types.SimpleNamespace(model=types.SimpleNamespace(layers=[layer] * LAYERS))


@pytest.mark.parametrize("model_config,dtype", [
    (types.SimpleNamespace(dtype=torch.bfloat16), torch.bfloat16),
    (types.SimpleNamespace(dtype="auto", hf_config=types.SimpleNamespace(torch_dtype="float16")),
     torch.float16),
    (types.SimpleNamespace(dtype=None, hf_config=types.SimpleNamespace(torch_dtype=torch.bfloat16)),
     torch.bfloat16),
])
def test_the_store_takes_its_dtype_from_the_model_config(monkeypatch, model_config, dtype):
    """Not from qkv_proj.weight: quantized layers have none (AWQ, GPTQ) or an fp8 one."""
    card = types.SimpleNamespace(total_memory=80e9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    runner = types.SimpleNamespace(model_memory_usage=int(4e9))
    worker = types.SimpleNamespace(cache_config=types.SimpleNamespace(gpu_memory_utilization=0.9),
                                   vllm_config=types.SimpleNamespace(model_config=model_config),
                                   device=torch.device("cpu"), model_runner=runner)
    chunk_store = st.make_store(worker, quantized_model(), 0.001)
    assert chunk_store.kv.dtype == dtype and chunk_store.kv.shape[0] == LAYERS
    assert chunk_store.kv.shape[-1] == KV_HEADS * D and runner.model_memory_usage == int(4e9) + int(1e6)


def test_a_model_config_without_a_float_dtype_says_what_to_pass():
    fp8 = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=torch.float8_e4m3fn))
    with pytest.raises(RuntimeError, match="--dtype bfloat16"):
        st.model_dtype(fp8)
    unknown = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype="auto", hf_config=None))
    with pytest.raises(RuntimeError, match="cannot tell"):
        st.model_dtype(unknown)


class Storage:
    """LMCache's storage manager as the lookup sees it: which (chunk, layer) keys it holds."""

    def __init__(self, held):
        self.held, self.contains, self.pinned, self.touched = set(held), 0, [], 0

    def batched_contains(self, keys, search_range, pin):
        self.contains += 1
        n = next((i for i, k in enumerate(keys) if k not in self.held), len(keys))
        if pin and n:
            self.pinned += keys[:n]
        return n, ({"LocalCPUBackend": keys[:n]} if n else {})

    def batched_unpin(self, keys, locations):
        for k in keys:
            self.pinned.remove(k)

    def touch_cache(self):
        self.touched += 1


def lookup_engine(held):
    """LMCacheEngine as its lookup uses it (layer-wise, blending)."""
    return types.SimpleNamespace(
        use_layerwise=True, num_layers=LAYERS, retrieve_locations=None, is_healthy=lambda: True,
        token_database=types.SimpleNamespace(
            process_tokens=lambda tokens, request_configs=None: segments(list(tokens))),
        storage_manager=Storage(held),
        lookup_pins=collections.defaultdict(lambda: collections.defaultdict(list)),
        stats_monitor=types.SimpleNamespace(on_lookup_request=int, on_lookup_finished=lambda *a: None))


def test_lookup_answers_chunks_on_the_gpu_without_asking_lmcache():
    ids = SYS + list(SEP) + CHUNK_A + list(SEP) + CHUNK_B + list(SEP) + QUESTION
    sys_key, a_key, b_key, q_key = [key for _, _, key in segments(ids)]
    chunk_store = store()
    for key, n in ((a_key, len(CHUNK_A)), (b_key, len(CHUNK_B))):
        chunk_store.allocate(key, n)
    path = FastPath(store=chunk_store)
    lookup = store_first_lookup(lambda *a: "lmcache's own", path)
    engine = lookup_engine(sys_key.split_layers(LAYERS))  # the system prompt on the host only

    end_of_b = len(ids) - len(SEP) - len(QUESTION)
    assert lookup(engine, ids, lookup_id="r1", pin=True) == end_of_b  # the question: not cached
    storage = engine.storage_manager
    assert storage.contains == 2  # the system prompt (hit) and the question (miss), never A or B
    assert storage.pinned == sys_key.split_layers(LAYERS)  # pinned for the load, as LMCache pins
    assert engine.lookup_pins["r1"]["LocalCPUBackend"] == sys_key.split_layers(LAYERS)
    assert storage.touched == 1

    storage.held = {(q_key, 0)}  # a chunk with some layers on the host: a miss, nothing left pinned
    storage.pinned.clear()
    assert lookup(engine, list(QUESTION) + list(SEP) + CHUNK_A, lookup_id="r2", pin=True) == 0
    assert storage.pinned == [] and "r2" not in engine.lookup_pins

    path.store = store(tokens=len(CHUNK_A))  # the prompt cannot fit
    assert lookup(engine, ids, lookup_id="r3", pin=True) == "lmcache's own"  # LMCache's blender: pins
    path.store = None  # no GPU store: LMCache's lookup
    assert lookup(engine, ids, lookup_id="r4", pin=True) == "lmcache's own"
