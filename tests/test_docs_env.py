"""The worked examples of the docs, exactly as written, run as a user runs them.

docs/env.md ("Write your own env"): each file of the example follows a marker
`<!-- docs: example myenv/NAME -->` (tests/test_docs.py reads the markers); the files are written
to one directory and run there (cwd = that directory, offline): the debugging script, the
command `rlpipe run myenv.toml`, and train.py through rlpipe.run. The README's sevens.py
(`example readme/sevens.py`) runs the same way. About 60 s for each pipeline run on 2 CPU cores
(each starts a vLLM engine).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.learning import holds
from tests.test_docs import example_files

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

STEPS = 15  # what myenv.toml, train.py and sevens.py say


def section_blocks() -> dict[str, str]:
    blocks = example_files("myenv")
    assert set(blocks) == {"myenv.py", "myenv.toml", "command", "mygroup.py", "debug_myenv.py", "train.py"}, blocks.keys()
    return blocks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("myenv")
    for name, body in section_blocks().items():
        if name != "command":
            (work / name).write_text(body)
    return work


def run_user(args: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the user's directory, not the repository, provides myenv
    return subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_run(records: list[dict]) -> None:
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        for key in ("reward/mean", "env/sevens", "env/chars", "env/turns"):
            assert math.isfinite(r[key]), (key, r)
    first = sum(r["reward/mean"] for r in records[:3]) / 3
    last = sum(r["reward/mean"] for r in records[-3:]) / 3
    holds(last - first, ">", 0.1, "mean reward of the last 3 steps - the first 3")


def test_compute_group_rewards_as_written(workdir, monkeypatch):
    """mygroup.py's group reward: 0.5 to the shortest answers that contain a 7, nothing else."""
    from rlpipe.types import Trajectory

    monkeypatch.syspath_prepend(str(workdir))
    import mygroup

    def answer(n_action: int, sevens: float) -> Trajectory:
        return Trajectory(tokens=[1] * (3 + n_action), action_mask=[0] * 3 + [1] * n_action,
                          sampling_logprobs=[0.0] * (3 + n_action), policy_versions=[-1] * 3 + [0] * n_action,
                          reward=0.0, metrics={"sevens": sevens})

    builder = mygroup.ShortestSevenBuilder(tokenizer=None, question="q", group_size=4)
    group = [answer(2, 0.0), answer(4, 1.0), answer(3, 2.0), answer(3, 1.0)]
    assert asyncio.run(builder.compute_group_rewards(group)) == [0.0, 0.0, 0.5, 0.5]
    assert asyncio.run(builder.compute_group_rewards([answer(2, 0.0)] * 3)) == [0.0] * 3


