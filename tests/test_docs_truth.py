"""The docs tell the current truth: every GPU figure the README, docs/gpu.md and the notebooks
publish is one the measurement CSVs in docs/benchmarks/ hold (so a new run cannot leave stale text
behind), and no tracked file talks about how the project was developed instead of what it is."""

import csv
import json
import re
import subprocess
from pathlib import Path

from helpers import gpu_results

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "benchmarks"
README = (ROOT / "README.md").read_text()
GPU_MD = (ROOT / "docs" / "gpu.md").read_text()
TTFT = list(csv.DictReader((BENCH / "gpu_ttft.csv").open(newline="")))
QUALITY = list(csv.DictReader((BENCH / "gpu_quality.csv").open(newline="")))
BLEND_PATHS = ("fast", "fixed", "upstream")  # what --blend-path accepts

# ------------------------------------------------------------------ development-process words
PROCESS_WORDS = re.compile(
    r"\b(?:sessions?|issues?) ?#?[0-9]+|\bdevice (?:asks?|time|budget)|\bbudget(?:_left| left)\b"
    r"|\b(?:the|its|call's) carry\b|\bcarry (?:sizes?|limit)\b|\bnext run\b|\bstaging\b",
    re.IGNORECASE)
SKIP = {"tests/test_docs_truth.py"}  # this file names the words it looks for
SKIP_SUFFIXES = (".png", ".jpg", ".gguf", ".whl")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if p not in SKIP and not p.endswith(SKIP_SUFFIXES)]


def process_words(paths) -> list[str]:
    """`path:line: words` for every line of `paths` with a development-process word."""
    found = []
    for rel in paths:
        path = ROOT / rel
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            hits = PROCESS_WORDS.findall(line)
            if hits:
                found.append(f"{rel}:{n}: {', '.join(dict.fromkeys(hits))}")
    return found


def test_no_development_process_words():
    """Every tracked file (code, docs, CSVs, notebooks) cites a measurement by date, card and commit;
    history lives in commit messages."""
    found = process_words(tracked_files())
    assert not found, "development-process words:\n" + "\n".join(found)


def test_process_word_pattern_catches_them():
    for text in ("as in session 5", "issue 10's targets", "the device asks", "its carry", "Issue #9",
                 "300 s of budget left"):
        assert PROCESS_WORDS.search(text), text
    for text in ("a chunk carries its prefix", "elements carry stable ids", "disk budget of --cache-dir",
                 "--budget-s 200"):
        assert not PROCESS_WORDS.search(text), text


# ------------------------------------------------------------------ the CSVs themselves
def test_csvs_name_their_runs():
    runs = {p.name for p in (BENCH / "runs").iterdir() if p.is_dir()}
    for rows in (TTFT, QUALITY):
        for r in rows:
            assert r["run_id"] in runs and r["run_id"].startswith(r["date"]), r
            assert re.fullmatch(r"[0-9a-f]{7,40}", r["commit"]) and r["card"] and r["setup"], r
            assert r["blend_path"] in BLEND_PATHS + ("",), r
    assert all(r["blend_path"] in BLEND_PATHS for r in TTFT)
    conformance = BENCH / "gpu_conformance.csv"
    for r in csv.DictReader(conformance.open(newline="")) if conformance.exists() else []:
        assert r["run_id"] in runs and r["run_id"].startswith(r["date"]), r
        assert re.fullmatch(r"[0-9a-f]{7,40}", r["commit"]) and r["card"], r
    for run in runs:  # every run folder has a README from the template
        text = (BENCH / "runs" / run / "README.md").read_text()
        for field in ("| date |", "| card |", "| commit |", "| command |", "| measures |", "| backs |"):
            assert field in text, (run, field)
    log = (BENCH / "LOG.md").read_text()
    assert all(f"runs/{run}/" in log for run in runs), "a run folder the log does not cite"


# ------------------------------------------------------------------ published figures
def k_matches(row: dict, k: str) -> bool:
    """'8K' names a prompt of ~8.1K tokens (target 8192) or '8.1K' one of 8,127."""
    k = float(k)
    return abs(int(row["prompt_tokens"]) / 1000 - k) <= 0.15 or int(row["target_tokens"]) == round(k * 1024)


def speedup_claims(text: str) -> list[tuple[str, str]]:
    return re.findall(r"(\d+\.\d\d)x at (\d+(?:\.\d)?)K", text)


