"""benchmarks/bench_async.py --smoke: the long-tail benchmark's plumbing end to end (warm-up,
warm-start profile, a sync and an async run through `rlpipe run` with the local sampler), two
steps each. The figures themselves come from the benchmark, not from here."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_async", REPO / "benchmarks" / "bench_async.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_async"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # starts the roles of two runs
def test_smoke_runs_sync_and_async_and_tabulates(tmp_path, capsys):
    bench = load_bench()
    results = bench.main(["--smoke", "--settings", "sync,async2", "--out", str(tmp_path)])
    assert [r["name"] for r in results] == ["sync", "async2"]
    for r in results:
        assert len(r["steps"]) == 2 and all(s["tokens"] > 0 for s in r["steps"])
        assert r["busy"] is not None and 0 <= r["idle"] <= 1
    assert results[0]["lag_max"] == 0  # max_staleness = 0 trains nothing stale
    out = capsys.readouterr().out
    assert "warm start on 8 samples" in out and "| sync |" in out and "| async2 |" in out
    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert {r["setting"] for r in rows} == {"sync", "async2"} and len(rows) == 4
    assert (tmp_path / "results.md").read_text().count("\n| ") == 3  # the header row and two settings


def test_time_to_threshold_needs_a_window_of_steps():
    bench = load_bench()
    result = {"launch": 0.0, "steps": [{"time_end": t, "reward": r, "tokens": 10}
                                        for t, r in ((1, 0.9), (2, 0.1), (3, 0.6), (4, 0.6), (5, 0.7))]}
    assert bench.time_to(result, 0.5) == 3  # (0.9 + 0.1 + 0.6) / 3 >= 0.5 at the third step
    assert bench.time_to(result, 0.63) == 5  # (0.6 + 0.6 + 0.7) / 3
    assert bench.time_to(result, 0.9) is None  # the first step alone is no window
    steps_per_s, tokens_per_s = bench.rates(result)
    assert steps_per_s == pytest.approx(1.0) and tokens_per_s == pytest.approx(10.0)


def test_lag_is_token_weighted_where_the_learner_logs_it_else_per_sample():
    bench = load_bench()
    per_token = [{"staleness/mean": 1.0, "tokens/sampled": 100, "staleness/max": 3},
                 {"staleness/mean": 0.0, "tokens/sampled": 300, "staleness/max": 1}]
    assert bench.lag_figures(per_token) == (0.25, 3)
    assert bench.lag_figures([{"staleness/0": 3.0, "staleness/2": 1.0, "staleness/max": 2.0}]) == (0.5, 2.0)
