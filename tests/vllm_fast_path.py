"""The fast path's pass (helpers/gpu/fast: FastBlender) over vLLM 0.26's own model classes, on the
CPU, for every tiny checkpoint (scripts/tiny_checkpoints.py): run by tests/test_against_vllm.py in a
process of its own (vLLM never enters pytest's), which asserts on the numbers it prints.

vLLM builds each checkpoint as it serves it (LlamaForCausalLM for Llama-2, Llama-3.1, linear scaling
and Mistral served as Llama; Qwen2ForCausalLM with its qkv bias; Qwen3ForCausalLM with its q/k
norms), in float32, its layers running their PyTorch forward (scripts/upstream_python.py: use_on_cpu).
What vLLM or LMCache do in kernels is faked as tests/test_fast_blend.py fakes it: the paged-cache
write (a flat [slots, 2, kv_heads, head_dim] tensor), LMCache's host store and token database, and
its full-attention layers (PyTorch's causal attention). The per-model `_process_qkv` the fast path
calls is LMCache 0.5.3's own (Qwen3's q/k norm per head), from its layer-wise model of the class.

Chunks are precomputed as the launcher does (system prompt, separator, chunk: each segment's K/V at
its positions), with the K/V of transformers' float32 full prefill. Per checkpoint, the largest
error of the paged K and V the pass writes, relative to the largest value, against transformers'
full prefill of the same ids:
  same_pos    the chunk where it was cached, ratio 0.15: the cached K/V is right and must stay so
  ratio_1     two chunks reordered, ratio 1.0: everything past the check layer recomputed
  no_qk_norm  ratio_1 without LMCache's q/k norm (the negative control: wrong for Qwen3 only)
And the two moved checks of the conformance suite (helpers/conformance.py: moved_r0, moved_r0.15)
on one QA prompt of the corpus (4 chunks in the chat template, each segment cached alone from
position 0, as the reference caches them): the next token's top-20 KL of the fast path to the CPU
reference's blend (`conformance.Reference`), and whether the first tokens agree. The fast path's
next token is what vLLM computes after the blend: the last token over the paged K/V (transformers'
forward of that token here). The negative control (Llama-3.1 only): moved_r0 with the re-rotation
LMCache builds (vLLM's rotary embedding without the RoPE scaling, scripts/vllm_export.py).

    python -m tests.vllm_fast_path          # prints one JSON object
"""

from __future__ import annotations

import functools
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_checkpoints as tc  # noqa: E402
import upstream_python  # noqa: E402

from tests.test_fast_blend import SEP, Host, HostObj, segments  # noqa: E402

SYS, CHUNK_A, CHUNK_B = [1, 2, 3, 4, 5], list(range(100, 160)), list(range(200, 240))
CHECK_LAYER = 1


def vllm_model(path: Path, architecture: str | None):
    """vLLM's model of the checkpoint at `path` (served as `architecture`), float32, weights loaded."""
    from safetensors.torch import load_file
    from vllm.config import CompilationConfig, DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading

    overrides = {"architectures": [architecture]} if architecture else {}
    model_config = ModelConfig(model=str(path), dtype="float32", enforce_eager=True, max_model_len=4096,
                               hf_overrides=overrides)
    config = VllmConfig(model_config=model_config, device_config=DeviceConfig(device="cpu"),
                        compilation_config=CompilationConfig(custom_ops=["none"]))
    with set_current_vllm_config(config):
        model = initialize_model(vllm_config=config)
        model.load_weights(load_file(path / "model.safetensors").items())
        process_weights_after_loading(model, model_config, torch.device("cpu"))
    for layer in model.model.layers:  # the paged-cache write, in PyTorch
        layer.self_attn.attn.impl = PagedWrite(layer.self_attn.attn.impl.scale)
    return model.eval()


