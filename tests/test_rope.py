"""helpers/gpu/rope.py on CPU: cached K re-rotated with the served model's cos|sin cache lands where
transformers' own rotary embedding puts it, for every rope type the GPU path accepts (llama3,
linear and YaRN included), and a rope type it cannot move is refused, by name. vLLM is not
installed here: its RotaryEmbedding is faked by its interface (head_size, rotary_dim,
is_neox_style, cos_sin_cache [max_pos, rot_dim] with cos then sin), filled from transformers."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

from helpers.gpu import rope

D, KV = 128, 2
ROPES = {  # vLLM's class for each, the parameters of the tiny checkpoints (scripts/tiny_checkpoints.py)
    "default": ("RotaryEmbedding", {"rope_type": "default", "rope_theta": 10000.0}),
    "linear": ("LinearScalingRotaryEmbedding", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3": ("Llama3RotaryEmbedding", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}),
    "yarn": ("YaRNScalingRotaryEmbedding", {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 8192}),
}
MAX_POS = 32768


def hf_cos_sin(params: dict, positions: torch.Tensor):
    """transformers' cos, sin [t, D] (attention factor included) for these RoPE parameters."""
    config = LlamaConfig(hidden_size=D * 4, num_attention_heads=4, num_key_value_heads=KV, head_dim=D,
                         max_position_embeddings=MAX_POS, rope_parameters=dict(params))
    emb = LlamaRotaryEmbedding(config)
    cos, sin = emb(torch.empty(0, dtype=torch.float32), positions[None])
    return cos[0], sin[0]


