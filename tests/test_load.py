"""The load sweep (`python -m helpers.bench load`): its statistics, a dead engine counted as failed
requests (never as completed), and a CI-sized sweep on the embedded engines."""

import asyncio

import pytest

from helpers import bench, load
from helpers.runtime import Engine
from tests.conftest import free_port


def test_percentiles_interpolate_between_ranks():
    assert load.percentile([], 50) is None
    assert load.percentile([3.0], 99) == 3.0
    assert load.percentile([1, 2, 3, 4], 50) == 2.5
    assert load.percentile(list(range(101)), 99) == pytest.approx(99)


def test_the_best_rate_needs_p99_under_the_limit_and_no_failure():
    rows = [{"engine": "blend", "rate": 1, "failed": 0, "ttft_p99_s": 0.5},
            {"engine": "blend", "rate": 2, "failed": 0, "ttft_p99_s": 1.5},
            {"engine": "blend", "rate": 4, "failed": 0, "ttft_p99_s": 3.0},
            {"engine": "full", "rate": 1, "failed": 1, "ttft_p99_s": 0.5},
            {"engine": "full", "rate": 2, "failed": 0, "ttft_p99_s": 2.5}]
    assert load.max_rate_under(rows, 2.0) == {"blend": 2, "full": None}
    assert "blend 2/s, full: none of these rates" in load.format_summary(rows, 2.0)


def test_a_dead_engine_is_failed_requests_not_completed_ones():
    dead = Engine("blend", free_port(), "embedded")
    row = asyncio.run(load.run_rate(dead, "smollm2", [[{"role": "user", "content": "hi"}]], 10, 0.3,
                                    timeout=5))
    assert row["sent"] == 3 and row["completed"] == 0 and row["failed"] == 3
    assert row["ttft_p99_s"] is None and row["errors"] == ["APIConnectionError"]
    assert "failed: APIConnectionError" in load.format_row(row)


def test_bad_rates_exit_2_in_one_line(capsys):
    assert bench.main(["load", "--rates", "1,fast"]) == 2
    assert bench.main(["load", "--rates", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--rates" in err[0] and "--rates" in err[1]


@pytest.mark.slow
def test_a_ci_sized_sweep_on_the_embedded_engines(live_engines):
    engines = (live_engines["blend"], live_engines["full"])
    rows = load.sweep(engines, [0.5, 2], seconds=2, k=1, max_tokens=3, questions=2, log=None)
    assert [(r["engine"], r["rate"]) for r in rows] == [("blend", 0.5), ("blend", 2), ("full", 0.5),
                                                         ("full", 2)]
    for r in rows:
        assert r["sent"] >= 3 and r["completed"] == r["sent"] and r["failed"] == 0, r
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and r["itl_ms"] > 0 and r["completed_per_s"] > 0
    best = load.max_rate_under(rows, 1e6)
    assert best == {"blend": 2, "full": 2}