def test_speedups_quoted_exist_in_the_csv():
    """Every 'N.NNx at MK' of the README, docs/gpu.md and the notebooks is a row of gpu_ttft.csv."""
    texts = {"README.md": README, "docs/gpu.md": GPU_MD,
             **{p.name: "".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"])
                for p in (ROOT / "notebooks").glob("*.ipynb")}}
    bad = [f"{name}: {x}x at {k}K" for name, text in texts.items() for x, k in speedup_claims(text)
           if not any(float(r["speedup"]) == float(x) and k_matches(r, k) for r in TTFT)]
    assert not bad, "speed-ups no run in docs/benchmarks/gpu_ttft.csv measured:\n" + "\n".join(bad)


def test_gpu_md_tables_are_csv_rows():
    """'ms (Nx)' cells of docs/gpu.md's speed tables and 'KL / agree' cells of its quality table."""
    pairs = re.findall(r"(\d+\.\d) \((\d+\.\d\d)x\)", GPU_MD)
    assert len(pairs) >= 20
    for ms, x in pairs:
        assert any(float(r["blend_ttft_ms"]) == float(ms) and float(r["speedup"]) == float(x)
                   for r in TTFT), (ms, x)
    kl = re.findall(r"(0\.\d{4}) / (\d+)", GPU_MD)
    assert len(kl) >= 15
    for value, agree in kl:
        assert any(float(r["top20_kl_mean"]) == float(value) and r["first_token_agree"] == agree
                   for r in QUALITY), (value, agree)


def latest(card: str, shape: str, path: str) -> list[dict]:
    rows = gpu_results.latest_runs(gpu_results.load_gpu_csv(BENCH / "gpu_ttft.csv"))
    rows = [r for r in rows if r["card"] == card and r["shape"].startswith(shape) and r["blend_path"] == path]
    return sorted(rows, key=lambda r: r["tokens"])


def test_readme_quotes_the_latest_h200_run():
    fast, upstream = latest("H200", "7B", "fast"), latest("H200", "7B", "upstream")
    assert fast and upstream
    for r in fast:
        assert f"{r['speedup']:.2f}x at " in README, r
    for r in latest("H200", "34B", "fast"):
        assert f"{r['speedup']:.2f}x" in README, r
    assert f"2026-12-07, commit `{fast[0]['commit']}`" in README
    for rows, what in ((fast, "fast path"), (upstream, "LMCache's blender")):
        cross = gpu_results.crossover(rows)
        assert f"about {cross / 1000:.1f}K" in README, (what, cross)
    assert f"{fast[2]['speedup']:.2f}x at 8K tokens on an H200" in README  # the --blend-path row


def q(run_suffix: str, engine: str, prompt_set: str = "qa", prompts: str = "121") -> float:
    rows = [r for r in QUALITY if r["run_id"].endswith(run_suffix) and r["engine"] == engine
            and r["prompt_set"] == prompt_set and r["prompts"] == prompts]
    assert len(rows) == 1, (run_suffix, engine, prompt_set)
    return float(rows[0]["top20_kl_mean"])


def test_readme_quality_figures_are_csv_rows():
    gpu, cpu, old = "h100_smollm2_quality-alone", "cpu_smollm2_quality-121", "h200_smollm2_quality-121"
    figures = {q(gpu, "fast_0.15"), q(gpu, "upstream_0.15"), q(gpu, "fast_0.15", "same_pos"),
               q(gpu, "full_fp32", "same_pos"), q(cpu, "blend_0.15"), q(cpu, "naive_reuse"),
               q(old, "fast_0.15")}
    for value in figures:
        assert f"{value:.4f}" in README, value
    quoted = {float(v) for v in re.findall(r"\b0\.0\d{3}\b", README)}
    assert quoted <= figures, f"KL figures in the README no quality row backs: {quoted - figures}"
    gain = q(cpu, "naive_reuse") / q(cpu, "blend_0.15")
    assert f"{gain:.1f}x smaller" in README


def test_gpu_md_is_for_users():
    assert len(GPU_MD.splitlines()) <= 300


def test_store_size_of_the_published_numbers_is_said():
    assert "--gpu-kv-store-gb 6" in README and "--gpu-kv-store-gb 6" in GPU_MD


def scale_out_tables(readme: str) -> tuple[list[tuple], list[tuple]]:
    """The README's scale-out tables: (replica, seconds, computed) and (rate, p50 blend, p50 full,
    p99 blend, p99 full, done/s blend, done/s full)."""
    section = readme[readme.index("## Scale out"):readme.index("## Layout")]
    warm = re.findall(r"^\| (?:through|then) (blend-\d)[^|]*\| ([\d.]+) s[^|]*\| (\d+) \|$", section, re.M)
    num = r"([\d.]+)"
    load = re.findall(rf"^\| {num} \| {num} s / {num} s \| {num} s / {num} s \| {num} / {num} \|$", section,
                      re.M)
    return warm, load