def fake_vllm_rotary(kind: str, params: dict | None = None, neox: bool = True):
    """An object with vLLM's RotaryEmbedding interface whose cache is transformers' cos|sin."""
    name, p = ROPES[kind]
    cos, sin = hf_cos_sin(params or p, torch.arange(MAX_POS))
    cls = type(name, (), {})
    emb = cls()
    emb.head_size = emb.rotary_dim = D
    emb.is_neox_style = neox
    emb.cos_sin_cache = torch.cat([cos[:, : D // 2], sin[:, : D // 2]], dim=-1)
    return emb


def hf_rotate(k: torch.Tensor, params: dict, positions: torch.Tensor) -> torch.Tensor:
    """k [t, KV*D] rotated at positions by transformers (neox style: rotate_half)."""
    cos, sin = hf_cos_sin(params, positions)
    k = k.view(-1, KV, D)
    return (k * cos[:, None] + rotate_half(k) * sin[:, None]).reshape(len(positions), -1)


def moved(n=64, shift=16000):
    old = torch.arange(n)
    return old, old + shift


@pytest.mark.parametrize("kind", list(ROPES))
@pytest.mark.parametrize("shift", [300, 4000, 16000])
def test_rerotation_equals_rotating_at_the_new_positions(kind, shift):
    params = ROPES[kind][1]
    torch.manual_seed(0)
    k = torch.randn(64, KV * D)
    old, new = moved(64, shift)
    cached = hf_rotate(k, params, old)
    turned = rope.Rerotate(fake_vllm_rotary(kind))(old, new, cached.clone())
    torch.testing.assert_close(turned, hf_rotate(k, params, new), atol=2e-4, rtol=2e-4)
    assert rope.check_rope({"rope_parameters": params}) == kind


def test_gptj_style_interleaved_pairs():
    emb = fake_vllm_rotary("llama3", neox=False)
    torch.manual_seed(1)
    k = torch.randn(8, KV * D)
    old, new = moved(8, 5000)
    cache = rope.rotation_cache(emb)

    def interleaved(x, pos):
        c, s = cache[pos, : D // 2][:, None], cache[pos, D // 2:][:, None]
        x = x.view(-1, KV, D).clone()
        a, b = x[..., 0::2].clone(), x[..., 1::2].clone()
        x[..., 0::2], x[..., 1::2] = a * c - b * s, b * c + a * s
        return x.reshape(len(pos), -1)

    torch.testing.assert_close(rope.Rerotate(emb)(old, new, interleaved(k, old)), interleaved(k, new),
                               atol=2e-4, rtol=2e-4)


def test_yarn_attention_factor_is_kept_not_squared():
    """YaRN's cos/sin carry mscale: undo-then-apply with the raw cache would scale K by mscale**2."""
    emb = fake_vllm_rotary("yarn")
    mscale = float(emb.cos_sin_cache[0, 0])
    assert mscale == pytest.approx(0.1 * math.log(4.0) + 1, rel=1e-6)
    cache = rope.rotation_cache(emb)
    half = D // 2
    assert torch.allclose(cache[:, :half] ** 2 + cache[:, half:] ** 2, torch.ones(MAX_POS, half), atol=1e-5)


def angle_errors(shift: int) -> torch.Tensor:
    """Per frequency pair: how far (radians, wrapped to [0, pi]) unscaled re-rotation (LMCache's
    fused_rotary_emb, built with rope_scaling=None) turns a Llama-3.1 key from where it belongs."""
    p = ROPES["llama3"][1]
    cos, sin = hf_cos_sin(p, torch.tensor([shift]))
    right = torch.atan2(sin[0, : D // 2], cos[0, : D // 2])
    inv = 1.0 / (p["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    wrong = float(shift) * inv
    return (torch.remainder(right.double() - wrong + math.pi, 2 * math.pi) - math.pi).abs()


def test_negative_control_unscaled_rerotation_of_llama31_is_wrong():
    """What LMCache does to a Llama-3.1 key: the check above must fail for it, and does."""
    p = ROPES["llama3"][1]
    unscaled = fake_vllm_rotary("default", {"rope_type": "default", "rope_theta": p["rope_theta"]})
    torch.manual_seed(0)
    k = torch.randn(64, KV * D)
    for shift in (4000, 16000):
        old, new = moved(64, shift)
        turned = rope.Rerotate(unscaled)(old, new, hf_rotate(k, p, old))
        err = float((turned - hf_rotate(k, p, new)).abs().max())
        a = angle_errors(shift)
        print(f"llama3 moved by {shift}: max |K error| {err:.3f}, pairs off by > 0.5 rad "
              f"{int((a > 0.5).sum())} of {D // 2}, max angle error {float(a.max()):.2f} rad")
        assert err > 1.0 and int((a > 0.5).sum()) >= 10
        with pytest.raises(AssertionError):
            torch.testing.assert_close(turned, hf_rotate(k, p, new), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("config, named", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 10000.0}, "dynamic"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}, "longrope"),
    ({"rope_parameters": {"rope_type": "deepseek_yarn", "factor": 4.0}}, "deepseek_yarn"),
    ({"rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24]}}, "M-RoPE"),
    ({"rope_parameters": {"rope_type": "default"}, "partial_rotary_factor": 0.5}, "partial rotary"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "default"}}}, "per attention type"),
])
def test_refused_rope_types_are_named(config, named):
    with pytest.raises(rope.UnsupportedRope, match=named):
        rope.check_rope(config)


def test_accepted_configs_old_and_new_style():
    assert rope.check_rope({}) == "default"
    assert rope.check_rope({"rope_scaling": {"type": "linear", "factor": 2.0}}) == "linear"
    assert rope.check_rope(LlamaConfig(rope_parameters=ROPES["llama3"][1])) == "llama3"
    assert rope.check_rope({"rope_scaling": None, "rope_theta": 1e6}) == "default"


def test_unknown_rotary_class_is_refused():
    emb = fake_vllm_rotary("default")
    emb.__class__ = type("DynamicNTKScalingRotaryEmbedding", (), {})
    with pytest.raises(rope.UnsupportedRope, match="DynamicNTKScalingRotaryEmbedding"):
        rope.Rerotate(emb)
    emb = fake_vllm_rotary("default")
    emb.rotary_dim = D // 2
    with pytest.raises(rope.UnsupportedRope, match="partial"):
        rope.Rerotate(emb)


def test_mended_blender_re_rotates_with_the_served_rope():
    """The fixed path: LMCache's layer-wise model gets our re-rotation instead of its unscaled one."""
    import types

    from helpers.gpu import mended

    class LMCBaseModel:
        def __init__(self, vllm_model, blender, enable_sparse=False):
            self.fused_rotary_emb = "lmcache's, unscaled"

    init = mended.served_rope(LMCBaseModel.__init__)
    emb = fake_vllm_rotary("llama3")
    layer = types.SimpleNamespace(self_attn=types.SimpleNamespace(rotary_emb=emb))
    model = types.SimpleNamespace(model=types.SimpleNamespace(layers=[layer]))
    lmc = LMCBaseModel.__new__(LMCBaseModel)
    init(lmc, model, None)
    assert isinstance(lmc.fused_rotary_emb, rope.Rerotate) and init._kvblend
    torch.manual_seed(2)
    k = torch.randn(4, KV * D)
    old, new = moved(4, 9000)
    p = ROPES["llama3"][1]
    torch.testing.assert_close(lmc.fused_rotary_emb(old, new, hf_rotate(k, p, old)), hf_rotate(k, p, new),
                               atol=2e-4, rtol=2e-4)


def test_launcher_refuses_a_rope_blending_cannot_move():
    from helpers.gpu import launch
    from helpers.runtime import EngineError

    llama31 = {"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert launch.served_architecture(llama31, "m") is None
    dynamic = {"architectures": ["LlamaForCausalLM"], "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.raises(EngineError, match="some/model: rope_type 'dynamic' is not supported"):
        launch.served_architecture(dynamic, "some/model")
