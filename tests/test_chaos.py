"""Killing roles with SIGKILL during a real `rlpipe run` costs restarts, never data.

One run (real processes, real sockets, the real sampler): the buffer, then the learner, then
the explorer, then the vLLM engine core inside the explorer are killed at steps drawn at
random (the seed is printed). The run must reach its step count by itself, `rlpipe stats`
must show no group lost and each restart counted, and the optimizer must have taken exactly
the configured number of steps. The same run checks that checkpoints are pruned and that a
second `rlpipe run` into the directory is refused without --resume.
"""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from rlpipe.metrics import read_metrics
from rlpipe.pipeline.launch import group_members
from rlpipe.pipeline.learner import latest_checkpoint
from tests.test_pipeline import SAMPLER, assert_no_orphans, rlpipe, write_config

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

STEPS = 36
KEEP = 2


def wait_for_step(run_dir: Path, proc, step: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_metrics(run_dir / "metrics.jsonl")
        if records and records[-1]["step"] >= step:
            return
        assert proc.poll() is None, "the run ended early"
        assert time.monotonic() < deadline, f"step {step} not reached within {timeout_s} s"
        time.sleep(0.1)


def role_pid(run_dir: Path, role: str) -> int:
    return json.loads((run_dir / "pids.json").read_text())[role]


def engine_core(explorer_pid: int) -> int:
    for pid in group_members(explorer_pid):
        if pid != explorer_pid and "EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") \
                + Path(f"/proc/{pid}/comm").read_text():
            return pid
    raise AssertionError(f"no vLLM engine core among the explorer's processes {group_members(explorer_pid)}")


@pytest.mark.skipif(SAMPLER != "vllm", reason="the engine-core kill needs vLLM")
def test_sigkill_of_every_role_loses_nothing(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    # Four kills at increasing random steps, each after the previous restart has trained a step.
    bounds = [(3, 6), (10, 13), (17, 20), (24, 27)]
    at = [rng.randint(lo, hi) for lo, hi in bounds]
    config = write_config(tmp_path, "chaos", steps=STEPS, checkpoint_every=3, sampler=SAMPLER,
                          extra=["[supervision]", "backoff_s = 0.5", "heartbeat_timeout_s = 60"],
                          learner_lines=[f"keep_checkpoints = {KEEP}"])
    run_dir = tmp_path / "chaos"
    proc = rlpipe("run", config, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_step(run_dir, proc, at[0])
        os.kill(role_pid(run_dir, "buffer"), signal.SIGKILL)
        wait_for_step(run_dir, proc, at[1])
        killed_learner = role_pid(run_dir, "learner")
        os.kill(killed_learner, signal.SIGKILL)
        wait_for_step(run_dir, proc, at[2])
        os.kill(role_pid(run_dir, "explorer"), signal.SIGKILL)
        wait_for_step(run_dir, proc, at[3])
        os.kill(engine_core(role_pid(run_dir, "explorer")), signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.communicate(timeout=60)
    out = out.decode()
    assert proc.returncode == 0, f"seed {seed}, kills at {at}:\n{out[-4000:]}"
    for role in ("buffer", "learner", "explorer"):
        assert f"role {role} died" in out, out[-3000:]

    stats = json.loads(subprocess.run([*rlpipe_cmd(), "stats", str(run_dir), "--json"], capture_output=True,
                                      check=True, text=True).stdout)
    print(subprocess.run([*rlpipe_cmd(), "stats", str(run_dir)], capture_output=True, check=True, text=True).stdout)
    assert stats["lost"] == 0, stats
    assert stats["identity_holds"], stats
    assert stats["explorers"]["finished"] > 0
    assert stats["restarts"] == {"buffer": 1, "learner": 1, "explorer": 1}, stats
    assert stats["learner"]["steps"] == STEPS
    explorer_stats = json.loads((run_dir / "explorer-0" / "stats.json").read_text())
    assert explorer_stats.get("engine_restarts", 0) >= 1, explorer_stats

    # The optimizer took exactly STEPS steps across the learner restart (Adam's own count).
    latest = latest_checkpoint(run_dir)
    adam = torch.load(Path(latest["path"]) / "optimizer.pt", weights_only=False)
    assert {int(s["step"]) for s in adam["state"].values()} == {STEPS}
    # After the learner restart every batch came from the new incarnation's adapters.
    records = read_metrics(run_dir / "metrics.jsonl")
    second = [r for r in records if r["learner/incarnation"] == 2]
    assert second and all(r["explorer/incarnation_min"] == 2 for r in second)
    # Pruning: only the newest checkpoints stay; compaction: the store keeps only the groups
    # after the learner's last checkpointed position, not all that were accepted.
    assert len(list((run_dir / "learner" / "state").glob("step-*"))) == KEEP
    assert stats["buffer"]["in_store"] < stats["buffer"]["accepted"] / 2, stats["buffer"]
    assert not list((run_dir / "explorer-0" / "adapters").glob("v*"))  # the engine keeps its own copies
    assert_no_orphans(run_dir)

    # The directory holds a run now: starting into it again without --resume is refused.
    again = subprocess.run([*rlpipe_cmd(), "run", str(config)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr


def rlpipe_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "rlpipe.cli"]
