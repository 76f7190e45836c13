"""helpers/gpu/plugin.py, kv_transfer.py and mended.py on CPU: the 4-D KV gather/scatter against a
reference written in LMCache's 5-D semantics (both directions, both layouts, both buffer orders,
padding slots, strided caches), the stand-in for lmcache.c_ops, when the plugin activates, and what
register() patches (with fake vLLM/LMCache modules: neither is installed here)."""

import logging
import sys
import types
from enum import IntEnum

import pytest
import torch

from helpers.gpu import kv_transfer as kt
from helpers.gpu import mended
from helpers.gpu import plugin as vp
from helpers.gpu.fast.blender import deviation
from helpers.selection import select_tokens
from helpers.settings import BLEND_PATHS, GpuBlendSettings

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
NB, BS, NH, HS = 6, 16, 4, 8  # blocks, block size, KV heads, head size


def use(monkeypatch, **fields):
    """The blend engine's settings, as the launcher passes them to vLLM's processes."""
    monkeypatch.setenv(*GpuBlendSettings(**fields).to_env().popitem())


def mended_qkv(blender_class) -> dict | None:
    """The keywords our process_qkv is bound with on LMCache's blender class (None: not ours)."""
    method = vars(blender_class)["process_qkv"]
    return method.keywords if getattr(method, "func", None) is mended.process_qkv else None


