"""helpers/gpu/launch.py on CPU: GPU / version / architecture checks and their messages, the two
engines' command lines and environment, the LMCache YAML, the plugin's entry point, and prompt ids
as LMCache's segment matcher splits them. No GPU, vLLM or LMCache needed."""

import json
import os
import re
from importlib import metadata

import pytest
import yaml

from helpers import engines as eng
from helpers import prompts, runtime
from helpers.gpu import launch as gpu
from helpers.gpu import plugin
from helpers.runtime import EngineError
from helpers.settings import GpuBlendSettings

MISTRAL = {"architectures": ["MistralForCausalLM"], "max_position_embeddings": 32768}
LLAMA_LONG = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 200000}


@pytest.fixture
def gpus(monkeypatch):
    """Pretend nvidia-smi lists `n` GPUs."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(gpu.SHARE_ENV, raising=False)

    def set_count(n):
        monkeypatch.setattr(runtime, "gpu_count", lambda: n)

    return set_count


@pytest.fixture
def versions(monkeypatch):
    monkeypatch.delenv(gpu.SKIP_VERSION_ENV, raising=False)

    def set_versions(**have):
        monkeypatch.setattr(gpu, "installed_version", lambda name: have.get(name))

    return set_versions


@pytest.fixture
def ready(gpus, versions, tmp_path, monkeypatch):
    """Two GPUs, the tested pair installed, engine files in a temporary run dir."""
    gpus(2)
    versions(**gpu.VERSIONS)
    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path / "run")
    return tmp_path


def model_dir(tmp_path, config, name="model"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


# ------------------------------------------------------------------ checks and messages
def test_no_gpu(gpus):
    gpus(0)
    with pytest.raises(EngineError, match=r"No NVIDIA GPU found.*--backend embedded"):
        gpu.check_gpus()


def test_one_gpu_needs_opt_in(gpus, monkeypatch):
    gpus(1)
    with pytest.raises(EngineError, match=r"Only one GPU.*KVBLEND_SHARE_GPU=1.*--backend embedded"):
        gpu.check_gpus()
    monkeypatch.setenv(gpu.SHARE_ENV, "1")
    assert gpu.check_gpus() == ("0", "0")


def test_two_gpus_and_visible_devices(gpus, monkeypatch):
    gpus(4)
    assert gpu.check_gpus() == ("0", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,2")
    assert gpu.check_gpus() == ("3", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(EngineError, match="CUDA_VISIBLE_DEVICES hides them"):
        gpu.check_gpus()


def test_versions_missing(versions):
    versions(lmcache="0.5.3")
    with pytest.raises(EngineError, match=r"vllm is not installed.*pip install -e '\.\[gpu\]'"):
        gpu.check_versions()


def test_versions_wrong(versions, monkeypatch):
    versions(vllm="0.26.0", lmcache="0.5.6")
    with pytest.raises(EngineError, match=r"lmcache 0\.5\.6 is installed.*'vllm==0\.26\.0' 'lmcache==0\.5\.3'"
                                          r".*KVBLEND_SKIP_VERSION_CHECK=1"):
        gpu.check_versions()
    monkeypatch.setenv(gpu.SKIP_VERSION_ENV, "1")
    gpu.check_versions()


def test_versions_tested_pair(versions):
    versions(vllm="0.26.0", lmcache="0.5.3")
    gpu.check_versions()


def test_architectures():
    assert gpu.served_architecture({"architectures": ["LlamaForCausalLM"]}, "m") is None
    assert gpu.served_architecture({"architectures": ["Qwen3ForCausalLM"]}, "m") is None
    assert gpu.served_architecture(MISTRAL, "m") == "LlamaForCausalLM"
    assert gpu.served_architecture(None, "not-downloaded") is None
    with pytest.raises(EngineError, match=r"google/gemma-2-9b is a Gemma2ForCausalLM model.*Llama-family"):
        gpu.served_architecture({"architectures": ["Gemma2ForCausalLM"]}, "google/gemma-2-9b")


def test_unsupported_model_stops_before_any_file(ready):
    gemma = model_dir(ready, {"architectures": ["Gemma2ForCausalLM"]})
    with pytest.raises(EngineError, match="Gemma2ForCausalLM"):
        gpu.engines(gemma, 8000, 8001)
    assert not (runtime.RUN_DIR / "lmcache-blend.yaml").exists()


def test_checks_run_through_engines_for(gpus, versions):
    gpus(1)
    with pytest.raises(EngineError, match="Only one GPU"):
        eng.engines_for("vllm", None, 8000, 8001)
    gpus(2)
    versions()
    with pytest.raises(EngineError, match="vllm is not installed"):
        eng.engines_for("vllm", None, 8000, 8001)


# ------------------------------------------------------------------ engines
def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_engines_two_gpus(ready):
    model = model_dir(ready, MISTRAL)
    blend, full = gpu.engines(model, 8000, 8001, load_format="dummy")
    assert (blend.name, blend.port, blend.backend, blend.model) == ("blend", 8000, "vllm", model)
    assert (full.name, full.port, full.backend, full.model) == ("full", 8001, "vllm", model)
    for e in (blend, full):
        assert e.cmd[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", model]
        assert flag(e.cmd, "--port") == str(e.port) and flag(e.cmd, "--host") == "127.0.0.1"
        assert "--enforce-eager" in e.cmd and "--no-enable-prefix-caching" in e.cmd
        assert flag(e.cmd, "--load-format") == "dummy"
        assert flag(e.cmd, "--gpu-memory-utilization") == "0.9"
        assert flag(e.cmd, "--max-model-len") == flag(e.cmd, "--max-num-batched-tokens") == "32768"
        assert flag(e.cmd, "--tokenizer-mode") == "hf"
        assert json.loads(flag(e.cmd, "--hf-overrides")) == {"architectures": ["LlamaForCausalLM"]}
        assert e.env["PYTHONPATH"].split(os.pathsep)[0] == str(runtime.ROOT)
        assert e.env["VLLM_NO_USAGE_STATS"] == "1"
    assert json.loads(flag(blend.cmd, "--kv-transfer-config")) == {"kv_connector": "LMCacheConnectorV1",
                                                                    "kv_role": "kv_both"}
    assert "--kv-transfer-config" not in full.cmd
    assert (blend.env["CUDA_VISIBLE_DEVICES"], full.env["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    assert plugin.blending_enabled(blend.env)  # the plugin activates in the blend engine only
    assert not plugin.blending_enabled(full.env)
    assert GpuBlendSettings.from_env(blend.env).path == "fast" and GpuBlendSettings.ENV not in full.env


def test_blend_path_and_store_reach_the_blend_engine(ready):
    model = model_dir(ready, MISTRAL)
    blend, _ = gpu.engines(model, 8000, 8001, blend_path="fast", gpu_kv_store_gb=6)
    assert GpuBlendSettings.from_env(blend.env) == GpuBlendSettings(path="fast", store_gb=6)
    with pytest.raises(runtime.EngineError, match="--blend-path must be one of"):
        gpu.engines(model, 8000, 8001, blend_path="quick")
    with pytest.raises(runtime.EngineError, match="--gpu-kv-store-gb must be > 0"):
        gpu.engines(model, 8000, 8001, blend_path="fast", gpu_kv_store_gb=0)
    # a second blend engine for comparisons gets its own LMCache config and short socket folder
    other = gpu.blend_engine("upstream", 8011, model, settings=GpuBlendSettings(path="upstream"),
                             gpu_memory_utilization=0.2,
                             max_model_len=4096)
    assert other.env["LMCACHE_CONFIG_FILE"].endswith("lmcache-upstream.yaml")
    assert len(other.env["VLLM_RPC_BASE_PATH"]) < 40


def test_vllm_options_are_refused_by_the_embedded_engines():
    from helpers.embedded import launch as embedded

    with pytest.raises(runtime.EngineError, match="--blend-path, --gpu-kv-store-gb: options of the vllm"):
        embedded.engines(None, 8000, 8001, blend_path="fast", gpu_kv_store_gb=2)


def test_engines_share_one_gpu(ready, gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv(gpu.SHARE_ENV, "1")
    model = model_dir(ready, {"architectures": ["LlamaForCausalLM"]})
    blend, full = gpu.engines(model, 8000, 8001)
    assert blend.env["CUDA_VISIBLE_DEVICES"] == full.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert flag(blend.cmd, "--gpu-memory-utilization") == flag(full.cmd, "--gpu-memory-utilization") == "0.4"
    assert "--hf-overrides" not in blend.cmd and "--load-format" not in blend.cmd


def test_engine_options(ready):
    model = model_dir(ready, LLAMA_LONG)
    blend, full = gpu.engines(model, 9000, 9001, host="0.0.0.0", gpu_memory_utilization=0.7,
                                  max_model_len=8192, dtype="bfloat16")
    assert flag(blend.cmd, "--host") == "0.0.0.0" and blend.host == "0.0.0.0"
    assert flag(full.cmd, "--gpu-memory-utilization") == "0.7"
    assert flag(full.cmd, "--max-model-len") == "8192" and flag(full.cmd, "--dtype") == "bfloat16"
    # a long-context model is capped at 32K by default; a short one keeps its own length
    assert flag(gpu.engines(model, 1, 2)[0].cmd, "--max-model-len") == "32768"
    short = model_dir(ready, {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096}, "s")
    assert flag(gpu.engines(short, 1, 2)[0].cmd, "--max-model-len") == "4096"


def test_default_model(ready):
    blend, _ = gpu.engines(None, 8000, 8001)
    assert blend.model == gpu.DEFAULT_MODEL == "mistralai/Mistral-7B-Instruct-v0.2"


def test_lmcache_yaml(ready):
    blend, _ = gpu.engines(model_dir(ready, MISTRAL), 8000, 8001, ratio=0.2, check_layer=2,
                               cpu_cache_gb=8)
    path = blend.env["LMCACHE_CONFIG_FILE"]
    assert path == str(runtime.RUN_DIR / "lmcache-blend.yaml")
    assert yaml.safe_load(open(path)) == {
        "chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 8, "use_layerwise": True,
        "enable_blending": True, "blend_special_str": " # # ", "blend_recompute_ratios": [0.2],
        "blend_check_layers": [2]}
    with pytest.raises(EngineError, match="recompute ratio"):
        gpu.lmcache_yaml(ratio=0)
    with pytest.raises(EngineError, match="check layer"):
        gpu.lmcache_yaml(check_layer=-1)


def test_kv_store_gives_lmcache_a_redis_remote_backend(ready):
    """What `--kv-store` generates for the GPU blend engine (untested on GPUs: the config only)."""
    from helpers import engines

    url, model = "redis://127.0.0.1:6390", model_dir(ready, MISTRAL)
    blend, full = engines.plan("vllm", model, 8000, 8001, kv_store=url)
    cfg = yaml.safe_load(open(blend.env["LMCACHE_CONFIG_FILE"]))
    assert cfg["remote_url"] == url and cfg["remote_serde"] == "naive" and cfg["enable_blending"] is True
    assert full.env["LMCACHE_CONFIG_FILE"] == ""  # the plain engine has no LMCache at all
    blend, _ = engines.plan("vllm", model, 8000, 8001)
    assert "remote_url" not in yaml.safe_load(open(blend.env["LMCACHE_CONFIG_FILE"]))


def test_plugin_entry_point_for_a_checkout(ready, monkeypatch):
    monkeypatch.setattr(gpu.metadata, "entry_points", lambda group: [])  # package not pip-installed
    (folder,) = gpu.plugin_path()
    eps = [ep for d in metadata.distributions(path=[folder]) for ep in d.entry_points
           if ep.group == "vllm.general_plugins"]
    assert [(ep.name, ep.value) for ep in eps] == [("kvblend_lmcache", "helpers.gpu.plugin:register")]
    assert eps[0].load() is plugin.register
    blend, _ = gpu.engines(model_dir(ready, MISTRAL), 8000, 8001)
    assert folder in blend.env["PYTHONPATH"].split(os.pathsep)


def test_plugin_entry_point_when_installed(ready, monkeypatch):
    class EP:
        name = "kvblend_lmcache"

    monkeypatch.setattr(gpu.metadata, "entry_points", lambda group: [EP()])
    assert gpu.plugin_path() == []


def test_pyproject_declares_the_plugin():
    import tomllib

    data = tomllib.loads((runtime.ROOT / "pyproject.toml").read_text())
    eps = data["project"]["entry-points"]["vllm.general_plugins"]
    assert eps == {gpu.PLUGIN: "helpers.gpu.plugin:register"}


# ------------------------------------------------------------------ prompt ids
class CharTokenizer:
    """One id per character, with or without a BOS (id 1), like HF's encode()."""

    def __init__(self, bos=True):
        self.bos = bos

    def encode(self, text, add_special_tokens=True):
        return ([1] if self.bos and add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        """A ChatML-like template, as SmolLM2's."""
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def lmcache_segments(ids, tokenizer):
    """What LMCache's SegmentTokenDatabase does: separator = encode(" # # ")[1:], split on matches."""
    sep = tokenizer.encode(" # # ")[1:]
    out, start, i = [], 0, 0
    while i <= len(ids) - len(sep):
        if ids[i:i + len(sep)] == sep:
            out.append(ids[start:i])
            start = i = i + len(sep)
        else:
            i += 1
    return out + [ids[start:]]


@pytest.mark.parametrize("bos", [True, False])
def test_separator_ids_are_lmcaches(bos):
    """LMCache's SegmentTokenDatabase searches for encode(SEP)[1:] (it assumes a BOS to drop)."""
    tok = CharTokenizer(bos)
    assert prompts.separator_ids(tok) == tok.encode(" # # ")[1:]


def test_precompute_posts_ids(monkeypatch):
    """precompute stores the chat prefix, then each chunk alone (no prefix, no separator: computed
    from position 0, as the embedded engine computes chunk KV), with max_tokens 1."""
    import httpx

    sent = []

    def handler(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"text": "x"}]})

    transport = httpx.MockTransport(handler)
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=transport, **kw))
    monkeypatch.setattr(gpu, "tokenizer_for", lambda model: CharTokenizer(bos=False))
    e = runtime.Engine("blend", 8000, "vllm", model="m")
    res = gpu.precompute(e, ["ab", "cde"], progress=False, system="S")
    assert ["".join(map(chr, s["prompt"])) for s in sent] == ["<system>S</><user>", "ab", "cde"]
    assert all(s["max_tokens"] == 1 and s["model"] == "m" for s in sent)
    assert res["tokens"] == sum(len(s["prompt"]) for s in sent) and res["computed"] == 2
    # each stored prompt is one segment for LMCache, with the ids that segment has in a question
    tok = CharTokenizer(bos=False)
    asked = lmcache_segments(prompts.chat_prompt_ids(tok, ["cde", "ab"], "q?", "S"), tok)
    assert [lmcache_segments(s["prompt"], tok) for s in sent] == [[asked[0]], [asked[2]], [asked[1]]]

    # the fast path: a second round, not stored, each chunk after the prefix and followed by a
    # question, so that LMCache's lookup (which drops a wholly cached prompt's last token) still finds
    # the whole chunk segment
    sent.clear()
    fast = runtime.Engine("blend", 8000, "vllm", model="m", env=GpuBlendSettings(path="fast").to_env())
    res = gpu.precompute(fast, ["ab", "cde"], progress=False, system="S")
    second = sent[3:]
    want = [prompts.chat_prompt_ids(tok, [t], gpu.PRIME_QUESTION, "S") for t in ("ab", "cde")]
    assert [s["prompt"] for s in second] == want
    assert all(s["kv_transfer_params"] == {"lmcache.skip_save": True} for s in second)
    assert res["tokens"] == sum(len(s["prompt"]) for s in sent[:3])  # the storing round only
    primed = lmcache_segments(want[0], tok)
    assert primed[:2] == [asked[0], asked[2]]
    assert gpu.precompute(e, [], progress=False)["tokens"] == 0

    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(
        transport=httpx.MockTransport(lambda r: httpx.Response(400, text="too long")), **kw))
    with pytest.raises(EngineError, match="refused a precompute request.*too long"):
        gpu.precompute(e, ["ab"], progress=False)


