"""Correctness of the embedded CacheBlend runner against a full prefill and against transformers."""

import math

import pytest
import torch

from helpers import corpus
from helpers.embedded.blend import ContextTooLong, ModelRunner
from helpers.embedded.kvstore import ChunkKVStore, chunk_key
from helpers.metrics import kl
from helpers.prompts import chat_segments
from helpers.selection import select_tokens
from helpers.settings import BlendSettings


@pytest.fixture(scope="module")
def runner(model):
    mdl, tok, path = model
    return ModelRunner(mdl, tok, ChunkKVStore(), model_id=str(path))


def segments_for(runner, names, question):
    return chat_segments(runner, [corpus.load_chunk(n) for n in names], question)


@pytest.fixture(scope="module")
def prompt(runner):
    """Three short chunks in one order (cached) and then reordered: the reordered prompt is the
    one blended, so every chunk sits at a position it was never computed at."""
    names = sorted(corpus.load_manifest(), key=lambda m: m["tokens"])[:3]
    names = [m["name"] for m in names]
    runner.blend_prefill(segments_for(runner, names, "What is this about?"))  # warms the store
    return segments_for(runner, names[::-1], "Which option is described first?")


def flat(segs):
    return [t for s in segs for t in s]


def test_full_prefill_matches_transformers(runner, prompt):
    ids = flat(prompt)
    with torch.inference_mode():
        ref = runner.model(torch.tensor([ids])).logits[0, -1]
    ours = runner.full_prefill(ids).logits
    assert torch.allclose(ours, ref, atol=2e-4, rtol=1e-4), (ours - ref).abs().max()


def test_ratio_one_equals_full_prefill(runner, prompt):
    full = runner.full_prefill(flat(prompt))
    blend = runner.blend_prefill(prompt, BlendSettings(ratio=1.0))
    assert blend.info["chunk_hits"] == len(prompt) - 1  # all chunks came from the store
    assert blend.info["n_recomputed"] == len(flat(prompt))
    assert torch.allclose(blend.logits, full.logits, atol=1e-5, rtol=0)
    for layer in (0, 1, 15, 29):  # the merged cache is the full prefill's cache
        assert torch.allclose(blend.k[layer], full.k[layer], atol=1e-5)
        assert torch.allclose(blend.v[layer], full.v[layer], atol=1e-5)


def test_rerotated_chunk_key_equals_key_computed_at_offset(runner, prompt):
    """Layer 0's K depends only on the token, so a chunk's cached pre-rotary K rotated to offset p
    must equal the K a full prefill computes at p, bit for bit up to float32 rounding."""
    full = runner.full_prefill(flat(prompt))
    p = len(prompt[0]) + len(prompt[1])
    seg = prompt[2]
    kv = runner.compute_chunk_kv(seg)
    rotated = runner.rerotate(kv[0, 0], p)
    assert torch.allclose(rotated, full.k[0][:, p:p + len(seg)], atol=1e-5, rtol=0)
    # and not trivially: at its original positions the same K differs
    assert not torch.allclose(runner.rerotate(kv[0, 0], 0), full.k[0][:, p:p + len(seg)], atol=1e-2)


def test_selection_counts(runner):
    dev = torch.tensor([0.0, 5.0, 1.0, 3.0, 2.0, 0.0, 0.0, 0.0])  # the last 3 uncached: ignored
    uncached = torch.arange(5, 8)
    sel = select_tokens(dev, 0.4, uncached)
    assert sel.tolist() == [1, 3, 5, 6, 7]  # top ceil(0.4 * 5) = 2 deviations + the 3 uncached
    assert select_tokens(dev, 0.0, uncached).tolist() == [5, 6, 7]
    assert select_tokens(dev, 0.01, uncached).tolist() == [1, 5, 6, 7]  # ratio > 0: at least one


def test_blend_recovers_what_full_reuse_loses(runner, prompt):
    full = runner.full_prefill(flat(prompt)).logits
    reuse = runner.blend_prefill(prompt, BlendSettings(ratio=0.0)).logits
    blend = runner.blend_prefill(prompt, BlendSettings(ratio=0.15), explain=True)
    n_cached = sum(len(s) for s in prompt[:-1])
    assert blend.info["n_recomputed"] == math.ceil(0.15 * n_cached) + len(prompt[-1])
    assert len(blend.info["deviation"]) == n_cached
    # the prefix segment sits at position 0 in both: its deviation is zero, it is never selected
    assert max(blend.info["deviation"][: len(prompt[0])]) < 1e-6
    assert kl(full, blend.logits) < kl(full, reuse)