def hf_kv(hf, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' K (rotated) and V of a float32 full prefill: [layers, T, kv_heads * head_dim]."""
    with torch.no_grad():
        cache = hf(torch.tensor([ids]), use_cache=True).past_key_values
    ks = torch.stack([layer.keys[0].transpose(0, 1).flatten(1) for layer in cache.layers])
    vs = torch.stack([layer.values[0].transpose(0, 1).flatten(1) for layer in cache.layers])
    return ks, vs


def precompute(hf, host, ids):
    """What the launcher's precompute leaves in LMCache: each segment's K/V at its positions."""
    ks, vs = hf_kv(hf, ids)
    for s, e, key in segments(ids):
        for layer in range(ks.shape[0]):
            kv = torch.stack([ks[layer, s:e], vs[layer, s:e]])
            host.objs[(key, layer)] = HostObj(kv, torch.arange(s, e))


class PagedWrite:
    """vLLM's attention impl as far as the fast path uses it: its scale, and the paged-cache write
    (a flat [slots, 2, kv_heads, head_dim] cache here)."""

    def __init__(self, scale):
        self.scale = scale

    @staticmethod
    def do_kv_cache_update(layer, key, value, kv_cache, slot_mapping):
        kv_cache[slot_mapping] = torch.stack([key, value], dim=1)


class FullAttention:
    """LMCache's full-attention layer (layers up to the check layer): causal, grouped KV heads."""

    def init_attn_metadata(self, input_ids):
        return None

    def forward_contiguous(self, q, k, v, out, meta):
        rep = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
                                           v.repeat_interleave(rep, 1).transpose(0, 1), is_causal=True)
        out.copy_(o.transpose(0, 1))
        return out


def lmcache_process_qkv(model):
    """LMCache's `_process_qkv` for vLLM's model class: that of the layer-wise model its
    `infer_model_from_vllm` picks by the class name (lmcache/v1/compute/models/utils.py)."""
    from lmcache.v1.compute.models.llama import LMCLlamaModel
    from lmcache.v1.compute.models.qwen3 import LMCQwen3Model

    layerwise = {"LlamaForCausalLM": LMCLlamaModel, "Qwen2ForCausalLM": LMCLlamaModel,
                 "Qwen3ForCausalLM": LMCQwen3Model}[type(model).__name__]
    return functools.partial(layerwise._process_qkv, None)  # it reads the layer only


def blend(model, host, ids, ratio, process_qkv, check_layer=CHECK_LAYER, cut=segments, rerotate=None):
    """The paged K and V ([layers, T, kv_dim]) FastBlender writes for `ids` (`cut`: LMCache's token
    database; `rerotate`: another re-rotation than the served model's)."""
    from helpers.gpu.fast import blender as bl
    from helpers.gpu.fast import store as st

    layers = model.model.layers
    attn = layers[0].self_attn.attn
    kv_heads, d = attn.num_kv_heads, attn.head_size
    layerwise = types.SimpleNamespace(vllm_model=model, lmc_attn_layers=[FullAttention()] * len(layers))
    if process_qkv is not None:
        layerwise._process_qkv = process_qkv
    database = types.SimpleNamespace(process_tokens=lambda tokens, mask: cut(tokens.tolist()))
    lmc = types.SimpleNamespace(
        layerwise_model=layerwise,
        common_metadata=types.SimpleNamespace(check_layers=[check_layer], recomp_ratios=[ratio]),
        cache_engine=types.SimpleNamespace(token_database=database, storage_manager=host))
    store = st.ChunkStore(len(layers), kv_heads * d, len(ids) + 256, torch.float32, "cpu", page=16)
    caches = [torch.full((len(ids) + 8, 2, kv_heads, d), float("nan")) for _ in layers]
    slots = torch.arange(len(ids)) + 5
    fast = bl.FastBlender(lmc, store)
    if rerotate is not None:
        fast.rerotate = rerotate
    assert fast.blend(ids, None, caches, slots)
    kv = torch.stack([c[slots] for c in caches])
    return kv[:, :, 0].flatten(2), kv[:, :, 1].flatten(2)


