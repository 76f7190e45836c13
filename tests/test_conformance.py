"""Blending right for every architecture and RoPE variant the GPU path accepts, on the CPU reference
(helpers/conformance.py) over the tiny checkpoints of scripts/tiny_checkpoints.py.

Per checkpoint: nothing moves -> the blend is the full prefill; chunks moved -> the GPU path's
re-rotation (helpers/gpu/rope.py with the model's own cos|sin cache) puts cached K exactly where the
model's RoPE does, at 4K and 16K tokens too. The NEGATIVE CONTROL: the Llama-3.1 checkpoint
re-rotated with unscaled frequencies (LMCache's fused_rotary_emb) must fail, far above the bf16
floor. The GPU side of the same checks: tests/gpu/test_conformance.py."""

import re
import sys
from pathlib import Path

import pytest
import torch

from helpers import conformance as cf
from helpers.gpu import rope
from helpers.metrics import topk_kl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_checkpoints as tc  # noqa: E402

SHIFTS = (4000, 16000)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("arch", list(tc.ARCHS))
def test_gpu_rerotation_matches_each_checkpoints_rope(arch):
    """Every accepted checkpoint: check_rope passes it, and the GPU path's re-rotation with a
    vLLM-style cache of its RoPE moves K by 4K and 16K exactly as its own rotary embedding places it."""
    config, emb = tc.rotary_of(arch)
    assert rope.check_rope(config) == tc.rope_of(arch)["rope_type"]
    d = config.head_dim
    cos, sin = emb(torch.empty(0), torch.arange(40000)[None])
    fake = type("RotaryEmbedding", (), {"head_size": d, "rotary_dim": d, "is_neox_style": True})()
    fake.cos_sin_cache = torch.cat([cos[0, :, : d // 2], sin[0, :, : d // 2]], dim=-1)
    turn = rope.Rerotate(fake)
    torch.manual_seed(0)
    k = torch.randn(32, 2, d)
    old = torch.arange(32)

    def at(pos):
        half = torch.cat([-k[..., d // 2:], k[..., : d // 2]], dim=-1)
        return (k * cos[0, pos][:, None] + half * sin[0, pos][:, None]).reshape(32, -1)

    for shift in SHIFTS:
        torch.testing.assert_close(turn(old, old + shift, at(old).clone()), at(old + shift),
                                   atol=3e-4, rtol=3e-4)


@pytest.mark.parametrize("arch", list(tc.REFUSED))
def test_refused_checkpoints_are_named(arch):
    config, _ = tc.rotary_of(arch)
    with pytest.raises(rope.UnsupportedRope, match=tc.rope_of(arch)["rope_type"]):
        rope.check_rope(config)


# ------------------------------------------------------------------ on real weights of the checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def llama31(checkpoints):
    return cf.Reference(tc.write("llama31", checkpoints))


@pytest.mark.model  # SmolLM2's tokenizer, from the converted model
def test_checkpoints_are_deterministic(tmp_path):
    a = tc.write("qwen3", tmp_path / "a")
    b = tc.write("qwen3", tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    assert (a / "tokenizer.json").exists()


def nothing_moves(ref: cf.Reference) -> float:
    """KL of the blend (ratio 0.15) to the full prefill, one chunk where it was cached."""
    p = next(p for p in cf.prompts(ref.tok, n_same=1, n_moved=0, n_far=0) if p.check == "same_pos")
    full, blend = ref.full(p.ids), ref.blend(p.ids, *cf.CHECKS["same_pos"])
    torch.testing.assert_close(blend, full, atol=2e-4, rtol=1e-4)
    return topk_kl(cf.top_logprobs(full)["top"], cf.top_logprobs(blend)["top"])


def layer0_k_moved(ref: cf.Reference, shift: int) -> None:
    """The chunk's layer-0 K computed at its new positions (a full prefill of it, moved) equals its
    cached K turned there by the reference's re-rotation and by the GPU path's."""
    ids = ref.tok.encode("The overlay filter takes two inputs.", add_special_tokens=False)
    n = len(ids)
    k_pre = ref.segment_kv(ids)[0, 0]  # [kv, n, d], from positions 0..n-1
    ref.shift = shift
    try:
        moved = ref.runner.full_prefill(ids).k[0][:, :n]  # rotated at shift..shift+n-1
        torch.testing.assert_close(ref.runner.rerotate(k_pre, 0), moved)
    finally:
        ref.shift = 0
    old = torch.arange(n)
    turn = cf.rerotation(ref, rope.rotation_cache(cf.ServedRotary(ref)))
    again = ref.runner.rotate_k(turn(k_pre, old, old + shift)[None], *ref._rope(old + shift))[0]
    torch.testing.assert_close(again, moved, atol=2e-4, rtol=2e-4)


@pytest.mark.model  # SmolLM2's tokenizer, from the converted model
def test_llama31_nothing_moves_and_layer0_k_moves_exactly(llama31):
    assert nothing_moves(llama31) < 1e-6
    for shift in SHIFTS:
        layer0_k_moved(llama31, shift)


@pytest.mark.model  # SmolLM2's tokenizer, from the converted model
def test_negative_control_unscaled_rope_fails_on_llama31(llama31, checkpoints):
    """LMCache's re-rotation (plain frequencies) on Llama-3.1: the next-token distribution at ratio
    0 moves far beyond the bf16 floor; the GPU path's (the model's own cache) stays on the reference."""
    ref = llama31
    theta = tc.rope_of("llama31")["rope_theta"]
    wrong = cf.rerotation(ref, cf.unscaled_cache(theta, ref.runner.head_dim))
    right = cf.rerotation(ref, rope.rotation_cache(cf.ServedRotary(ref)))
    p = next(p for p in cf.prompts(ref.tok, n_same=0, n_moved=1, n_far=0) if p.check == "moved_r0")
    floor = topk_kl(cf.top_logprobs(ref.full(p.ids))["top"],
                    cf.top_logprobs(cf.Reference(checkpoints / "llama31", torch.bfloat16).full(p.ids))["top"])
    ratio, layer = cf.CHECKS["moved_r0"]
    wrong_kl = {}
    for shift in (0, *SHIFTS):
        exact = cf.top_logprobs(ref.blend(p.ids, ratio, layer, shift))
        served = cf.top_logprobs(ref.blend(p.ids, ratio, layer, shift, rerotate=right))
        lmcache = cf.top_logprobs(ref.blend(p.ids, ratio, layer, shift, rerotate=wrong))
        kl_served, kl_wrong = topk_kl(exact["top"], served["top"]), topk_kl(exact["top"], lmcache["top"])
        same = "same" if exact["token"] == lmcache["token"] else "differs"
        print(f"llama31, {len(p.ids)} tokens moved by +{shift}: top-20 KL to the reference, served RoPE "
              f"{kl_served:.6f}, unscaled {kl_wrong:.4f} (first token {same}); bf16 floor {floor:.5f}")
        assert kl_served < max(floor, 1e-4)
        assert kl_wrong > 20 * floor and kl_wrong > 0.05  # it must fail, and does
        wrong_kl[shift] = kl_wrong
    quoted = negative_control_quoted((ROOT / "docs" / "gpu.md").read_text())
    measured = (f"{wrong_kl[0]:.2f}", f"{wrong_kl[4000]:.2f}", f"{wrong_kl[16000]:.2f}", f"{floor:.4f}")
    assert quoted == measured, f"docs/gpu.md quotes {quoted}, this measures {measured}"


def negative_control_quoted(md: str) -> tuple[str, ...] | None:
    """docs/gpu.md's figures of this negative control: KL at ratio 0 unmoved, moved by 4K and by 16K
    tokens, and the bf16 floor."""
    m = re.search(r"negative control, is at top-20 KL (\d\.\d\d) at ratio 0 \((\d\.\d\d) moved by 4K tokens,"
                  r"\s+(\d\.\d\d) by 16K\) against a bf16 floor of (\d\.\d{4})", md)
    return m and m.groups()


def test_negative_control_quote_is_found_and_a_changed_one_differs():
    md = ("(LMCache's way), the negative control, is at top-20 KL 0.18 at ratio 0 (0.61 moved by 4K tokens,\n"
          "0.92 by 16K) against a bf16 floor of 0.0018.")
    assert negative_control_quoted(md) == ("0.18", "0.61", "0.92", "0.0018")
    assert negative_control_quoted(md.replace("0.61", "0.62")) != ("0.18", "0.61", "0.92", "0.0018")
    assert negative_control_quoted("no such sentence") is None


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("arch", list(tc.ARCHS))
def test_every_checkpoint_on_the_reference(arch, checkpoints):
    """Each checkpoint loaded through transformers in float32: nothing moves -> the full prefill;
    chunks moved, ratio 0 and 0.15: the GPU path's re-rotation gives the reference's answer."""
    ref = cf.Reference(tc.write(arch, checkpoints))
    nothing_moves(ref)
    layer0_k_moved(ref, 16000)
    served = cf.rerotation(ref, rope.rotation_cache(cf.ServedRotary(ref)))
    p = next(p for p in cf.prompts(ref.tok, n_same=0, n_moved=1, n_far=0) if p.check == "moved_r0")
    for check in ("moved_r0", "moved_r0.15"):
        ratio, layer = cf.CHECKS[check]
        exact = cf.top_logprobs(ref.blend(p.ids, ratio, layer))
        got = cf.top_logprobs(ref.blend(p.ids, ratio, layer, rerotate=served))
        assert topk_kl(exact["top"], got["top"]) < 1e-4 and exact["token"] == got["token"], check


@pytest.mark.slow
@pytest.mark.model
def test_device_harness_with_perfect_fake_engines(tmp_path, monkeypatch):
    """scripts/gpu_conformance.py's plumbing on the CPU: engines that answer exactly the reference
    pass every check; the negative control's rows (card CPU) fail; the CSV has every column."""
    import csv

    import gpu_conformance as gc

    from helpers import engines as eng
    from helpers.gpu import launch as gb
    from scripts import gpu_quality

    answers: dict = {}
    reference = gc.reference

    def remember(path, arch):
        prompts, refs, floor, negative = reference(path, arch)
        for p, a in zip(prompts, refs, strict=True):
            answers[(gc.engine_for(p.check), tuple(p.ids))] = a
        return prompts, refs, floor, negative

    monkeypatch.setattr(gc, "reference", remember)
    monkeypatch.setattr(gc, "WAVE", 1)
    launched = []
    monkeypatch.setattr(eng, "launch", lambda e: launched.append(e) or e)
    monkeypatch.setattr(eng, "wait_healthy", lambda engines, *a, **k: None)
    monkeypatch.setattr(eng, "stop_engine", lambda e: None)
    monkeypatch.setattr(gb, "precompute", lambda e, texts, progress=True: {})

    def first_token(client, url, model, ids, extra=None):
        engine = next(e for e in launched if e.url == url)
        return answers[(engine.name.rsplit("_", 1)[1], tuple(ids))]

    monkeypatch.setattr(gpu_quality, "first_token", first_token)
    rows = gc.device(tmp_path, ["llama31"])
    by = {r["check"]: r for r in rows}
    assert {e.name for e in launched} == {"conf_llama31_r0", "conf_llama31_r0.15"}
    zero = next(e for e in launched if e.name.endswith("_r0"))
    assert "blend_recompute_ratios: [0.0]" in Path(zero.env["LMCACHE_CONFIG_FILE"]).read_text()
    assert "blend_check_layers: [0]" in Path(zero.env["LMCACHE_CONFIG_FILE"]).read_text()
    for check in cf.CHECKS:
        assert by[check]["passed"] and by[check]["top20_kl"] == 0 and by[check]["first_token_agree"] == 1
    assert not by["negative_control_moved_r0"]["passed"] and by["negative_control_moved_r0"]["card"] == "CPU"
    print({k: (round(r["top20_kl"], 4), round(r["floor"], 5)) for k, r in by.items()})
    with open(tmp_path / "conformance.csv") as f:
        assert set(csv.DictReader(f).fieldnames) >= {"architecture", "rope_type", "check", "top20_kl",
                                                     "first_token_agree", "floor", "card", "date"}
