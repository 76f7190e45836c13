"""A blend engine stores a request's segments only when the request asks (`lmcache.save`), which
only our precompute does: a plain OpenAI client's question, computed in the context of other
chunks, must not become a cache entry. LMCache's connector is faked with its own reading of
`kv_transfer_params` (0.5.3's `extract_request_configs`) and its rule for skipping a save."""

import json
import sys
import types

import pytest

from helpers import runtime
from helpers.gpu import launch as gpu
from helpers.gpu import plugin as vp
from tests.test_gpu_backend import CharTokenizer
from tests.test_vllm_plugin import fake_stack  # noqa: F401  (the fixture: vLLM's and LMCache's modules)

# LMCache 0.5.3's lmcache/integration/vllm/vllm_v1_adapter.py: how a request's configs are read,
# and (ReqMeta.from_request_tracker) when its KV is saved; `saves` looks the first up by name, as
# RequestTracker.from_new_request does.
ADAPTER = '''
def extract_request_configs(sampling_params):
    request_configs = None
    if sampling_params and sampling_params.extra_args is not None:
        if kv_transfer_params := sampling_params.extra_args.get("kv_transfer_params"):
            for k, v in kv_transfer_params.items():
                if k.startswith("lmcache."):
                    if request_configs is None:
                        request_configs = {}
                    request_configs[k] = v
    return request_configs


def saves(sampling_params):
    request_configs = extract_request_configs(sampling_params)
    request_skip = (request_configs or {}).get("lmcache.skip_save", False)
    return not request_skip
'''


@pytest.fixture
def adapter():
    """LMCache's vllm_v1_adapter module, as far as saving goes."""
    mod = types.ModuleType("lmcache.integration.vllm.vllm_v1_adapter")
    exec(ADAPTER, mod.__dict__)
    return mod


def request(kv_transfer_params=None):
    """vLLM's SamplingParams as the connector sees them: kv_transfer_params in extra_args."""
    extra = None if kv_transfer_params is None else {"kv_transfer_params": kv_transfer_params}
    return types.SimpleNamespace(extra_args=extra)


def register_blend_engine(monkeypatch, tmp_path, adapter):
    monkeypatch.setitem(sys.modules, adapter.__name__, adapter)
    monkeypatch.setattr(sys.modules["lmcache.integration.vllm"], "vllm_v1_adapter", adapter, raising=False)
    config = tmp_path / "lmcache.yaml"
    config.write_text("enable_blending: true\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(config))
    vp.register()
    vp.register()  # wrapped once


@pytest.mark.usefixtures("fake_stack")
def test_a_request_without_the_opt_in_saves_nothing(adapter, monkeypatch, tmp_path):
    assert adapter.saves(request())  # LMCache as shipped: a plain request is stored
    register_blend_engine(monkeypatch, tmp_path, adapter)
    assert not adapter.saves(request())  # a plain OpenAI client
    assert not adapter.saves(request({}))
    assert not adapter.saves(request({"lmcache.tag.user": "a"}))
    assert not adapter.saves(request({"lmcache.save": "yes"}))  # only true asks
    assert not adapter.saves(request({"lmcache.skip_save": True}))  # our questions
    assert not adapter.saves(request({"lmcache.save": True, "lmcache.skip_save": True}))
    assert adapter.saves(request({"lmcache.save": True}))  # our precompute
    assert adapter.saves(request(gpu.SAVE["kv_transfer_params"]))
    # the configs LMCache keys by (its tags) are kept
    assert adapter.extract_request_configs(request({"lmcache.tag.user": "a"})) == {
        "lmcache.tag.user": "a", "lmcache.skip_save": True}
    assert gpu.SAVE["kv_transfer_params"] == {vp.SAVE_KEY: True}


@pytest.mark.usefixtures("fake_stack")
def test_a_plain_engine_keeps_lmcaches_rule(adapter, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, adapter.__name__, adapter)
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    vp.register()
    assert adapter.saves(request())


def test_precompute_opts_in_and_questions_do_not(monkeypatch):
    import httpx

    sent = []

    def handler(req):
        sent.append(json.loads(req.content))
        return httpx.Response(200, json={"choices": [{"text": "x"}]})

    real_client, transport = httpx.Client, httpx.MockTransport(handler)
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=transport, **kw))
    monkeypatch.setattr(gpu, "tokenizer_for", lambda model: CharTokenizer(bos=False))
    engine = runtime.Engine("blend", 8000, "vllm", model="m", env=gpu.GpuBlendSettings(path="fast").to_env())
    res = gpu.precompute(engine, ["ab", "cde"], progress=False, system="S")
    stored, primed = sent[:3], sent[3:]
    assert len(primed) == 2 and res["tokens"] == sum(len(s["prompt"]) for s in stored)
    assert all(s["kv_transfer_params"] == {"lmcache.save": True} for s in stored)
    assert all(s["kv_transfer_params"] == {"lmcache.skip_save": True} for s in primed)
    _, body = gpu.request(engine, "m", ["ab"], "q?")
    assert body["extra_body"]["kv_transfer_params"] == {"lmcache.skip_save": True}