def test_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, helpers.gpu.launch, helpers.gpu.plugin; "
            "print(sorted(m for m in ('torch', 'vllm', 'lmcache', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=runtime.ROOT,
                         check=True).stdout
    assert out.strip() == "[]"


def test_chat_prompt_ids_same_conversation_as_embedded_and_segments_found_by_lmcache():
    """Both GPU engines get the chat-templated prompt: the template's prefix, each chunk,
    then the question with the generation header, joined by the ids LMCache splits on."""
    tok = CharTokenizer(bos=False)
    ids = prompts.chat_prompt_ids(tok, ["chunk A", "chunk B"], "Q?", "S")
    segments = lmcache_segments(ids, tok)
    assert ["".join(map(chr, s)) for s in segments] == ["<system>S</><user>", "chunk A", "chunk B",
                                                        "Q?</><assistant>"]
    # precompute (question None) gives the same prefix and chunk segments
    pre = lmcache_segments(prompts.chat_prompt_ids(tok, ["chunk A"], None, "S"), tok)
    assert pre == segments[:2]
    # a chunk has the same ids wherever it stands, so its stored KV is found in any order
    a = lmcache_segments(prompts.chat_prompt_ids(tok, ["ab", "cd"], "q", "S"), tok)
    b = lmcache_segments(prompts.chat_prompt_ids(tok, ["cd", "ab"], "q", "S"), tok)
    assert a[1] == b[2] and a[2] == b[1]


