"""The conformance suite on the device (`pytest -m gpu`): every architecture and RoPE variant the GPU
path accepts, as a tiny checkpoint (scripts/tiny_checkpoints.py), served by the fast path on one GPU
and compared with the CPU float32 reference on the same ids (scripts/gpu_conformance.py). Skipped,
with the reason, without a GPU, vLLM or LMCache. Needs no weights: the checkpoints are written here.

Seven checkpoints, two blend engines each (ratio 0 at check layer 0, ratio 0.15), four checkpoints'
engines starting together (estimated at 5-7 minutes on one H100, not yet timed). With
`KVBLEND_GPU_OUT=DIR` the rows go to DIR/conformance/conformance.csv
(docs/benchmarks/gpu_conformance.csv holds the published ones).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from .conftest import gpu_stack_missing

ROOT = Path(__file__).resolve().parents[2]


def missing() -> str | None:
    return gpu_stack_missing()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(missing() is not None, reason=str(missing()))]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict:
    """{(architecture, check): row} from one run of the device harness."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_conformance

    os.environ.setdefault("KVBLEND_SHARE_GPU", "1")
    base = os.environ.get("KVBLEND_GPU_OUT")
    out = Path(base) / "conformance" if base else tmp_path_factory.mktemp("conformance")
    return {(r["architecture"], r["check"]): r for r in gpu_conformance.device(out)}


def archs():
    sys.path.insert(0, str(ROOT / "scripts"))
    import tiny_checkpoints

    return list(tiny_checkpoints.ARCHS)


@pytest.mark.parametrize("arch", archs())
def test_blending_matches_the_cpu_reference(rows, arch):
    """Nothing moves, chunks moved at ratio 0 (every layer past the first reads re-rotated K) and at
    0.15: within the bf16 floor's bound of the float32 reference, first tokens agreeing."""
    failures = []
    for check in ("same_pos", "moved_r0", "moved_r0.15"):
        r = rows.get((arch, check))
        if r is None:
            failures.append(f"{check}: no row (engine did not start?)")
            continue
        n = r["prompts"]
        if not (r["top20_kl"] <= r["threshold"] and r["first_token_agree"] * n >= n - 1):
            failures.append(f"{check}: KL {r['top20_kl']:.5f} (bound {r['threshold']:.5f}, floor "
                            f"{r['floor']:.5f}), first tokens {r['first_token_agree']:.2f} of {n}")
    assert not failures, f"{arch}: " + "; ".join(failures)


def test_negative_control_fails(rows):
    """Llama-3.1 re-rotated with unscaled frequencies (LMCache's way), on the CPU: far off the bound."""
    r = rows[("llama31", "negative_control_moved_r0")]
    assert r["top20_kl"] > 4 * r["threshold"], r  # 0.106 against 0.011 on the CPU
