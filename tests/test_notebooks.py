"""Every notebook, run top to bottom by papermill on the embedded backend at small sizes (as a
headless user would, `INTERACTIVE = False`), checked through the results JSON its `results` cell
shows and the Plotly figures left in its outputs. Plus: notebooks are committed without outputs.

The engines run on free ports with their pid files in a temporary folder, so engines someone else
runs on :8000/:8001 are left alone. Notebook 01 starts them (the path a user without `make lab`
takes), 03 connects to them, and they are stopped at the end. Executed notebooks are kept in
tests/artifacts/ for a look after a failure.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from helpers import engines as eng
from helpers import runtime

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ARTIFACTS = ROOT / "tests" / "artifacts"
PLOTLY = "application/vnd.plotly.v1+json"
JSON = "application/json"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module", autouse=True)
def kernels_import_this_checkout():
    """The kernels import `helpers` from this checkout, even where another one is pip-installed."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def engine_ports(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("engines")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVBLEND_RUN_DIR", str(run_dir))  # read by the kernels and the engines they start
    mp.setattr(runtime, "RUN_DIR", run_dir)  # so that this process stops them
    blend, full = free_ports(2)
    yield {"BACKEND": "embedded", "BLEND_PORT": blend, "FULL_PORT": full}
    eng.stop()
    mp.undo()


def execute(name: str, **params) -> tuple[dict, nbformat.NotebookNode]:
    """Run notebooks/<name> with `params`; return its results (the JSON output of its cell tagged
    `results`) and the executed notebook."""
    import papermill as pm
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        pytest.fail(f"No 'python3' Jupyter kernel: run `{sys.executable} -m ipykernel install --sys-prefix "
                    "--name python3` (`make setup` does).")
    ARTIFACTS.mkdir(exist_ok=True)
    nb = pm.execute_notebook(
        ROOT / "notebooks" / name, ARTIFACTS / name, kernel_name="python3", cwd=str(ROOT / "notebooks"),
        parameters={**params, "INTERACTIVE": False}, progress_bar=False, execution_timeout=300)
    return results(nb), nb