def five_d(paged, layout):
    """The same storage seen as LMCache's flash-attention layout [2, NB, BS, NH, HS] (a view)."""
    split = paged.unflatten(-1, (2, paged.shape[-1] // 2))
    return split.permute(3, 0, 1, 2, 4) if layout == "NB_BS_NH_CS" else split.permute(3, 0, 2, 1, 4)


def reference(lmc, paged, slots, layout, to_paged, token_major):
    """LMCache's semantics, token by token: lmc[kv, i] <-> kv_cache[kv, slot // BS, slot % BS]."""
    five = five_d(paged, layout)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        b, o = divmod(s, five.shape[2])
        for kv in range(2):
            at = (i, kv) if token_major else (kv, i)
            if to_paged:
                five[kv, b, o] = lmc[at].reshape(five.shape[3], five.shape[4])
            else:
                lmc[at] = five[kv, b, o].reshape(-1)


def make_paged(layout, device, dtype, strided):
    shape = (NB, BS, NH, 2 * HS) if layout == "NB_BS_NH_CS" else (NB, NH, BS, 2 * HS)
    if not strided:
        return torch.randn(shape, device=device).to(dtype)
    # a view with padded rows and every other block, like a layer cut out of a larger pool
    big = torch.randn(2 * NB, *shape[1:3], 2 * HS + 8, device=device).to(dtype)
    return big[::2, :, :, 3:3 + 2 * HS]


def make_slots(n, device):
    g = torch.Generator().manual_seed(n)
    slots = torch.randperm(NB * BS, generator=g)[:n]
    slots[::5] = -1  # padding tokens are skipped
    return slots.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["NB_BS_NH_CS", "NB_NH_BS_CS"])
@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_matches_reference(device, layout, token_major, strided, dtype):
    n = 37
    paged = make_paged(layout, device, dtype, strided)
    slots = make_slots(n, device)
    shape = (n, 2, NH * HS) if token_major else (2, n, NH * HS)
    got = torch.full(shape, 7.0, device=device, dtype=dtype)
    want = got.clone()
    before = paged.clone()
    kt.paged_kv_transfer(got, paged, slots, layout, to_paged=False, token_major=token_major)
    reference(want, paged, slots.cpu(), layout, False, token_major)
    assert torch.equal(got, want)
    assert torch.equal(paged, before)  # reading leaves the cache alone
    assert (got == 7.0).any()  # padding rows were not written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["NB_BS_NH_CS", "NB_NH_BS_CS"])
@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_matches_reference(device, layout, token_major, strided, dtype):
    n = 41
    slots = make_slots(n, device)
    shape = (n, 2, NH * HS) if token_major else (2, n, NH * HS)
    lmc = torch.randn(shape, device=device).to(dtype)
    got = make_paged(layout, device, dtype, strided)
    want = got.clone()
    kt.paged_kv_transfer(lmc, got, slots, layout, to_paged=True, token_major=token_major)
    reference(lmc, want, slots.cpu(), layout, True, token_major)
    assert torch.equal(got, want)


def test_round_trip_and_edge_cases():
    paged = make_paged("NB_BS_NH_CS", "cpu", torch.float32, False)
    slots = torch.tensor([5, 17, 95, 0])
    lmc = torch.randn(2, 4, NH * HS)
    kt.paged_kv_transfer(lmc, paged, slots, "NB_BS_NH_CS", to_paged=True)
    back = torch.zeros_like(lmc)
    kt.paged_kv_transfer(back, paged, slots, "NB_BS_NH_CS", to_paged=False)
    assert torch.equal(back, lmc)
    # K sits in the first half of the last axis, V in the second (vLLM 0.26's packing)
    assert torch.equal(paged[1, 1, :, :HS].reshape(-1), lmc[0, 1])
    assert torch.equal(paged[1, 1, :, HS:].reshape(-1), lmc[1, 1])
    untouched = paged.clone()
    kt.paged_kv_transfer(lmc, paged, torch.full((4,), -1), "NB_BS_NH_CS", to_paged=True)
    assert torch.equal(paged, untouched)  # all padding: nothing to do
    with pytest.raises(ValueError, match="unknown layout"):
        kt.paged_kv_transfer(lmc, paged, slots, "TWO_NB_BS_NH_HS", to_paged=True)


# ------------------------------------------------------------------ the c_ops stand-in
class FakeFormat(IntEnum):  # the values of LMCache 0.5.3's EngineKVFormat
    NL_X_TWO_NB_BS_NH_HS = 1
    NL_X_NB_NH_BS_CS = 12
    NL_X_NB_BS_NH_CS = 13


class FakeDirection(IntEnum):
    H2D = 0
    D2H = 1


def fake_ops():
    calls = []

    def single_layer_kv_transfer(*args, **kwargs):
        calls.append((args, kwargs))

    ops = types.SimpleNamespace(EngineKVFormat=FakeFormat, TransferDirection=FakeDirection,
                                single_layer_kv_transfer=single_layer_kv_transfer, other_op="kept")
    return ops, calls


def test_ops_stand_in_routes_4d_layouts_to_pytorch():
    ops, calls = fake_ops()
    wrapped = kt.KVTransferOps(ops)
    assert wrapped.other_op == "kept" and wrapped.EngineKVFormat is FakeFormat
    paged = make_paged("NB_NH_BS_CS", "cpu", torch.float32, False)
    slots = make_slots(9, "cpu")
    lmc = torch.randn(2, 9, NH * HS)
    want = paged.clone()
    reference(lmc, want, slots, "NB_NH_BS_CS", True, False)
    wrapped.single_layer_kv_transfer(lmc, paged, slots, FakeDirection.H2D, FakeFormat.NL_X_NB_NH_BS_CS,
                                     token_major=False)
    assert torch.equal(paged, want) and calls == []
    out = torch.zeros(2, 9, NH * HS)
    wrapped.single_layer_kv_transfer(out, paged, slots, FakeDirection.D2H, FakeFormat.NL_X_NB_NH_BS_CS)
    ref = torch.zeros_like(out)
    reference(ref, paged, slots, "NB_NH_BS_CS", False, False)
    assert torch.equal(out, ref) and calls == []


def test_ops_stand_in_leaves_other_layouts_to_lmcache():
    ops, calls = fake_ops()
    wrapped = kt.KVTransferOps(ops)
    five = torch.zeros(2, NB, BS, NH, HS)
    wrapped.single_layer_kv_transfer("lmc", five, "slots", FakeDirection.D2H,
                                     FakeFormat.NL_X_TWO_NB_BS_NH_HS, token_major=True)
    assert calls == [(("lmc", five, "slots", FakeDirection.D2H, FakeFormat.NL_X_TWO_NB_BS_NH_HS),
                      {"token_major": True})]


# ------------------------------------------------------------------ activation
def write_yaml(tmp_path, text):
    p = tmp_path / "lmcache.yaml"
    p.write_text(text)
    return str(p)


def test_blending_enabled(tmp_path):
    assert not vp.blending_enabled({})
    assert not vp.blending_enabled({"LMCACHE_CONFIG_FILE": ""})
    assert not vp.blending_enabled({"LMCACHE_CONFIG_FILE": str(tmp_path / "missing.yaml")})
    on = write_yaml(tmp_path, "chunk_size: 256\nenable_blending: true  # CacheBlend\n")
    assert vp.blending_enabled({"LMCACHE_CONFIG_FILE": on})
    off = write_yaml(tmp_path, "chunk_size: 256\nenable_blending: false\n")
    assert not vp.blending_enabled({"LMCACHE_CONFIG_FILE": off})
    assert vp.blending_enabled({"LMCACHE_ENABLE_BLENDING": "True"})


def vllm_config(tp=1, pp=1, prefix_caching=False, eager=True, budget=4096, context=4096, rope=None,
                arch="LlamaForCausalLM"):
    """vLLM's config as the worker holds it (`Worker.vllm_config`), as our launcher starts it."""
    ns = types.SimpleNamespace
    hf = {"rope_theta": 10000.0, **({"rope_scaling": rope} if rope else {})}
    return ns(parallel_config=ns(tensor_parallel_size=tp, pipeline_parallel_size=pp),
              model_config=ns(enforce_eager=eager, max_model_len=context, dtype=torch.bfloat16, hf_config=hf,
                              architecture=arch),
              cache_config=ns(enable_prefix_caching=prefix_caching),
              scheduler_config=ns(max_num_batched_tokens=budget))


@pytest.fixture
def fake_stack(monkeypatch):
    """Just enough of vLLM and LMCache, as modules, for register() to patch (the tested pair)."""
    registered = []
    monkeypatch.setattr(vp, "installed_version", {"vllm": "0.26.0", "lmcache": "0.5.3"}.get)
    monkeypatch.delenv("KVBLEND_SKIP_VERSION_CHECK", raising=False)

    class Runner:
        def get_model(self):
            return "the-model"

    class Worker:
        def __init__(self, config=None):
            self.model_runner = Runner()
            self.vllm_config = config or vllm_config()

        def load_model(self, *, load_dummy_weights=False):
            return ("loaded", load_dummy_weights)

    class Tracker:
        @classmethod
        def register_model(cls, name, model):
            registered.append((name, model))

    class Blender:
        def process_qkv(self, *args):
            return "upstream"

        def blend(self, tokens, mask=None, **kwargs):
            return "lmcache"

    class FlashBackend:
        def forward_contiguous(self, *args, **kwargs):
            return "flash"

    class Engine:
        def lookup(self, tokens=None, *args, **kwargs):
            return 0

    class BaseModel:
        def __init__(self, vllm_model, blender, enable_sparse=False):
            self.fused_rotary_emb = "lmcache's, unscaled"

    ops, _ = fake_ops()
    modules = {
        "vllm": {}, "vllm.v1": {}, "vllm.v1.worker": {}, "vllm.v1.worker.gpu_worker": {"Worker": Worker},
        "lmcache": {}, "lmcache.integration": {}, "lmcache.integration.vllm": {},
        "lmcache.integration.vllm.utils": {"ENGINE_NAME": "vllm-instance"},
        "lmcache.integration.vllm.vllm_v1_adapter": {"extract_request_configs": lambda sampling_params: None},
        "lmcache.v1": {}, "lmcache.v1.compute": {}, "lmcache.v1.compute.models": {},
        "lmcache.v1.compute.models.utils": {"VLLMModelTracker": Tracker},
        "lmcache.v1.compute.models.base": {"LMCBaseModel": BaseModel},
        "lmcache.v1.gpu_connector": {}, "lmcache.v1.gpu_connector.gpu_connectors": {"lmc_ops": ops},
        "lmcache.v1.compute.blend": {}, "lmcache.v1.compute.blend.blender": {"LMCBlender": Blender},
        "lmcache.v1.compute.attention": {},
        "lmcache.v1.compute.attention.flash_attn": {"LMCFlashAttnBackend": FlashBackend},
        "lmcache.v1.cache_engine": {"LMCacheEngine": Engine},
    }
    for name, attrs in modules.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
    return types.SimpleNamespace(Worker=Worker, registered=registered, ops=ops, Blender=Blender,
                                 BaseModel=BaseModel,
                                 FlashBackend=FlashBackend, Engine=Engine,
                                 connectors=sys.modules["lmcache.v1.gpu_connector.gpu_connectors"])


def test_register_patches_when_blending(fake_stack, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", write_yaml(tmp_path, "enable_blending: true\n"))
    use(monkeypatch, path="fixed")  # no GPU chunk store to build here
    vp.register()
    vp.register()  # vLLM may call it again: nothing is wrapped twice
    assert fake_stack.Worker().load_model(load_dummy_weights=True) == ("loaded", True)
    assert fake_stack.registered == [("vllm-instance", "the-model")]
    ops = fake_stack.connectors.lmc_ops
    assert isinstance(ops, kt.KVTransferOps) and ops._ops is fake_stack.ops


def test_the_fast_path_is_the_default(fake_stack, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", write_yaml(tmp_path, "enable_blending: true\n"))
    monkeypatch.delenv(GpuBlendSettings.ENV, raising=False)
    assert GpuBlendSettings.from_env().path == BLEND_PATHS[0] == "fast"
    vp.register()
    assert fake_stack.Blender.blend._kvblend  # LMCache's blend goes through the fast path first
    assert mended_qkv(fake_stack.Blender)  # and falls back to the mended blender
    assert fake_stack.Engine.lookup._kvblend  # chunks on the GPU are looked up there


def test_lmcache_lookup_kept_on_request(fake_stack, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", write_yaml(tmp_path, "enable_blending: true\n"))
    use(monkeypatch, lookup=False)  # the A/B engine of scripts/bench_ttft.py
    vp.register()
    assert fake_stack.Blender.blend._kvblend and not hasattr(fake_stack.Engine.lookup, "_kvblend")


def test_double_unpin_warning_only_once(fake_stack, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", write_yaml(tmp_path, "enable_blending: true\n"))
    lmcache_log = logging.getLogger("lmcache.v1.memory_management")
    monkeypatch.setattr(lmcache_log, "filters", [])
    vp.register()
    vp.register()
    assert len(lmcache_log.filters) == 1
    with caplog.at_level(logging.WARNING, logger="lmcache.v1.memory_management"):
        for i in range(3):
            lmcache_log.warning("Pin count of MemoryObj %d is negative: -1.Double unpin occurred.", i)
        lmcache_log.warning("something else")
    assert [r.getMessage()[:26] for r in caplog.records] == ["Pin count of MemoryObj 0 i", "something else"]
    assert lmcache_log.filters[0].dropped == 3


def test_register_does_nothing_without_blending(fake_stack, monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    monkeypatch.delenv("LMCACHE_ENABLE_BLENDING", raising=False)
    original = fake_stack.Worker.load_model
    vp.register()
    assert fake_stack.Worker.load_model is original
    assert fake_stack.connectors.lmc_ops is fake_stack.ops


def test_register_without_vllm_only_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", write_yaml(tmp_path, "enable_blending: true\n"))
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="vllm.kvblend_plugin"):
        vp.register()
    assert "kvblend plugin inactive" in caplog.text


# ------------------------------------------------------------------ never down, never wrong
def blend_on(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", write_yaml(tmp_path, "enable_blending: true\n"))


def test_a_moved_upstream_symbol_cannot_take_vllm_down(fake_stack, tmp_path, monkeypatch, caplog):
    """LMCache 0.5.6 moved `gpu_connectors.lmc_ops`: register() must return (vLLM's plugin loader
    lets its exceptions through), log one line, and the blend engine stop when its model loads."""
    monkeypatch.delattr(fake_stack.connectors, "lmc_ops")
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    plain = fake_stack.Worker.load_model
    vp.register()  # a plain engine: nothing patched, nothing said
    assert fake_stack.Worker.load_model is plain
    blend_on(tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO, logger="vllm.kvblend_plugin"):
        vp.register()  # returns
    refused = [r for r in caplog.records if "blending refused" in r.getMessage()]
    assert len(refused) == 1 and "AttributeError" in refused[0].getMessage()
    assert "lmc_ops" in refused[0].getMessage() and "plugin active" not in caplog.text
    with pytest.raises(vp.BlendRefused, match="AttributeError"):
        fake_stack.Worker().load_model()  # never LMCache's blender unpatched


def test_an_untested_pair_refuses_blending_unless_asked(fake_stack, tmp_path, monkeypatch, caplog):
    blend_on(tmp_path, monkeypatch)
    use(monkeypatch, path="fixed")
    monkeypatch.setattr(vp, "installed_version", {"vllm": "0.33.0", "lmcache": "0.5.6"}.get)
    with caplog.at_level(logging.ERROR, logger="vllm.kvblend_plugin"):
        vp.register()
    assert "vllm 0.33.0, lmcache 0.5.6" in caplog.text and "KVBLEND_SKIP_VERSION_CHECK=1" in caplog.text
    assert not isinstance(fake_stack.connectors.lmc_ops, kt.KVTransferOps)  # nothing patched
    with pytest.raises(vp.BlendRefused, match="'vllm==0.26.0' 'lmcache==0.5.3'"):
        fake_stack.Worker().load_model()
    monkeypatch.setenv("KVBLEND_SKIP_VERSION_CHECK", "1")  # tried anyway: the patches apply
    vp.register()
    assert isinstance(fake_stack.connectors.lmc_ops, kt.KVTransferOps)


def test_register_never_raises(fake_stack, tmp_path, monkeypatch, caplog):
    """A bad setting, any failure while patching, an unreadable config: a log line, no exception."""
    blend_on(tmp_path, monkeypatch)
    monkeypatch.setenv(GpuBlendSettings.ENV, '{"path": "bogus"}')
    vp.register()
    with pytest.raises(vp.BlendRefused, match="path must be one of fast, fixed, upstream"):
        fake_stack.Worker().load_model()  # the engine stops, saying what is allowed
    monkeypatch.setattr(vp, "_patch", lambda: 1 / 0)
    vp.register()
    monkeypatch.setattr(vp, "blending_enabled", lambda: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="vllm.kvblend_plugin"):
        vp.register()
    assert "cannot read LMCache's config (ZeroDivisionError" in caplog.text


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (4, 2)])
def test_parallel_engines_are_refused_at_load(fake_stack, tmp_path, monkeypatch, tp, pp):
    blend_on(tmp_path, monkeypatch)
    use(monkeypatch, path="fixed")
    vp.register()
    with pytest.raises(vp.BlendRefused, match=f"--tensor-parallel-size {tp} --pipeline-parallel-size {pp}.*"
                                              "one GPU per engine"):
        fake_stack.Worker(vllm_config(tp=tp, pp=pp)).load_model()
    assert fake_stack.registered == []  # refused before the model loads
    fake_stack.Worker(vllm_config()).load_model()
    assert fake_stack.registered == [("vllm-instance", "the-model")]


@pytest.mark.parametrize("config,says", [
    (vllm_config(prefix_caching=True), "--no-enable-prefix-caching"),
    (vllm_config(eager=False), "--enforce-eager"),
    (vllm_config(budget=2048, context=32768), "--max-num-batched-tokens 2048 is below --max-model-len 32768"),
    (types.SimpleNamespace(**vars(vllm_config()), kv_transfer_config=types.SimpleNamespace(
        kv_connector_extra_config={"use_native": True})), '"use_native": true; drop it'),
])
def test_unrun_serving_settings_are_refused_at_load(fake_stack, tmp_path, monkeypatch, config, says):
    """What a hand-started `vllm serve` gets by default."""
    blend_on(tmp_path, monkeypatch)
    use(monkeypatch, path="fixed")
    vp.register()
    with pytest.raises(vp.BlendRefused, match=says):
        fake_stack.Worker(config).load_model()
    assert fake_stack.registered == []


@pytest.mark.parametrize("rope, refused", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, None),
])
def test_a_rope_blending_cannot_move_is_refused_at_load(fake_stack, tmp_path, monkeypatch, rope, refused):
    """A served model's RoPE is checked before the model loads: one blending cannot re-rotate by a
    position delta (dynamic NTK) stops the engine, naming it; Llama-3's scaling loads."""
    loads_or_is_refused(fake_stack, tmp_path, monkeypatch, vllm_config(rope=rope), refused)


def loads_or_is_refused(fake_stack, tmp_path, monkeypatch, config, refused: str | None) -> None:
    """A blend engine's model loads (and is registered for LMCache) with `config`, or, if `refused`,
    stops at load with a message matching it, before the model is registered."""
    blend_on(tmp_path, monkeypatch)
    use(monkeypatch, path="fixed")
    vp.register()
    if refused:
        with pytest.raises(vp.BlendRefused, match=refused):
            fake_stack.Worker(config).load_model()
        assert fake_stack.registered == []
    else:
        fake_stack.Worker(config).load_model()
        assert fake_stack.registered == [("vllm-instance", "the-model")]


@pytest.mark.parametrize("arch, refused", [
    ("LlamaForCausalLM", None), ("Qwen2ForCausalLM", None), ("Qwen3ForCausalLM", None),
    ("MistralForCausalLM", "pass --hf-overrides '{\"architectures\": \\[\"LlamaForCausalLM\"\\]}'"),
    ("GemmaForCausalLM", "as GemmaForCausalLM; LMCache's blender computes only LlamaForCausalLM, "
                         "Qwen2ForCausalLM, Qwen3ForCausalLM"),
])
def test_a_model_class_lmcache_cannot_blend_is_refused_at_load(fake_stack, tmp_path, monkeypatch, arch,
                                                               refused):
    """A hand-started `vllm serve` of a Mistral checkpoint gets vLLM's MistralForCausalLM, which
    LMCache's blender looks up by name and has no model for: refused at load with the flag that
    serves it as Llama (the launcher passes it); a class LMCache cannot compute is named."""
    loads_or_is_refused(fake_stack, tmp_path, monkeypatch, vllm_config(arch=arch), refused)


def test_load_checks_take_more_checks(fake_stack, tmp_path, monkeypatch, caplog):
    """The hook a model check (such as the RoPE one) plugs into: its warnings logged, its
    exception stopping the engine."""
    blend_on(tmp_path, monkeypatch)
    use(monkeypatch, path="fixed")
    seen = []
    monkeypatch.setattr(vp, "LOAD_CHECKS", [*vp.LOAD_CHECKS, lambda c: seen.append(c) or ["heads up"]])
    vp.register()
    config = vllm_config()
    with caplog.at_level(logging.WARNING, logger="vllm.kvblend_plugin"):
        fake_stack.Worker(config).load_model()
    assert seen == [config] and "kvblend: heads up" in caplog.text

    def refuse(config):
        raise ValueError("rope_type yarn is not supported")

    vp.LOAD_CHECKS.append(refuse)
    with pytest.raises(ValueError, match="yarn"):
        fake_stack.Worker(config).load_model()


# ------------------------------------------------------------------ the mended blender
def test_register_mends_blender_unless_upstream(fake_stack, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", write_yaml(tmp_path, "enable_blending: true\n"))
    use(monkeypatch, path="upstream")
    vp.register()
    assert fake_stack.Blender.process_qkv(None) == "upstream"
    use(monkeypatch, path="fixed", deviation="v")
    vp.register()
    vp.register()
    assert mended_qkv(fake_stack.Blender) == {"deviation": "v"}
    forward = fake_stack.FlashBackend.forward_contiguous
    assert forward._kvblend and forward.__wrapped__(None) == "flash"  # wrapped once
    use(monkeypatch, path="fast")  # mended too (its fallback), blend wrapped once
    fake_stack.Blender.blend = lambda self, tokens, mask=None, **kw: "lmcache"
    vp.register()
    vp.register()
    assert fake_stack.Blender.blend._kvblend and fake_stack.Blender.blend.__wrapped__(None, []) == "lmcache"


def causal_attention(q, k, v):
    """Reference: full causal attention of [N, heads, d] with GQA, in float64."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    n = q.shape[0]
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_selected_attention_is_exact_causal_for_any_subset():
    """Recomputed tokens in the middle of the prompt must not see later tokens: the rows of full
    causal attention at the selected positions. (FlashAttention's end-aligned mask fails this.)"""
    torch.manual_seed(0)
    n, heads, kv_heads, d = 40, 6, 2, 8
    q, k, v = (torch.randn(n, h, d, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    want = causal_attention(q, k, v)
    selected = torch.tensor([0, 3, 4, 17, 25, 39])
    impl = types.SimpleNamespace(vllm_attn_impl=types.SimpleNamespace(scale=d ** -0.5))
    forward = mended.selected_attention(lambda *a, **kw: pytest.fail("flash path taken for a subset"))
    meta = types.SimpleNamespace(kvblend_query_positions=selected)
    out = torch.empty(len(selected), heads, d, dtype=torch.float64)
    forward(impl, q[selected], k, v, out, meta)
    torch.testing.assert_close(out, want[selected])
    # the block mask is built once per prompt and reused by the following layers
    assert meta.kvblend_block_mask is not None
    forward(impl, q[selected], k, v, out, meta)
    torch.testing.assert_close(out, want[selected])
    # end-aligned (what FlashAttention's causal mask does with fewer queries than keys) differs
    end_aligned = torch.arange(n)[None, :] <= (n - len(selected) + torch.arange(len(selected)))[:, None]
    assert not torch.equal(end_aligned, torch.arange(n)[None, :] <= selected[:, None])
    # all tokens selected: the original (flash) path, unchanged
    assert mended.selected_attention(lambda *a, **kw: "flash")(
        impl, q, k, v, None, types.SimpleNamespace(kvblend_query_positions=torch.arange(n))) == "flash"


def test_select_tokens_counts_cached_tokens_and_always_takes_gaps():
    old = torch.zeros(20, 4)
    new = torch.zeros(20, 4)
    new[[2, 5, 11]] = torch.tensor([[3.0], [1.0], [2.0]])  # the cached tokens that deviate most
    gaps = torch.tensor([7, 8, 19])  # separators / uncached: always recomputed
    dev = deviation(new, old)
    sel = select_tokens(dev, 0.15, gaps)  # ceil(0.15 * 17) = 3 cached tokens
    assert sel.tolist() == [2, 5, 7, 8, 11, 19]
    assert select_tokens(dev, 1.0, gaps).tolist() == list(range(20))
    assert select_tokens(dev, 0.01, None).tolist() == [2]  # any ratio > 0: at least one
    assert select_tokens(dev, 0.0, gaps).tolist() == [7, 8, 19]  # ratio 0: the uncached only


class FakeRotary:
    def __call__(self, positions, q, k):
        return q + positions[:, None], k + positions[:, None]


def fake_blender(n, check_layer=1, ratio=0.25, gaps=(3,)):
    """An LMCBlender-shaped object: per-layer buffers of retrieved K/V, like LMCache's connector."""
    buffers = {layer: (torch.full((n, 4), -1.0), torch.full((n, 4), -1.0)) for layer in range(4)}
    layer = types.SimpleNamespace(self_attn=types.SimpleNamespace(rotary_emb=FakeRotary()))
    return types.SimpleNamespace(
        gpu_connector=types.SimpleNamespace(get_kv=lambda i: buffers[i],
                                            current_gap_positions=torch.tensor(gaps)),
        metadata=types.SimpleNamespace(positions=None, imp_indices=None),
        common_metadata=types.SimpleNamespace(check_layers=[check_layer], recomp_ratios=[ratio]),
        layerwise_model=types.SimpleNamespace(
            vllm_model=types.SimpleNamespace(model=types.SimpleNamespace(layers=[layer] * 4)))), buffers


def test_process_qkv_writes_back_below_and_at_check_layer_then_only_selected():
    n = 9
    blender, buffers = fake_blender(n)
    meta = types.SimpleNamespace(update_from_top_indices=lambda idx: None)

    def step(layer_id, q, k, v, residual):
        return mended.process_qkv(blender, q, k, v, residual, layer_id, None, meta)

    # layer 0: every token computed, and its fresh (rotated) K and V reach the buffer vLLM receives
    q0, k0, v0 = torch.zeros(n, 4), torch.ones(n, 4), torch.full((n, 4), 2.0)
    _, k_out, _, _, _, _ = step(0, q0, k0, v0, torch.zeros(n, 4))
    assert torch.equal(buffers[0][0], k0 + torch.arange(n)[:, None])
    assert torch.equal(buffers[0][1], v0) and torch.equal(k_out, buffers[0][0])
    # check layer: cached token 6 deviates most; gap 3 always taken; ceil(0.25 * 8) = 2 cached tokens
    old_k = buffers[1][0]
    old_k.copy_(torch.arange(n)[:, None].float().expand(n, 4))  # retrieved K = fresh K ...
    old_k[6] += 5
    old_k[1] += 1  # ... except tokens 6 and 1
    q, k_all, _, residual, attn_out, _ = step(1, torch.zeros(n, 4), torch.zeros(n, 4), torch.zeros(n, 4),
                                              torch.arange(n).float()[:, None].expand(n, 4))
    assert blender.metadata.imp_indices.tolist() == [1, 3, 6]
    assert meta.kvblend_query_positions.tolist() == [1, 3, 6]
    assert q.shape[0] == 3 and residual[:, 0].tolist() == [1, 3, 6] and attn_out.shape[0] == 3
    assert torch.equal(buffers[1][0], torch.arange(n)[:, None].float().expand(n, 4))  # all fresh
    # deeper layer: only the selected rows are overwritten, the rest stays retrieved
    k2 = torch.full((3, 4), 7.0)
    step(2, torch.zeros(3, 4), k2, k2, torch.zeros(3, 4))
    rows = buffers[2][0][:, 0]
    assert rows[[1, 3, 6]].tolist() != [-1.0] * 3
    assert rows[[0, 2, 4, 5, 7, 8]].tolist() == [-1.0] * 6


def test_check_layer_deviation_on_k_or_v():
    """deviation "v" selects by the values, as the embedded engine does."""
    n = 6
    meta = types.SimpleNamespace(update_from_top_indices=lambda idx: None)
    picked = {}
    for dev, want in (("k", [3, 4]), ("v", [1, 3])):
        blender, buffers = fake_blender(n, ratio=0.2, gaps=(3,))
        blender.metadata.positions = torch.zeros(n, dtype=torch.long)  # no rotation: K as given
        buffers[1][0].zero_()
        buffers[1][1].zero_()
        k, v = torch.zeros(n, 4), torch.zeros(n, 4)
        k[4], v[1] = 9.0, 9.0
        mended.process_qkv(blender, torch.zeros(n, 4), k, v, torch.zeros(n, 4), 1, None, meta, deviation=dev)
        picked[dev] = blender.metadata.imp_indices.tolist()
        assert picked[dev] == want
    with pytest.raises(ValueError, match="deviation must be one of k, v"):
        GpuBlendSettings(deviation="q")
