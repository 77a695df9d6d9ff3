"""The reference loop (rlpipe/loop.py): it learns, it runs the same through the tinker SDK
against `rlpipe serve`, and its step is the pipeline's step."""

import asyncio
import json
import math

import pytest
from safetensors.torch import load_file

from rlpipe.loop import main, rl_loop, train_step, trainable
from rlpipe.pipeline.buffer import read_groups
from rlpipe.pipeline.config import load
from rlpipe.pipeline.learner import _lora, latest_checkpoint
from rlpipe.training.client import TrainingClient
from rlpipe.types import AdamParams
from tests.learning import holds
from tests.test_pipeline import run_until_stopped, write_config

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")


def check_records(records: list[dict], steps: int) -> None:
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert math.isfinite(r["loss:sum"]) and 0.0 <= r["reward/mean"] <= 1.0 and r["staleness/max"] == 0
        assert r["groups/kept"] <= r["groups/sampled"] and "grad_norm:mean" in r


@pytest.mark.learning
def test_the_loop_learns_in_process(vllm_engine, tiny_model_path, tmp_path, learning_seed, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its checkpoints go to runs/loop here
    records = main(["--steps", "12", "--seed", str(learning_seed)])
    check_records(records, 12)
    first = sum(r["reward/mean"] for r in records[:3]) / 3
    last = sum(r["reward/mean"] for r in records[-3:]) / 3
    holds(last - first, ">", 0.05, "mean reward of the last 3 loop steps - the first 3")


def test_the_loop_runs_through_the_sdk_against_rlpipe_serve(tinker_server, tiny_model_path):
    records = main(["--base-url", tinker_server.url, "--steps", "3", "--model", tiny_model_path])
    check_records(records, 3)
    assert records[-1]["grad_norm:mean"] > 0  # the endpoint's optimizer ran


def test_a_failing_env_fails_its_group_and_the_loop_goes_on(tiny_model_path, tmp_path):
    from envs.toy import DigitsDataset
    from rlpipe.training.service import ServiceClient

    class Flaky(DigitsDataset):  # the third group of every batch raises in make_envs
        def get_batch(self, index):
            builders = super().get_batch(index)

            async def boom():
                raise RuntimeError("env broke")

            builders[2].make_envs = boom
            return builders

    client = ServiceClient(tmp_path).create_lora_training_client(tiny_model_path, rank=8, seed=0)
    said = []
    records = asyncio.run(rl_loop(client, Flaky(client.get_tokenizer(), 4, 8), steps=2, learning_rate=1e-3,
                                  log=said.append))
    assert len(records) == 2 and all(r["groups"] <= 3 for r in records)
    assert sum("a group failed: RuntimeError: env broke" in line for line in said) == 2


def test_the_loop_step_is_the_pipelines_first_step_in_float64(tmp_path, tiny_model_path):
    """`rlpipe run` with max_staleness 0 and one step, the learner in float64: the loop's
    train_step on the groups that batch held, from the same initial adapter, lands on the
    learner's checkpoint to float64 rounding."""
    config_path = write_config(tmp_path, "same", steps=1, max_staleness=0, sampler="local",
                               learner_lines=['dtype = "float64"', 'device = "cpu"'])
    code, out, _ = run_until_stopped(config_path)
    assert code == 0, out[-3000:]
    config = load(config_path)
    checkpoint = latest_checkpoint(config.run_dir)
    groups = [g for g in read_groups(config.run_dir / "buffer") if trainable(g)][: config.groups_per_batch]
    assert len(groups) == config.groups_per_batch and checkpoint["step"] == 1

    client = TrainingClient(config.model_path(), _lora(config), tmp_path / "loop", device="cpu", dtype="float64")
    adam = AdamParams(learning_rate=config.learner.learning_rate, grad_clip_norm=config.learner.grad_clip_norm)
    record = train_step(client, groups, 0, adam, config.learner.loss_fn, {"temperature": config.explorer.temperature})
    ours = client.trainable_state()
    theirs = load_file(f"{checkpoint['path']}/adapter/adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    moved = max((ours[k] - theirs[k].to(ours[k].dtype)).abs().max().item() for k in ours)
    assert moved < 1e-12, moved
    assert max(v.abs().max().item() for k, v in ours.items() if "lora_B" in k) > 1e-4  # the step did move B
    trained = json.loads((config.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert trained["loss/sum"] == pytest.approx(record["loss:sum"], rel=1e-9)
    client.close()
