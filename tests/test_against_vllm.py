"""Our GPU code against vLLM's own, on the CPU: scripts/vllm_export.py builds what vLLM 0.26 builds
(vLLM's Python code from scripts/upstream_python.py; no kernel runs) and saves it.

Rotary embeddings. The CPU conformance suite (tests/test_conformance.py) stands transformers' rotary
embedding in for vLLM's; here that stand-in is checked: vLLM rotates Q and K exactly as transformers
does for every accepted checkpoint, the GPU path's re-rotation with vLLM's own cache moves K exactly,
and LMCache's own re-rotation cache (the negative control) moves it wrong for every scaled RoPE and
right for the plain ones.

Config names. The plugin's load-time checks read vLLM's config with getattr and defaults (so that a
partial config cannot crash an engine); a name vLLM does not have would silently read the default.
Every name they read is one of vLLM's.

Command lines. Our launcher's `vllm serve` for every checkpoint and docs/gpu.md's by-hand command,
through vLLM's own `serve` parser into the config a worker gets: accepted by vLLM and by the load
checks; vLLM's defaults, a Mistral checkpoint under its own class, tensor parallelism and a dynamic
RoPE: refused, by name.

The fast path on vLLM's model classes (tests/vllm_fast_path.py). Its pass over vLLM's own
LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM, built from every checkpoint in float32,
writes the K/V of transformers' full prefill when nothing has to be repaired, and gives the CPU
reference's answer with chunks moved (the conformance suite's moved_r0 and moved_r0.15). Negative
controls: without LMCache's q/k norm Qwen3's K/V are wrong; with LMCache's own re-rotation
Llama-3.1's answer moves far from the reference.

vLLM's plugin loader (tests/vllm_plugin_loader.py) calls our entry point in a plain engine, a blend
engine without LMCache and one whose LMCache lacks what the plugin patches: it returns each time,
and only the blend engines stop, at model load, saying why. With LMCache 0.5.3's own Python code
every patch applies, and LMCache's connector stores only the requests that ask.

Tensor parallelism (tests/vllm_tp.py): two ranks in vLLM's own tensor-parallel group (gloo), each
holding half of the KV heads, select the tokens one rank holding all of them would."""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from helpers import conformance as cf
from helpers.gpu import rope

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_checkpoints as tc  # noqa: E402
import upstream_python  # noqa: E402

SCALED = [a for a in tc.ARCHS if tc.rope_of(a)["rope_type"] != "default"]


def exported(what: str, folder: Path) -> dict:
    """What scripts/vllm_export.py saves, run in its own process (vLLM never enters this one)."""
    if importlib.util.find_spec("vllm") is None:  # a GPU install has it in the venv
        upstream_python.install()
    out = folder / f"{what}.pt"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "vllm_export.py"), what, str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
    saved = torch.load(out)
    assert saved["vllm"] == "0.26.0"
    return saved


@pytest.fixture(scope="module")
def vllm_rows(tmp_path_factory):
    return exported("rotary", tmp_path_factory.mktemp("vllm"))


@pytest.fixture(scope="module")
def vllm_commands(tmp_path_factory):
    return exported("commands", tmp_path_factory.mktemp("vllm"))["commands"]


def run_module(module: str, *args: str, timeout: int = 300) -> tuple[dict, subprocess.CompletedProcess]:
    """Run `python -m module args` in its own process (vLLM never enters this one): the JSON object
    it printed last, and the process."""
    run = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in reversed(run.stdout.splitlines()) if x.startswith("{"))
    print(line)
    return json.loads(line), run


