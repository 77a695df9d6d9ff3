"""The async pipeline end to end: real processes, real ZeroMQ sockets, the real sampler.

Each run uses fresh ports on 127.0.0.1 and its own run directory. The toy "digits" env gives
graded rewards even to the untrained tiny model, so runs need no warm-up.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import torch

from rlpipe.pipeline import transport
from rlpipe.pipeline.buffer import read_groups
from rlpipe.pipeline.launch import group_members
from rlpipe.pipeline.learner import latest_checkpoint
from rlpipe.pipeline.config import vocab_size
from rlpipe.metrics import read_metrics
from rlpipe.pipeline.identity import read_run_id
from rlpipe.pipeline.stats import run_stats
from rlpipe.types import GroupAck, Trajectory, TrajectoryGroup
from tests.learning import holds

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

REPO = Path(__file__).resolve().parent.parent
SAMPLER = "vllm" if __import__("importlib").util.find_spec("vllm") else "local"
"""For the runs about the engine (end to end, Ctrl-C with an engine core to stop, chaos, fail
fast). The others sample with the local sampler (write_config's default): a vLLM engine start
costs 20-30 s of a 2-core machine, and what they test is the pipeline, not the engine."""


def write_config(tmp_path, name, **fields) -> Path:
    ports = [transport.free_port() for _ in range(3)]
    lines = [
        f'name = "{name}"', f'runs_dir = "{tmp_path}"', f"max_staleness = {fields.pop('max_staleness', 1)}",
        f"groups_per_batch = {fields.pop('groups_per_batch', 4)}",
        f'base_model = "{fields.pop("base_model", "")}"',
        "[dataset]", f'factory = "{fields.pop("factory", "envs.toy:DigitsDataset")}"', "args = { group_size = 8 }",
        *fields.pop("dataset_lines", []),
        "[explorer]", f'sampler = "{fields.pop("sampler", "local")}"', "concurrency = 8", "max_tokens = 8",
        f"episode_timeout_s = {fields.pop('episode_timeout_s', 60)}",
        "[learner]", f"steps = {fields.pop('steps', 5)}", "rank = 8", "learning_rate = 2e-3",
        f"checkpoint_every = {fields.pop('checkpoint_every', 10)}", "batch_timeout_s = 300",
        f"eval_every = {fields.pop('eval_every', 0)}",
        *fields.pop("learner_lines", []),
        *fields.pop("extra", []),
        "[addresses]", *(f'{k} = "tcp://127.0.0.1:{p}"' for k, p in zip(("experience", "batches", "control"), ports)),
    ]
    assert not fields, fields
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def rlpipe(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "rlpipe.cli", *map(str, args)], cwd=REPO, env=env,
                            start_new_session=True, **kwargs)


def run_until_stopped(config, *args, timeout_s: float = 600) -> tuple[int, str, float]:
    """`rlpipe run config args...`: (exit code, console output, seconds it took)."""
    start = time.monotonic()
    proc = rlpipe("run", config, *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the run did not stop:\n{out.decode()[-3000:]}")
    return proc.returncode, out.decode(), time.monotonic() - start


def run_to_end(config: Path, timeout_s: float = 600) -> str:
    code, out, _ = run_until_stopped(config, timeout_s=timeout_s)
    assert code == 0, out[-3000:]
    return out


def assert_no_orphans(run_dir: Path) -> None:
    pids = json.loads((run_dir / "pids.json").read_text())
    for role, pid in pids.items():
        assert group_members(pid) == [], f"{role} left processes behind"


def accounting(run_dir: Path) -> tuple[dict, dict]:
    buffer = json.loads((run_dir / "buffer_stats.json").read_text())
    explorer = json.loads(next(run_dir.glob("explorer-*/stats.json")).read_text())
    non_stale = sum(v for k, v in buffer["dropped"].items() if k != "stale")
    assert buffer["received"] == buffer["accepted"] + non_stale
    assert buffer["dropped"].get("stale", 0) <= buffer["accepted"]
    return buffer, explorer


def test_async_run_end_to_end(tmp_path):
    """With in-flight weight updates where the engine offers them (vLLM): the runs about
    the engine's failures (Ctrl-C, chaos, fail fast) cover the default, between requests."""
    evaluation = ['eval_factory = "envs.arithmetic:eval_items"', "eval_args = { n = 12, difficulty = 1 }"]
    config = write_config(tmp_path, "e2e", steps=5, max_staleness=1, eval_every=5, dataset_lines=evaluation,
                          sampler=SAMPLER)
    inflight = SAMPLER == "vllm"
    code, out, _ = run_until_stopped(config, *(["--set", "explorer.weight_updates=inflight"] if inflight else []))
    assert code == 0, out[-3000:]
    run_dir = tmp_path / "e2e"
    if inflight:
        assert "weight updates inflight" in (run_dir / "logs" / "explorer.log").read_text()
        for group in read_groups(run_dir / "buffer"):  # a token never has an older version than the one before it
            for t in group.trajectories:
                versions = [v for v, m in zip(t.policy_versions, t.action_mask) if m]
                assert versions == sorted(versions) and min(versions) >= 0, versions
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        assert r["staleness/max"] <= 1  # the bound holds for every trained group
        assert r["buffer/groups"] == 4 and r["buffer/trajectories"] == 32
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["tokens/sampled"] > 0
        assert "kl/sampler_learner" in r and "loss/ratio" in r
    assert records[-1]["explorer/version"] >= 3  # the explorer hot-loaded new adapters
    assert records[-1]["eval/n"] == 12 and 0.0 <= records[-1]["eval/accuracy"] <= 1.0
    assert "eval/accuracy" not in records[0]
    assert "step 5/5" in out
    buffer, explorer = accounting(run_dir)
    stats = run_stats(run_dir)  # nothing lost between explorer and buffer
    assert stats["lost"] == 0 and stats["explorers"]["finished"] == buffer["received"] + stats["explorers"]["waiting"]
    assert buffer["accepted"] >= 20
    assert_no_orphans(run_dir)


@pytest.mark.learning
@pytest.mark.parametrize("max_staleness", [0, 1], ids=["sync", "async"])
def test_sync_and_async_modes_learn(tmp_path, max_staleness, learning_seed):
    name = f"learn{max_staleness}"
    config = write_config(tmp_path, name, steps=14, max_staleness=max_staleness)
    code, out, _ = run_until_stopped(config, "--set", f"seed={learning_seed}")
    assert code == 0, out[-3000:]
    records = read_metrics(tmp_path / name / "metrics.jsonl")
    assert len(records) == 14
    assert max(r["staleness/max"] for r in records) <= max_staleness
    # Per-token lag: what the buffer bounds, and the hunt's figures, logged every step.
    assert all(r["staleness/group_max"] <= max_staleness and 0 <= r["staleness/mean"] <= r["staleness/max"]
               and 0 <= r["buffer/no_signal_frac"] <= 1 and r["buffer/tried"] >= r["buffer/groups"] for r in records)
    first = sum(r["reward/mean"] for r in records[:4]) / 4
    last = sum(r["reward/mean"] for r in records[-4:]) / 4
    holds(last - first, ">", 0.05, "mean reward of the last 4 steps - the first 4")


def bad_group(run_dir: Path, version: int, token: int = 5) -> TrajectoryGroup:
    trajectories = [Trajectory(tokens=[1, 2, token, 3], action_mask=[0, 0, 1, 1], sampling_logprobs=[0, 0, -1.0, -1.0],
                               policy_versions=[-1, -1, version, version], reward=float(i), advantage=i - 0.5)
                    for i in range(2)]
    return TrajectoryGroup(group_id=f"injected-{token}-{version}", trajectories=trajectories, explorer_id="test",
                           run_id=read_run_id(run_dir), incarnation=1)


def test_faults_are_counted_and_the_run_continues(tmp_path):
    # Enough steps that the run outlasts the episode timeout several times over, so hanging
    # episodes time out (and are counted) before the learner finishes.
    steps = 15
    config = write_config(tmp_path, "faults", steps=steps, factory="tests.pipeline_envs:FlakyDataset",
                          episode_timeout_s=2)
    address = [line.split('"')[1] for line in config.read_text().splitlines() if line.startswith("experience")][0]
    run_dir = tmp_path / "faults"
    proc = rlpipe("run", config, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while len(read_metrics(run_dir / "metrics.jsonl")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "run ended or stalled early"
            time.sleep(0.5)
        vocab = vocab_size(str(json.loads((run_dir / "config.json").read_text())["base_model"] or _tiny()))
        with transport.RequestClient(address) as client:
            for frame in (b"not msgpack", msgspec.msgpack.encode({"type": "group", "group_id": 3}), b"\x00" * 10):
                client.socket.send_multipart([b"garbage", frame])
            # an id outside the vocabulary; then one the learner (at >= 2, max_staleness 1) finds stale
            invalid = client.request(bad_group(run_dir, version=0, token=vocab + 7), timeout_s=30)
            stale = client.request(bad_group(run_dir, version=0), timeout_s=30)
        assert invalid == GroupAck("injected-%d-0" % (vocab + 7), "invalid") and stale == GroupAck("injected-5-0", "accepted")
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
    assert proc.returncode == 0
    buffer, explorer = accounting(run_dir)
    dropped = buffer["dropped"]
    assert sum(buffer["rejected"].values()) >= 3  # the garbage frames: not groups, so not "received"
    assert dropped.get("invalid", 0) >= 1
    assert dropped.get("stale", 0) >= 1 and buffer["stale_reasons"].get("too_old", 0) >= 1
    assert dropped.get("env_error", 0) >= 2  # raised and hung (timed out) episodes
    stats = run_stats(run_dir)
    # + the 2 groups injected here
    assert stats["explorers"]["finished"] + 2 == buffer["received"] + stats["explorers"]["waiting"]
    assert stats["lost"] == -2  # the injected groups came from no explorer
    assert explorer.get("groups_env_error", 0) >= dropped["env_error"]
    assert len(read_metrics(run_dir / "metrics.jsonl")) == steps
    log = (run_dir / "logs" / "explorer.log").read_text()
    assert "crashed on purpose" in log and "timeout" in log


def _tiny():
    from rlpipe.testing.embedded import default_model_path

    return default_model_path()


STEPS_TO_RESUME = 40


def test_restarted_learner_resumes_and_explorer_follows_it(tmp_path):
    # Enough steps that the learner is still running when the test kills it (a step takes ~0.2 s).
    config = write_config(tmp_path, "resume", steps=STEPS_TO_RESUME, checkpoint_every=2)
    run_dir = tmp_path / "resume"
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    roles = {role: rlpipe(role, config, stdout=open(logs / f"{role}.log", "ab"), stderr=subprocess.STDOUT)
             for role in ("buffer", "explorer", "learner")}
    try:
        latest = run_dir / "learner" / "latest.json"
        deadline = time.monotonic() + 300
        # Wait until a checkpoint exists and at least one step was trained after it. The learner
        # is frozen while we look, so it cannot checkpoint again between the look and the kill.
        while True:
            assert time.monotonic() < deadline and roles["learner"].poll() is None
            if latest.exists():
                os.killpg(roles["learner"].pid, signal.SIGSTOP)
                if len(read_metrics(run_dir / "metrics.jsonl")) >= json.loads(latest.read_text())["step"] + 1:
                    break
                os.killpg(roles["learner"].pid, signal.SIGCONT)
            time.sleep(0.2)
        os.killpg(roles["learner"].pid, signal.SIGKILL)
        roles["learner"].wait(timeout=30)
        checkpoint = json.loads(latest.read_text())
        trained_before = len(read_metrics(run_dir / "metrics.jsonl"))
        assert trained_before > checkpoint["step"]

        roles["learner"] = rlpipe("learner", config, "--resume", stdout=open(logs / "learner2.log", "ab"), stderr=subprocess.STDOUT)
        assert roles["learner"].wait(timeout=300) == 0, (logs / "learner2.log").read_text()[-3000:]
        roles["buffer"].wait(timeout=60)
        roles["explorer"].wait(timeout=60)
    finally:
        for proc in roles.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    records = read_metrics(run_dir / "metrics.jsonl")
    resumed = records[trained_before:]
    # Steps continue from the checkpoint, not from where the killed learner had got to ...
    assert [r["step"] for r in resumed] == list(range(checkpoint["step"] + 1, STEPS_TO_RESUME + 1))
    # ... and the batches after the restart hold only groups sampled with the new learner
    # incarnation's adapters (the explorer followed the restart, though the new versions
    # repeat the dead learner's numbers): none from the future, none stale beyond the bound.
    assert resumed[0]["buffer/first_seq"] > checkpoint["after_seq"]
    assert all(r["learner/incarnation"] == 2 and r["explorer/incarnation_min"] == 2 for r in resumed)
    assert all(0 <= int(k.split("/")[1]) <= 1 for r in resumed for k in r if k.startswith("staleness/") and k.split("/")[1].isdigit())
    assert "resumed at step" in (logs / "learner2.log").read_text()
    # The optimizer state went on: Adam's step count equals the total number of steps.
    final = latest_checkpoint(run_dir)
    adam = torch.load(Path(final["path"]) / "optimizer.pt", weights_only=False)
    assert {int(s["step"]) for s in adam["state"].values()} == {STEPS_TO_RESUME}


def test_ctrl_c_stops_every_process(tmp_path):
    config = write_config(tmp_path, "ctrlc", steps=200, sampler=SAMPLER)
    run_dir = tmp_path / "ctrlc"
    proc = rlpipe("run", config, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not read_metrics(run_dir / "metrics.jsonl"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        pids = json.loads((run_dir / "pids.json").read_text())
        assert len(group_members(pids["explorer"])) >= 1
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert proc.wait(timeout=90) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_no_orphans(run_dir)


def test_a_run_directory_is_refused_without_resume_and_resumed_with_it(tmp_path):
    from rlpipe.pipeline.outbox import read_outbox_stats

    config = write_config(tmp_path, "again", steps=3, checkpoint_every=1)
    run_dir = tmp_path / "again"
    run_to_end(config)
    first = read_outbox_stats(run_dir / "explorer-0")
    assert first["dataset_batch"] > 0

    refused = subprocess.run([sys.executable, "-m", "rlpipe.cli", "run", str(config)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr and "--resume" in refused.stderr
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 3  # nothing ran

    proc = rlpipe("run", config, "--resume", "--set", "learner.steps=6", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    # The learner went on from its checkpoint, the explorer from its dataset position.
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    log = (run_dir / "logs" / "explorer.log").read_text()
    assert f"dataset at batch {first['dataset_batch']} + {first['dataset_offset']}" in log
    assert read_outbox_stats(run_dir / "explorer-0")["dataset_batch"] > first["dataset_batch"]