def test_both_gpu_engines_get_identical_ids(monkeypatch):
    """The side-by-side differs in blending only: blend and full engines receive the same ids."""
    monkeypatch.setattr(gpu, "tokenizer_for", lambda model: CharTokenizer(bos=False))
    bodies = [gpu.request(runtime.Engine(name, port, "vllm", model="m"), "m", ["ab", "cd"], "q?")
              for name, port in (("blend", 8000), ("full", 8001))]
    assert bodies[0][0] == bodies[1][0] == "completions"
    blend, full = (b[1]["extra_body"] for b in bodies)
    assert blend["prompt"] == full["prompt"] == prompts.chat_prompt_ids(CharTokenizer(bos=False),
                                                                        ["ab", "cd"], "q?")
    # questions are never stored as chunks on the blend engine (else a repeated question is blended)
    assert blend["kv_transfer_params"] == {"lmcache.skip_save": True} and "kv_transfer_params" not in full


def test_extra_blend_engines_socket_paths_fit_in_107_bytes(tmp_path, monkeypatch):
    """LMCache 0.5.3 names its RPC socket `<dir>/engine_<uuid4>_service_offload_lmcache_rpc_port_100`;
    a path over 107 bytes fails LMCache's start-up (the engine still serves, and dies on the first
    blended request). Checked on the device with `/tmp/kvblend-rpc-fixed_0.05`: 108 bytes."""
    from helpers import runtime
    from helpers.gpu import launch as gpu

    monkeypatch.setattr(runtime, "RUN_DIR", tmp_path)
    longest = "/engine_" + "0" * 36 + "_service_offload_lmcache_rpc_port_100"
    for name, port in (("fixed_0.05", 8110), ("fast_0.15_v", 65535)):
        e = gpu.blend_engine(name, port, "m", gpu_memory_utilization=0.2, max_model_len=8192)
        assert len(e.env["VLLM_RPC_BASE_PATH"] + longest) <= 107