def full(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A cache saved at `positions` as one indexable by position, NaN where nothing was saved (a
    position outside them turns everything it touches into NaN, and the check fails)."""
    out = torch.full((int(positions.max()) + 1, cache.shape[1]), float("nan"))
    out[positions] = cache
    return out


def hf_cache(arch: str, positions: torch.Tensor) -> torch.Tensor:
    """transformers' cos|sin of the checkpoint at positions, vLLM's layout [n, head_dim]."""
    config, emb = tc.rotary_of(arch)
    cos, sin = emb(torch.empty(0), positions[None])
    half = config.head_dim // 2
    return torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1)


def moved_k(arch: str, cache: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32 keys rotated by transformers at 0..31, turned by `cache` (rope.rerotate_torch, the GPU
    path's op) to shift..shift+31; and the same keys rotated there by transformers."""
    config, emb = tc.rotary_of(arch)
    d = config.head_dim
    torch.manual_seed(0)
    k = torch.randn(32, 2, d)

    def at(pos):
        cos, sin = emb(torch.empty(0), pos[None])
        half = torch.cat([-k[..., d // 2:], k[..., : d // 2]], dim=-1)
        return k * cos[0][:, None] + half * sin[0][:, None]

    old = torch.arange(32)
    turned = at(old)
    rope.rerotate_torch(old, old + shift, turned, d, cache, True)
    return turned, at(old + shift)


@pytest.mark.parametrize("arch", list(tc.ARCHS))
def test_vllm_builds_a_rotary_our_code_accepts(vllm_rows, arch):
    """vLLM's class is one rope.rotation_cache takes; check_rope reads vLLM's config as the
    checkpoint's rope type; the layer served in bf16 gives the same float32 rotation."""
    r = vllm_rows["rows"][arch]
    assert r["cls"] in rope.SUPPORTED_CLASSES
    assert r["check_rope"] == tc.rope_of(arch)["rope_type"]
    assert isinstance(r["rotation"], torch.Tensor) and r["bf16_gap"] == 0.0


@pytest.mark.parametrize("arch", list(tc.REFUSED))
def test_a_refused_rope_is_refused_on_vllms_objects(vllm_rows, arch):
    r = vllm_rows["rows"][arch]
    kind = tc.rope_of(arch)["rope_type"]
    assert r["check_rope"].startswith(f"refused: rope_type '{kind}'")
    assert r["rotation"].startswith("refused:") and r["cls"] in r["rotation"]


@pytest.mark.parametrize("arch", list(tc.ARCHS))
def test_vllm_rotates_as_the_reference_does(vllm_rows, arch):
    """The cos|sin vLLM rotates Q and K with is transformers' (YaRN's attention factor included):
    what lets the CPU reference stand for the served model."""
    served = vllm_rows["rows"][arch]["served"]
    torch.testing.assert_close(served, hf_cache(arch, vllm_rows["positions"]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", list(tc.ARCHS))
@pytest.mark.parametrize("shift", [4000, 16000])
def test_rerotation_with_vllms_cache_moves_k_exactly(vllm_rows, arch, shift):
    cache = full(vllm_rows["rows"][arch]["rotation"], vllm_rows["positions"])
    turned, right = moved_k(arch, cache, shift)
    torch.testing.assert_close(turned, right, atol=3e-4, rtol=3e-4)


@pytest.mark.parametrize("arch", list(tc.ARCHS))
def test_negative_control_lmcaches_cache_is_wrong_for_every_scaled_rope(vllm_rows, arch):
    """LMCache's own re-rotation (rope_theta alone) moves K by 4K tokens far off for llama3, linear and
    YaRN, and exactly for a plain RoPE: the check above sees the error it guards against."""
    cache = full(vllm_rows["rows"][arch]["lmcache"], vllm_rows["positions"])
    turned, right = moved_k(arch, cache, 4000)
    err = float((turned - right).abs().max())
    print(f"{arch}: LMCache's re-rotation by 4K tokens, max |K error| {err:.3f}")
    if arch in SCALED:
        assert err > 1.0
    else:
        torch.testing.assert_close(turned, right, atol=3e-4, rtol=3e-4)


def test_yarn_lmcache_cache_ends_at_the_original_context(vllm_rows):
    """For YaRN LMCache's cache holds only original_max_position_embeddings positions: a chunk moved
    past them is turned with rows its kernel reads out of bounds."""
    assert vllm_rows["rows"]["qwen2_yarn"]["lmcache_rows"] == tc.rope_of("qwen2_yarn")[
        "original_max_position_embeddings"]


def test_the_suites_unscaled_cache_is_lmcaches(vllm_rows):
    """tests/test_conformance.py's negative control (cf.unscaled_cache, the figures docs/gpu.md quotes)
    turns keys with LMCache's own cache, up to float32's rounding of angles of 17K radians (vLLM
    computes them in float32, the suite in float64)."""
    p = tc.rope_of("llama31")
    positions = vllm_rows["positions"]
    ours = cf.unscaled_cache(p["rope_theta"], tc.COMMON["head_dim"], int(positions.max()) + 1)[positions]
    torch.testing.assert_close(ours, vllm_rows["rows"]["llama31"]["lmcache"], atol=2e-3, rtol=0)


# ------------------------------------------------------------------ the config names the plugin reads
class Seen:
    """A config that records every attribute path read from it, present or not (getattr with a
    default reads a missing one as the default, silently)."""

    def __init__(self, obj, path=(), log=None):
        self._obj, self._path, self._log = obj, path, set() if log is None else log

    def __getattr__(self, name):
        self._log.add(self._path + (name,))
        value = getattr(self._obj, name)
        if isinstance(value, types.SimpleNamespace):
            return Seen(value, self._path + (name,), self._log)
        return value


def served_config() -> types.SimpleNamespace:
    """vLLM's config as our launcher starts a blend engine (what the checks pass), with a KV
    connector config so that what the checks read inside it is recorded too."""
    from tests.test_vllm_plugin import vllm_config

    ns = types.SimpleNamespace
    return ns(**vars(vllm_config()), kv_transfer_config=ns(kv_connector_extra_config={}))


def names_read(config) -> set[tuple[str, ...]]:
    """The attribute paths of vLLM's config the load checks and the chunk store's dtype read."""
    from helpers.gpu import plugin
    from helpers.gpu.fast import store

    seen = Seen(config)
    plugin.run_load_checks(seen)
    store.model_dtype(seen)
    return seen._log


def unknown_to_vllm(paths, fields: dict[str, list[str]]) -> list[str]:
    """The paths (config.section.name) that vLLM's VllmConfig does not have."""
    out = []
    for path in paths:
        section, name = (path[0], path[1]) if len(path) == 2 else ("", path[0])
        if section not in fields or name not in fields[section]:
            out.append(".".join(path))
    return sorted(out)


def test_the_load_checks_read_only_vllms_config_names(vllm_rows):
    paths = names_read(served_config())
    print(sorted(".".join(p) for p in paths))
    assert {("model_config", "hf_config"), ("model_config", "architecture"), ("model_config", "dtype"),
            ("cache_config", "enable_prefix_caching"), ("parallel_config", "tensor_parallel_size")} <= paths
    assert unknown_to_vllm(paths, vllm_rows["config_fields"]) == []


def test_a_misspelt_config_name_is_caught(vllm_rows, monkeypatch):
    """The negative control: a check reading a name vLLM does not have is found."""
    from helpers.gpu import plugin

    def misspelt(config):
        getattr(config.cache_config, "enable_prefix_cache", False)
        return []

    monkeypatch.setattr(plugin, "LOAD_CHECKS", [*plugin.LOAD_CHECKS, misspelt])
    paths = names_read(served_config())
    assert unknown_to_vllm(paths, vllm_rows["config_fields"]) == ["cache_config.enable_prefix_cache"]


# ------------------------------------------------------------------ `vllm serve` command lines
@pytest.mark.slow  # vLLM builds 13 configs, about 25 s
@pytest.mark.parametrize("arch", list(tc.ARCHS))
def test_the_launchers_command_is_vllms_and_passes_the_load_checks(vllm_commands, arch):
    """Our launcher's blend engine for each checkpoint: vLLM's own `serve` parser takes it, serves
    the class LMCache's blender computes (Mistral as Llama), and no load-time check refuses it."""
    from helpers.gpu import launch

    r = vllm_commands[f"launcher {arch}"]
    architecture = tc.ARCHS[arch][1]
    assert r["result"] == "ok"
    assert r["architecture"] == (launch.SUPPORTED_ARCHS[architecture] or architecture)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["launcher full engine", "docs by hand"])
def test_the_full_engine_and_the_documented_command_are_accepted(vllm_commands, case):
    """The plain engine's command parses; docs/gpu.md's by-hand command gives a blend engine the
    load-time checks accept."""
    assert vllm_commands[case]["result"] == "ok"


@pytest.mark.parametrize("case, says", [
    ("vllm serve defaults", ["--no-enable-prefix-caching", "--enforce-eager", "--max-num-batched-tokens"]),
    ("mistral without the override", ["as MistralForCausalLM", '--hf-overrides \'{"architectures"']),
    ("tensor parallel 2", ["--tensor-parallel-size 2"]),
    ("dynamic rope", ["rope_type 'dynamic'"]),
])
@pytest.mark.slow
def test_what_a_user_may_type_is_refused_by_name(vllm_commands, case, says):
    """vLLM's defaults (prefix caching, CUDA graphs, a token budget below the context), a Mistral
    checkpoint served under its own class, tensor parallelism and a dynamic RoPE, each in vLLM's own
    config: refused at load, saying what to pass."""
    result = vllm_commands[case]["result"]
    assert result.startswith("refused: "), result
    for words in says:
        assert words in result


# ------------------------------------------------------------------ the fast path on vLLM's model classes
@pytest.fixture(scope="module")
def fast_path_on_vllm():
    """tests/vllm_fast_path.py's numbers, run in its own process."""
    return run_module("tests.vllm_fast_path", timeout=900)[0]


@pytest.mark.model  # the checkpoints carry SmolLM2's tokenizer, from the converted model
@pytest.mark.parametrize("arch", list(tc.ARCHS))
def test_the_fast_path_on_vllms_model_classes_writes_the_full_prefills_kv(fast_path_on_vllm, arch):
    """Nothing moved (ratio 0.15) and two chunks reordered at ratio 1.0: the paged K/V equal a
    float32 full prefill's, within float32 rounding, for the class vLLM serves the checkpoint as."""
    from helpers.gpu import launch

    r = fast_path_on_vllm[arch]
    architecture = tc.ARCHS[arch][1]
    assert r["served_as"] == (launch.SUPPORTED_ARCHS[architecture] or architecture)
    assert r["same_pos"] < 1e-4 and r["ratio_1"] < 1e-4, r


@pytest.mark.model
def test_negative_control_qwen3_without_lmcaches_qk_norm(fast_path_on_vllm):
    """The fast path applies Qwen3's q/k norm through LMCache's per-model `_process_qkv` (its own code
    here): without it, Qwen3's K/V are far off, and nothing changes for the models without one."""
    for arch, r in fast_path_on_vllm.items():
        if arch == "qwen3":
            assert r["no_qk_norm"] > 0.1, r
        else:
            assert r["no_qk_norm"] == r["ratio_1"], (arch, r)


@pytest.mark.model
@pytest.mark.parametrize("arch", list(tc.ARCHS))
def test_the_fast_path_on_vllms_model_classes_answers_as_the_reference(fast_path_on_vllm, arch):
    """Chunks moved (a QA prompt of about 2.5K tokens, 4 chunks), ratio 0 and 0.15: the next token's
    top-20 KL to the float32 CPU reference's blend is float32 rounding, and the first token agrees."""
    r = fast_path_on_vllm[arch]
    assert r["tokens"] > 2000
    for check in ("moved_r0", "moved_r0.15"):
        assert r[check]["kl"] < 1e-6 and r[check]["first_token_agrees"], (check, r[check])


@pytest.mark.model
def test_negative_control_lmcaches_rerotation_fails_llama31_on_vllms_model(fast_path_on_vllm):
    r = fast_path_on_vllm["llama31"]
    print(f"llama31 moved_r0 on vLLM's model: KL {r['moved_r0']['kl']:.2e} served RoPE, "
          f"{r['negative_control_moved_r0']['kl']:.4f} LMCache's")
    assert r["negative_control_moved_r0"]["kl"] > 0.05
    assert r["negative_control_moved_r0"]["kl"] > 1e4 * r["moved_r0"]["kl"]


# ------------------------------------------------------------------ vLLM's plugin loader
@pytest.mark.parametrize("case, load_model", [
    ("plain", "original"),
    ("no_lmcache", "refused: BlendRefused: kvblend: blending refused: this environment has lmcache "
                   "(not installed)"),
    ("moved_symbol", "refused: BlendRefused: kvblend: blending refused: ModuleNotFoundError: No module "
                     "named 'lmcache.integration'"),
])
@pytest.mark.slow  # a process each, about 7 s
def test_vllms_plugin_loader_survives_our_entry_point(case, load_model):
    out, _ = run_module("tests.vllm_plugin_loader", case)
    assert out["loader_returned"] and out["load_model"].startswith(load_model), out


@pytest.mark.slow
def test_the_pinned_pair_gets_every_patch_and_stores_only_what_asks():
    """vLLM 0.26 and LMCache 0.5.3's own Python code: every patch applies (the worker's load_model
    wrapped, LMCache's request reading, its blend), and LMCache's connector stores a request's
    segments only when it sends `lmcache.save` (a plain client's, or one with other LMCache keys, is
    not stored); without the plugin's reading, LMCache stores the plain client's (negative control)."""
    out, run = run_module("tests.vllm_plugin_loader", "pinned_pair")
    assert "kvblend plugin active" in run.stdout + run.stderr
    assert out["load_model"] == "wrapped" and out["save_wrapped"] and out["blend_wrapped"], out
    assert out["saved"] == {"plain client": False, "another lmcache key": False, "precompute": True}, out
    assert out["saved_unpatched"] == {"plain client": True}, out


@pytest.mark.slow
def test_negative_control_vllms_loader_lets_a_raising_plugin_through():
    """Why register() must never raise: vLLM's loader does not catch what a plugin's call raises."""
    run = subprocess.run([sys.executable, "-m", "tests.vllm_plugin_loader", "raising"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "RuntimeError: a plugin that raises" in run.stderr, run.stderr[-2000:]


# ------------------------------------------------------------------ vLLM's tensor-parallel group
@pytest.mark.slow  # two vLLM processes, about 13 s
def test_ranks_in_vllms_tensor_parallel_group_select_as_one_rank():
    """The fast path finds vLLM's group itself; through it the fast path's and the mended blender's
    selections on each rank are the one-rank selection. Negative control: each rank alone (no
    all-reduce) selects other tokens than the other rank."""
    out, _ = run_module("tests.vllm_tp")
    for r in out["ranks"]:
        assert r["tp_world_size"] == 2 and r["found_vllms_group"], r
        assert r["fast"] == out["one_rank"] and r["mended"] == out["one_rank"], r
    assert out["ranks"][0]["alone"] != out["ranks"][1]["alone"]