def test_readme_scale_out_numbers_are_csv_rows():
    """Every number of the README's scale-out tables is a row of the run's CSV (scripts/scale_out.py
    --csv), so a new run cannot leave stale text behind."""
    readme = (ROOT / "README.md").read_text()
    warm, load = scale_out_tables(readme)
    assert len(warm) == 2 and len(load) >= 2, (warm, load)
    with open(ROOT / "docs" / "benchmarks" / "cpu_scale_out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seen = {(r["engine"], f"{float(r['seconds']):.1f}", r["computed"])
            for r in rows if r["measure"] == "warm"}
    for replica, seconds, computed in warm:
        assert (replica, seconds, computed) in seen, (replica, seconds, computed)
    by = {(r["engine"], float(r["rate"])): r for r in rows if r["measure"] == "load"}
    for rate, p50b, p50f, p99b, p99f, cb, cf in load:
        b, f_ = by[("blend", float(rate))], by[("full", float(rate))]
        keys = ("ttft_p50_s", "ttft_p99_s", "completed_per_s")
        got = [f"{float(r[k]):.2f}" for k in keys for r in (b, f_)]
        assert got == [p50b, p50f, p99b, p99f, cb, cf], (rate, got)


def test_scale_out_check_sees_a_stale_number():
    readme = "## Scale out\n| 0.5 | 0.87 s / 6.68 s | 1.85 s / 14.95 s | 0.46 / 0.21 |\n## Layout"
    assert scale_out_tables(readme)[1] == [("0.5", "0.87", "6.68", "1.85", "14.95", "0.46", "0.21")]


# ------------------------------------------------------------------ the conformance table
CONFORMANCE = BENCH / "gpu_conformance.csv"
PASSED_ON = re.compile(r"conformance-tested on (\w+), (\d{4}-\d\d-\d\d)")


def which_models(md: str) -> dict[str, str]:
    """{checkpoint: status} of docs/gpu.md's 'Which models' table."""
    return dict(re.findall(r"^\|[^|\n]*\|[^|\n]*\| `(\w+)` \| ([^|\n]*?) \|$", md, re.M))


def unbacked_claims(md: str, rows: list[dict]) -> list[str]:
    """Statuses that say a checkpoint passed on a card and date without its three passed checks of
    that card and date in the CSV, or that say nothing of a device while the CSV has one's rows."""
    passed = {(r["architecture"], r["card"], r["date"], r["check"]) for r in rows if r["passed"] == "True"}
    served = {r["architecture"] for r in rows if r["card"] != "CPU"}
    bad = []
    for ckpt, status in which_models(md).items():
        claim = PASSED_ON.fullmatch(status)
        checks = ("same_pos", "moved_r0", "moved_r0.15")
        if claim and not all((ckpt, *claim.groups(), c) in passed for c in checks):
            bad.append(f"{ckpt}: {status}")
        if not claim and ckpt in served:
            bad.append(f"{ckpt}: '{status}' while the CSV has its device rows")
    return bad


def test_which_models_table_is_the_conformance_csv():
    """Every checkpoint of scripts/tiny_checkpoints.py has a row of docs/gpu.md's 'Which models'
    table; 'conformance-tested on CARD, DATE' is three passed checks of the CSV; its negative control
    (Llama-3.1 re-rotated with unscaled frequencies) failed."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import tiny_checkpoints

    assert set(which_models(GPU_MD)) == set(tiny_checkpoints.ARCHS), which_models(GPU_MD)
    rows = list(csv.DictReader(CONFORMANCE.open(newline=""))) if CONFORMANCE.exists() else []
    assert not unbacked_claims(GPU_MD, rows)
    negative = [r for r in rows if r["check"].startswith("negative_control")]
    assert all(r["passed"] == "False" for r in negative) and (negative or not rows), negative


def test_conformance_check_sees_an_unbacked_claim():
    rows = [{"architecture": "qwen3", "card": "H100", "date": "2026-12-08", "check": c, "passed": p}
            for c, p in (("same_pos", "True"), ("moved_r0", "False"), ("moved_r0.15", "True"))]
    md = "| Qwen3 (q/k norm) | default | `qwen3` | conformance-tested on H100, 2026-12-08 |\n"
    assert which_models(md) == {"qwen3": "conformance-tested on H100, 2026-12-08"}
    assert unbacked_claims(md, rows)  # one check failed
    rows[1]["passed"] = "True"
    assert unbacked_claims(md, rows) == []
    assert unbacked_claims(md.replace("12-08", "12-07"), rows)  # another run's date
    assert unbacked_claims("| Qwen3 | default | `qwen3` | CPU reference; not yet served on a GPU |\n", rows)
