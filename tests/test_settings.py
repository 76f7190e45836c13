"""helpers/settings.py: one default per setting, and the GPU settings' one channel to vLLM's processes."""

import pytest

from helpers.settings import BLEND, BLEND_PATHS, GPU_BLEND, GpuBlendSettings


def test_each_engine_has_its_deviation_and_the_store_holds_the_corpus():
    """The defaults reproduce the published tables: the store holds the whole FFmpeg corpus of the
    default GPU model (Mistral-7B: 32 layers, 8 KV heads of 128, bf16 K and V)."""
    from helpers import corpus

    assert BLEND.deviation == "v" and GPU_BLEND.deviation == "k"
    assert GPU_BLEND.path == BLEND_PATHS[0] == "fast"
    tokens = sum(m["tokens"] for m in corpus.load_manifest())
    assert tokens * 2 * 32 * 8 * 128 * 2 <= GPU_BLEND.store_gb * 1e9


def test_gpu_settings_travel_through_the_environment():
    assert GpuBlendSettings.from_env({}) == GPU_BLEND
    ours = GpuBlendSettings(path="fixed", store_gb=0.5, graphs=False, flex_options={"BLOCK_N": 128},
                            prefix_attention="flash16")
    env = ours.to_env()
    assert list(env) == [GpuBlendSettings.ENV]
    assert GpuBlendSettings.from_env(env) == ours


@pytest.mark.parametrize("fields, message", [
    ({"path": "bogus"}, "fast, fixed, upstream"),
    ({"deviation": "q"}, "k, v"),
    ({"prefix_attention": "fa3"}, "auto, flex, flash, flash16"),
    ({"store_gb": "lots"}, "number of GB"),
    ({"store_gb": -1}, "number of GB"),
    ({"flex_options": [128]}, "FlexAttention kernel options"),
])
def test_a_bad_setting_says_what_is_allowed(fields, message):
    with pytest.raises(ValueError, match=message):
        GpuBlendSettings(**fields)


@pytest.mark.parametrize("text", ["BLOCK_N=128", "[1]", '{"nonsense": 1}'])
def test_a_bad_channel_says_what_it_takes(text):
    with pytest.raises(ValueError, match="JSON object with keys among"):
        GpuBlendSettings.from_env({GpuBlendSettings.ENV: text})