def test_python_time_attributes_host_time_to_functions(tmp_path):
    """scripts/bench_ttft.py reads a torch profiler trace's Python calls: a function's self time is
    its own, its callees' taken out, per thread; totals include callees."""
    import gzip
    import sys

    sys.path.insert(0, str(runtime.ROOT / "scripts"))
    import bench_ttft

    def call(name, ts, dur, tid=1):
        return {"cat": "python_function", "ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}

    events = [call("step", 0, 10_000), call("lookup", 1_000, 4_000), call("hash", 2_000, 1_000),
              call("blend", 6_000, 3_000), call("step", 0, 2_000, tid=2),
              {"cat": "kernel", "ph": "X", "name": "gemm", "ts": 0, "dur": 50_000, "pid": 0, "tid": 7}]
    trace = tmp_path / "t.pt.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    rows = {line.split()[-1]: [float(x) for x in line.split()[:2]]
            for line in bench_ttft.python_time(trace).splitlines()[1:]}
    assert rows == {"step": [5.0, 12.0], "lookup": [3.0, 4.0], "blend": [3.0, 3.0], "hash": [1.0, 1.0]}


def test_quality_harness_same_position_prompts_put_the_chunk_where_it_was_stored():
    """gpu_quality's same_pos set: the chunk at positions 0..n-1, as precompute stored it alone."""
    import sys

    sys.path.insert(0, str(runtime.ROOT / "scripts"))
    import gpu_quality

    tok = CharTokenizer(bos=False)
    ids = gpu_quality.prompt_ids(tok, "same_pos", ["chunk A"], "Q?")
    assert lmcache_segments(ids, tok) == [list(map(ord, "chunk A")), list(map(ord, "Q?</><assistant>"))]
    stored = gpu.storing_prompts(tok, ["chunk A"], prompts.DEFAULT_SYSTEM)[1]
    assert ids[:len(stored)] == stored
    qa = gpu_quality.prompt_ids(tok, "qa", ["chunk A"], "Q?")
    assert qa == prompts.chat_prompt_ids(tok, ["chunk A"], "Q?")