def test_decode_after_blend_continues_like_transformers(runner, prompt):
    """With ratio 1 the merged cache is exact, so greedy decoding must reproduce transformers'
    generate() token for token; with ratio 0.15 the continuation must be fluent text too."""
    ids = flat(prompt)
    with torch.inference_mode():
        ref = runner.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    for ratio in (1.0, 0.15):
        state = runner.blend_prefill(prompt, BlendSettings(ratio=ratio), room=12)
        out = [int(state.logits.argmax())]
        while len(out) < 12:
            out.append(int(runner.decode_step(state, out[-1]).argmax()))
        if ratio == 1.0:
            assert out == ref.tolist()
        else:  # coherent: the exact model, reading the blended continuation, finds it likely
            with torch.inference_mode():
                logp = torch.log_softmax(runner.model(torch.tensor([ids + out])).logits[0].float(), -1)
            nll = -sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(out)) / len(out)
            assert nll < 2.5, (nll, runner.tok.decode(out))  # random text scores ~10 nats


def test_context_limit(runner):
    with pytest.raises(ContextTooLong, match="context is 8192"):
        runner.full_prefill([1] * 8000, room=500)


def test_store_evicts_to_its_byte_bound(tmp_path):
    one = torch.zeros(1000)  # 4000 bytes
    store = ChunkKVStore(max_bytes=10_000)
    for i in range(5):
        store.put(f"k{i}", one.clone())
        assert store.bytes <= 10_000
    st = store.stats()
    assert st["entries"] == 2 and st["evictions"] == 3
    assert store.get("k0") is None and store.get("k4") is not None  # least recently used went first
    assert store.stats()["hits"] == 1 and store.stats()["misses"] == 1


def test_store_lru_order_and_disk(tmp_path):
    store = ChunkKVStore(max_bytes=8_000, disk_dir=tmp_path)
    store.put("a", torch.ones(1000))
    store.put("b", torch.ones(1000) * 2)
    store.get("a")  # a is now the most recent
    store.put("c", torch.ones(1000) * 3)
    assert "b" not in store._mem and "a" in store._mem
    warm = ChunkKVStore(max_bytes=8_000, disk_dir=tmp_path)  # a restarted runner
    assert torch.equal(warm.get("b"), torch.ones(1000) * 2)
    assert warm.stats()["disk_hits"] == 1


def test_chunk_key_depends_on_model_and_ids():
    assert chunk_key("m", [1, 2, 3]) == chunk_key("m", [1, 2, 3])
    assert chunk_key("m", [1, 2, 3]) != chunk_key("m", [3, 2, 1])
    assert chunk_key("m", [1, 2, 3]) != chunk_key("other", [1, 2, 3])


def test_gap_study_replays_the_engines_blend(runner, prompt):
    """scripts/blend_gap_study.py replays the GPU's conditions with a blend function of its own: in
    the embedded engine's conditions (no separators, chunks computed alone) it must give the engine's
    logits, and with separators (gap rows, always recomputed) ratio 1.0 must be a full prefill."""
    from scripts.blend_gap_study import Conditions, blend

    cond = Conditions({"fp32": runner})
    ids, kv, gap = cond.layout("fp32", prompt, seps=False, ctx=False)
    assert ids == flat(prompt) and int(gap.sum()) == len(prompt[-1])
    for dev in "vk":
        want = runner.blend_prefill(prompt, BlendSettings(ratio=0.15, deviation=dev)).logits
        assert torch.equal(blend(runner, ids, kv, gap, 0.15, dev), want)
    ids, kv, gap = cond.layout("fp32", prompt, seps=True, ctx=True)
    assert int(gap.sum()) == (len(prompt) - 1) * len(cond.sep) + len(prompt[-1])
    full = runner.full_prefill(ids).logits
    assert torch.allclose(blend(runner, ids, kv, gap, 1.0, "k"), full, atol=1e-4, rtol=0)
    assert not torch.allclose(blend(runner, ids, kv, gap, 0.0, "k"), full, atol=1e-2, rtol=0)
