"""Many explorers, one admission budget, through `rlpipe run` with `explorer.count = 3`: the
buffer's global budget (rlpipe/pipeline/admission.py) keeps stale drops rare at
max_staleness = 1, every explorer follows the learner's weights, nothing is lost, and an
explorer that is frozen or killed does not stop the others (a killed one is restarted alone).

The local sampler stands in for vLLM (three vLLM engines do not fit two CPU cores): the
budget does not depend on the engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from pathlib import Path

from rlpipe.metrics import read_metrics
from rlpipe.pipeline.launch import read_restarts
from rlpipe.pipeline.stats import run_stats
from tests.test_pipeline import rlpipe, write_config

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

EXPLORERS = 3
MAX_STALE_SHARE = 0.05


def stale_share(run_dir: Path) -> tuple[float, dict]:
    """Groups dropped as stale / groups received by the buffer (rlpipe stats)."""
    buffer = run_stats(run_dir)["buffer"]
    return buffer["dropped"].get("stale", 0) / max(1, buffer["received"]), buffer


def start_run(tmp_path, name: str, steps: int, *sets: str) -> tuple[subprocess.Popen, Path]:
    config = write_config(tmp_path, name, sampler="local", max_staleness=1, steps=steps)
    sets = [f"explorer.count={EXPLORERS}", "supervision.backoff_s=0.5", *sets]
    proc = rlpipe("run", config, *(a for s in sets for a in ("--set", s)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, tmp_path / name


def finish(proc: subprocess.Popen, timeout_s: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(f"the run did not finish:\n{out.decode()[-3000:]}") from None
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode()


def wait_for_step(run_dir: Path, step: int, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
        if records and records[-1]["step"] >= step:
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"the learner did not reach step {step} within {timeout_s:.0f} s")


def pid_of(run_dir: Path, role: str) -> int:
    return json.loads((run_dir / "pids.json").read_text())[role]


def assert_nothing_lost(run_dir: Path) -> dict:
    stats = run_stats(run_dir)
    assert stats["lost"] == 0 and stats["identity_holds"], stats
    return stats


def test_three_explorers_share_one_budget(tmp_path):
    steps = 8
    start = time.monotonic()
    # Each explorer placed on its own device by the run config (the CPU here: no GPUs).
    proc, run_dir = start_run(tmp_path, "three", steps, 'explorer.devices=["cpu", "cpu", "cpu"]')
    finish(proc)
    share, buffer = stale_share(run_dir)
    print(f"3 explorers, max_staleness 1, {steps} steps in {time.monotonic() - start:.0f} s: "
          f"{buffer['received']} groups received, {buffer['dropped']} dropped -> stale share {share:.1%}")
    assert share <= MAX_STALE_SHARE, buffer
    stats = assert_nothing_lost(run_dir)
    assert sorted(stats["explorers"]["by_explorer"]) == [f"explorer-{i}" for i in range(EXPLORERS)]
    for i in range(EXPLORERS):  # each explorer followed the learner to its last adapter
        explorer = json.loads((run_dir / f"explorer-{i}" / "stats.json").read_text())
        assert explorer["version"] == steps, (i, explorer)
        log = (run_dir / "logs" / f"explorer-{i}.log").read_text()
        assert f"explorer-{i}: sampling with version {steps}" in log
        assert "explorer.engine.device 'cpu': CUDA_VISIBLE_DEVICES=''" in log
        threads = max(1, len(os.sched_getaffinity(0)) // 2 // EXPLORERS)  # a share of the cores, not every core
        assert f"explorer explorer-{i}: {threads} CPU threads" in log
    admission = json.loads((run_dir / "buffer_stats.json").read_text())["admission"]
    assert sorted(admission["explorers"]) == [f"explorer-{i}" for i in range(EXPLORERS)]
    assert admission["granted"] >= buffer["received"] - 2 * EXPLORERS  # the groups started were granted


def test_a_frozen_and_a_killed_explorer_do_not_hold_the_others_back(tmp_path):
    steps = 12
    proc, run_dir = start_run(tmp_path, "faults", steps)
    wait_for_step(run_dir, 1, 90)
    os.killpg(pid_of(run_dir, "explorer-2"), signal.SIGKILL)  # dies: restarted alone
    frozen = pid_of(run_dir, "explorer-1")
    os.kill(frozen, signal.SIGSTOP)  # freezes holding its credits: they expire after the lease
    frozen_at = time.monotonic()
    try:
        step = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]
        reached = wait_for_step(run_dir, step + 3, 60)  # explorer-0 (and the restarted explorer-2) fill batches
        print(f"3 steps while explorer-1 was frozen and explorer-2 restarting: {reached - frozen_at:.1f} s")
        # explorer-0 frozen too, so the run cannot end (steps take under a second) before the
        # restarted explorer-2 follows the learner again; then it fills batches alone.
        os.kill(pid_of(run_dir, "explorer-0"), signal.SIGSTOP)
        log = run_dir / "logs" / "explorer-2.log"
        deadline = time.monotonic() + 60
        while log.read_text().count("explorer-2: sampling with version") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        step = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]
        assert step < steps, "the run ended before explorer-2 was back"
        wait_for_step(run_dir, step + 2, 60)
    finally:
        os.kill(frozen, signal.SIGCONT)
        os.kill(pid_of(run_dir, "explorer-0"), signal.SIGCONT)
    finish(proc)
    assert read_restarts(run_dir) == {"explorer-2": 1}
    stats = assert_nothing_lost(run_dir)
    share, buffer = stale_share(run_dir)
    print(f"with the faults: {buffer['received']} groups received, {buffer['dropped']} dropped -> stale share {share:.1%}")
    assert json.loads((run_dir / "explorer-2" / "stats.json").read_text())["version"] == steps
    assert stats["explorers"]["by_explorer"]["explorer-2"]["restarts"] == 1