def test_debug_snippet_prints_episodes_and_rewards(workdir):
    done = run_user([sys.executable, "debug_myenv.py"], workdir, 120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    # two groups of 8, each episode with its transcript and reward, then the group's verdict
    assert len(re.findall(r"^--- episode \d+: reward -?\d+\.\d{3}  advantage [+-]\d+\.\d{3}", out, re.MULTILINE)) == 16, out
    assert out.count("  env  | <|user|>Write a number with a 7 in it.<|end|><|assistant|>") == 8, out
    assert out.count("  env  | <|user|>Name a lucky number.<|end|><|assistant|>") == 8, out
    assert len(re.findall(r"^  model\| ", out, re.MULTILINE)) == 16
    assert len(re.findall(r"^  metrics: sevens=\d+  chars=\d+  turns=1  action_tokens=\d+$", out, re.MULTILINE)) == 16
    assert len(re.findall(r"^group: 8 episodes, rewards( -?\d+\.\d{3}){8}, mean -?\d+\.\d{3}$", out, re.MULTILINE)) == 2
    printed = re.search(r"^rewards: \[(.*)\]$", out, re.MULTILINE)
    assert printed, out
    rewards = [float(x) for x in printed.group(1).split(",")]
    assert len(rewards) == 8 and all(-1.0 <= r <= 1.0 for r in rewards)
    # the printed rewards are the episodes' (reward = has a 7 - 0.01 * characters)
    shown = [float(r) for r in re.findall(r"^--- episode \d+: reward (-?\d+\.\d{3})", out, re.MULTILINE)[:8]]
    assert all(abs(a - b) < 0.006 for a, b in zip(shown, rewards)), (shown, rewards)


@pytest.mark.learning
def test_cli_run_as_written(workdir):
    command = section_blocks()["command"].split()
    assert command == ["rlpipe", "run", "myenv.toml"]
    rlpipe = Path(sys.executable).with_name("rlpipe")  # the venv's console script
    done = run_user([str(rlpipe), *command[1:]], workdir, 300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run_dir = workdir / "runs" / "myenv"
    check_run(read_records(run_dir / "metrics.jsonl"))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "curves.png").stat().st_size > 0
    assert "curves: runs/myenv/curves.png" in done.stdout + done.stderr
    assert (run_dir / "learner" / "state" / f"step-{STEPS:06d}" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.learning
def test_train_script_as_written(workdir):
    done = run_user([sys.executable, "train.py"], workdir, 300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = read_records(workdir / "runs" / "myenv-py" / "metrics.jsonl")
    check_run(records)
    assert f"reward {records[0]['reward/mean']:.3f} -> {records[-1]['reward/mean']:.3f}" in done.stdout


@pytest.mark.slow
def test_readme_example_as_written(tmp_path):
    """The README's sevens.py: env classes and rlpipe.run in one file, run as `python sevens.py`."""
    files = example_files("readme")
    assert list(files) == ["sevens.py"]
    (tmp_path / "sevens.py").write_text(files["sevens.py"])
    done = run_user([sys.executable, "sevens.py"], tmp_path, 300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = read_records(tmp_path / "runs" / "sevens" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["reward/mean"]) and -1.0 <= r["reward/mean"] <= 1.0 for r in records)
    assert f"reward {records[0]['reward/mean']:.3f} -> {records[-1]['reward/mean']:.3f}" in done.stdout
    assert (tmp_path / "runs" / "sevens" / "curves.png").stat().st_size > 0


def test_run_refuses_what_is_not_a_run_config():
    import rlpipe

    with pytest.raises(TypeError, match="takes a RunConfig"):
        rlpipe.run("myenv.toml")


def test_debug_group_raises_env_errors_and_says_what_the_buffer_would_drop(workdir, monkeypatch):
    """In-process, local sampler: an env's exception reaches the caller as it was raised, and
    a group whose rewards are all equal is reported as one the buffer drops (no_signal)."""
    import io

    from transformers import AutoTokenizer

    from rlpipe.pipeline.debug import debug_group
    from rlpipe.testing.embedded import default_model_path

    monkeypatch.syspath_prepend(str(workdir))
    import myenv

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    inner = myenv.SevenGroupBuilder(tokenizer, "Name a lucky number.", 4)

    class Broken:
        async def make_envs(self):
            envs = await inner.make_envs()
            envs[2].step = self.step
            return envs

        async def step(self, action):
            raise KeyError("a bug in the env")

    with pytest.raises(KeyError, match="a bug in the env"):
        debug_group(Broken(), show=False)

    class Flat:  # every episode the same reward, plus a group reward that differs per member
        async def make_envs(self):
            envs = await inner.make_envs()
            for env in envs:
                env.step = self.step
            return envs

        async def step(self, action):
            return myenv.StepResult(reward=0.25, episode_done=True, metrics={"n": float(len(action))})

    out = io.StringIO()
    trajectories = debug_group(Flat(), max_tokens=4, file=out)
    assert [t.reward for t in trajectories] == [0.25] * 4 and [t.advantage for t in trajectories] == [0.0] * 4
    assert "rewards 0.250 0.250 0.250 0.250, mean 0.250" in out.getvalue()
    assert "the buffer drops such a group (no_signal" in out.getvalue()
    assert all(1 <= t.metrics["n"] <= 4 and t.metrics["action_tokens"] == t.metrics["n"] for t in trajectories)

    Flat.compute_group_rewards = lambda self, trajectories: _ranks(trajectories)
    out = io.StringIO()
    trajectories = debug_group(Flat(), max_tokens=4, file=out)
    assert [t.reward for t in trajectories] == [0.25, 1.25, 2.25, 3.25]
    assert [t.advantage for t in trajectories] == pytest.approx([-1.5, -0.5, 0.5, 1.5])
    assert "the pipeline would train on this group" in out.getvalue()


async def _ranks(trajectories) -> list[float]:
    return [float(i) for i in range(len(trajectories))]