def next_token(hf, ids, k, v) -> torch.Tensor:
    """Logits of the token after `ids`: its last token computed over the paged K/V of the others."""
    from transformers import DynamicCache

    cache = DynamicCache()
    kv_heads = hf.config.num_key_value_heads
    for layer in range(k.shape[0]):
        cache.update(*(t[layer, :-1].view(len(ids) - 1, kv_heads, -1).transpose(0, 1)[None] for t in (k, v)),
                     layer)
    with torch.no_grad():
        out = hf(torch.tensor([ids[-1:]]), past_key_values=cache, position_ids=torch.tensor([[len(ids) - 1]]))
    return out.logits[0, -1]


def moved(arch: str, path: Path, model, hf, qkv) -> dict:
    """The conformance suite's moved checks: the fast path against the CPU reference's blend."""
    from helpers import conformance as cf
    from helpers.metrics import topk_kl
    from tests.test_fast_blend import Key

    ref = cf.Reference(path)
    p = next(p for p in cf.prompts(ref.tok, n_same=0, n_moved=1, n_far=0) if p.check == "moved_r0.15")

    def cut(ids):  # LMCache's SegmentTokenDatabase at the tokenizer's separator
        return [(s, e, Key(ids[s:e])) for s, e in cf.split_at(ids, ref.sep) if e > s]

    host = Host()
    for s, e, key in cut(p.ids)[:-1]:  # each segment cached alone, at 0..n-1
        ks, vs = hf_kv(hf, p.ids[s:e])
        for layer in range(ks.shape[0]):
            host.objs[(key, layer)] = HostObj(torch.stack([ks[layer], vs[layer]]), torch.arange(e - s))
    out = {"tokens": len(p.ids)}
    runs = [(check, None) for check in ("moved_r0", "moved_r0.15")]
    if arch == "llama31":
        runs.append(("negative_control_moved_r0", lmcache_rerotation(model)))
    for name, rerotate in runs:
        ratio, layer = cf.CHECKS[name.removeprefix("negative_control_")]
        want = cf.top_logprobs(ref.blend(p.ids, ratio, layer))
        k, v = blend(model, host, p.ids, ratio, qkv, layer, cut, rerotate)
        got = cf.top_logprobs(next_token(hf, p.ids, k, v))
        agree = want["token"] == got["token"]
        out[name] = {"kl": topk_kl(want["top"], got["top"]), "first_token_agrees": agree}
    return out


def lmcache_rerotation(model):
    """LMCache 0.5.3's re-rotation for this model (its rotary embedding rebuilt without the scaling)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm_export import lmcache_rope

    from helpers.gpu.rope import Rerotate

    with set_current_vllm_config(VllmConfig()):
        return Rerotate(lmcache_rope(model.model.layers[0].self_attn.rotary_emb))


def error(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def check(arch: str, folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from helpers.gpu import launch

    path = tc.write(arch, folder)
    config = json.loads((path / "config.json").read_text())
    model = vllm_model(path, launch.served_architecture(config, arch))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    qkv = lmcache_process_qkv(model)
    out = {"served_as": type(model).__name__}
    host = Host()
    one = SYS + list(SEP) + CHUNK_A
    precompute(hf, host, one)
    k, v = blend(model, host, one, 0.15, qkv)
    want_k, want_v = hf_kv(hf, one)
    out["same_pos"] = max(error(k, want_k), error(v, want_v))
    precompute(hf, host, SYS + list(SEP) + CHUNK_B)
    two = SYS + list(SEP) + CHUNK_B + list(SEP) + CHUNK_A  # A moved, B where it was cached
    want_k, want_v = hf_kv(hf, two)
    for name, process in (("ratio_1", qkv), ("no_qk_norm", None)):
        k, v = blend(model, host, two, 1.0, process)
        out[name] = max(error(k, want_k), error(v, want_v))
    out.update(moved(arch, path, model, hf, qkv))
    return out


def main() -> None:
    import tempfile

    upstream_python.use_on_cpu(lmcache=True)
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method="tcp://127.0.0.1:0")
        initialize_model_parallel(1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {arch: check(arch, Path(tmp)) for arch in tc.ARCHS}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