def results(nb) -> dict:
    """The JSON output of the executed notebook's cell tagged `results` (`tutorial.report`)."""
    cells = [c for c in nb.cells if "results" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'results'"
    found = [out.data[JSON] for out in cells[0].get("outputs", []) if JSON in out.get("data", {})]
    assert found, f"the 'results' cell shows no {JSON} output: {cells[0].get('outputs')}"
    return found[-1]


def outputs(nb, kind: str) -> list:
    """Every output of `kind` (a MIME type, or "stream" for printed text) in the executed notebook."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "stream" and out.output_type == "stream":
                found.append(out.text)
            elif kind in out.get("data", {}):
                found.append(out.data[kind])
    return found


@pytest.mark.slow
def test_01_quickstart(engine_ports):
    res, nb = execute("01_quickstart.ipynb", **engine_ports, START_ENGINES=True, MAX_TOKENS=12,
                      CHUNKS=["encoder_flac", "filter_amix"],
                      QUESTION="What range of compression levels does the FLAC encoder accept?")
    assert res["backend"] == "embedded"
    first, second = res["history"]
    assert first["retrieved"] and first["order"][0] == "encoder_flac"  # the question's top chunk first
    assert len(first["order"]) == 2  # TOP_K: as many chunks as CHUNKS holds
    assert not second["retrieved"] and second["order"] == first["order"][::-1]  # the scripted drag
    assert 0 < first["blend"]["n_recomputed"] < first["blend"]["prompt_tokens"]  # reused the rest
    for rec in (first, second):
        for e in ("blend", "full"):
            assert rec[e]["error"] is None and rec[e]["text"].strip(), rec
            assert rec[e]["ttft_s"] > 0
    assert res["ttft_ratio"] > 1, res  # blend answers first, even sharing the cores with full
    assert len(outputs(nb, PLOTLY)) >= 1


@pytest.mark.slow
def test_02_how_blending_works():
    res, nb = execute("02_how_blending_works.ipynb", N_TOKENS=900, QA_ITEMS=2, MAX_NEW_TOKENS=8)
    assert res["ttft_ratio"] > 1, res
    sweep = {(r["method"], r["ratio"]): r for r in res["sweep"]}
    assert sweep[("blend", 1.0)]["kl"] < 1e-3  # recomputing everything is a full prefill
    assert sweep[("blend", 0)]["ttft_ms"] < sweep[("full", 1.0)]["ttft_ms"]
    assert all(a.strip() for r in res["sweep"] for a in r["answers"])
    assert res["kl_next_token"]["full"] == 0
    assert len(outputs(nb, PLOTLY)) >= 4  # next token, RoPE, deviation, sweep


@pytest.mark.slow
def test_03_benchmark(engine_ports, tmp_path):
    csv = ARTIFACTS / "03_benchmark.csv"
    gpu_csv = tmp_path / "gpu_ttft.csv"  # an older format (no run columns): the GPU section runs too
    gpu_csv.write_text("model_shape,card,target_tokens,prompt_tokens,full_ttft_ms,blend_ttft_ms,speedup\n"
                       "7b,2x H200,4000,4100,310.5,120.2,2.58\n7b,2x H200,8000,8150,720.0,210.0,3.43\n")
    res, nb = execute("03_benchmark.ipynb", **engine_ports, SIZES=[500, 1500], REPEATS=2, CSV_PATH=str(csv),
                      GPU_CSV=str(gpu_csv), TRACE_QUESTIONS=3, TRACE_MAX_TOKENS=4,
                      LOAD_RATES=[0.5, 2.0], LOAD_SECONDS=2, LOAD_QUESTIONS=2, LOAD_TOP_K=1)
    assert res["backend"] == "embedded"
    assert res["speedup_largest"] > 1, res
    assert [s["tokens"] for s in res["summary"]] == sorted(s["tokens"] for s in res["summary"])
    assert len(csv.read_text().strip().splitlines()) == 1 + 2 * 2 * 2  # header + size x repeat x engine
    assert res["gpu_rows"] == 2
    assert res["recall_at_k"] >= 0.85  # BM25 top-4 over every QA question
    assert res["rag"]["questions"] == 3 and res["rag"]["mean_reuse"] > 0.5, res["rag"]
    assert [(r["engine"], r["rate"]) for r in res["load"]] == [(e, r) for e in ("blend", "full")
                                                                for r in (0.5, 2.0)]
    assert all(r["completed"] == r["sent"] >= 3 for r in res["load"]), res["load"]
    assert set(res["max_rate_under_limit"]) == {"blend", "full"}
    assert len(outputs(nb, PLOTLY)) >= 5  # TTFT boxes, speed-up, GPU TTFT, RAG trace, load


# ------------------------------------------------------------------ committed notebooks
def nbstripout(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbstripout", "--keep-id", *map(str, args)],
                          capture_output=True, text=True)


def test_notebooks_are_stripped():
    """Outputs are not committed: `make strip` (nbstripout --keep-id) fixes a failure here."""
    assert NOTEBOOKS, "no notebooks found"
    res = nbstripout("--verify", *NOTEBOOKS)
    assert res.returncode == 0, f"unstripped notebooks, run `make strip`:\n{res.stdout}{res.stderr}"


def test_strip_check_catches_outputs(tmp_path):
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("stream", text="hello")]
    cell.execution_count = 1
    nbformat.write(nb, tmp_path / "dirty.ipynb")
    assert nbstripout("--verify", tmp_path / "dirty.ipynb").returncode != 0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_thin(path):
    """A `parameters` cell with an INTERACTIVE flag, a last cell tagged `results` that reports them;
    no functions or classes defined in cells."""
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "INTERACTIVE" in params[0].source
    assert "results" in nb.cells[-1].metadata.get("tags", []) and "tutorial.report(" in nb.cells[-1].source
    for c in nb.cells:
        if c.cell_type == "code":
            assert not any(line.startswith(("def ", "class ")) for line in c.source.splitlines()), c.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_teach(path):
    """Objectives first; a recap and two or three exercises at the end (before the results cells)."""
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "**What you will learn**" in nb.cells[0].source
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "## Recap" in text and "## Exercises" in text
    exercises = text.split("## Exercises", 1)[1].split("\n## ", 1)[0]
    numbered = [line for line in exercises.splitlines() if line[:3] in ("1. ", "2. ", "3. ", "4. ")]
    assert 2 <= len(numbered) <= 3