def test_validate_harness_labels_rows_with_the_card_it_ran_on(monkeypatch):
    """Runs on an H100 were once labeled H200: the CSV's gpus column comes from nvidia-smi."""
    import subprocess
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(runtime.ROOT / "scripts"))
    import bench_ttft

    for out, want in (("NVIDIA H100 80GB HBM3\n", "H100"), ("NVIDIA H200\n", "H200"), ("", "GPU")):
        monkeypatch.setattr(subprocess, "run", lambda *a, out=out, **k: SimpleNamespace(stdout=out))
        assert bench_ttft.gpu_name() == want


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_check_runs_on_the_cpu_before_the_device_does(tmp_path):
    """`bench_attention.py flex` at small shapes: every layout and option set it times gives the dense
    reference's answer, both gathers the same rows, and it writes the fields docs/gpu.md reads
    (a crash on the GPU would lose the run)."""
    import sys

    sys.path.insert(0, str(runtime.ROOT / "scripts"))
    import bench_attention

    shapes = ((40, 3), (96, 15), (700, 256))  # the last: two q-blocks, the second with a prefix
    res = bench_attention.flex_check(tmp_path / "flex.json", device="cpu", shapes=shapes,
                                  gather={"sizes": (64, 128), "rows": 400})
    assert res["ok"] and json.loads((tmp_path / "flex.json").read_text())["best"] == res["best"]
    for shape in ("40x3", "96x15", "700x256"):
        assert all(res[shape][f"{way}_err"] < 0.05 for way in ("views", "flash", "flash16"))
        assert all(res[shape][f"variant_{i}_err"] < 0.05 for i in range(len(bench_attention.FLEX_VARIANTS)))
    assert all(g["equal"] for g in res["gather"].values()) and set(res["gather"]) == {"64", "128"}
    assert res["views_over_copies"] > 0 and res["best_over_default"] >= 1 and res["flash_speedup"] > 0
    quick = bench_attention.flex_check(None, device="cpu", shapes=((40, 3), (96, 15)),
                                    gather={"sizes": (64,), "rows": 100},
                                    variants=bench_attention.FLEX_VARIANTS[:1], autotune=True)
    assert quick["ok"] and quick["variants"] == ["{}"] and "variant_1_ms" not in quick["96x15"]
    assert quick["96x15"]["autotune_err"] < 0.05 and quick["autotune_over_default"] > 0


def test_device_step_script_parses_and_names_its_steps(tmp_path):
    """scripts/device_step.sh is what each device call runs: a syntax error there costs a start."""
    import subprocess

    script = runtime.ROOT / "scripts" / "device_step.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for args in (["bogus"], []):
        bad = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                             env={**os.environ, "OUT": str(tmp_path)})
        assert bad.returncode == 2 and bad.stderr  # an unknown step: refused, saying why
    text = script.read_text()
    for name in re.findall(r"scripts/(\w+\.(?:py|sh))", text):  # what it runs exists
        assert (runtime.ROOT / "scripts" / name).is_file(), name
    for name in re.findall(r"\b(tests/gpu/\w+\.py)", text):
        assert (runtime.ROOT / name).is_file(), name
    accepted = set(re.search(r"^\s*(unpack \|[^)]*)\)", text, re.M)[1].replace(" ", "").split("|"))
    named = set(re.findall(r"device_step\.sh (\w+)", text))  # every step its header tells
    assert named and named <= accepted, named - accepted
