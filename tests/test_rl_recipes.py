"""Smoke tests for the RL recipes: each runs its main() through the async pipeline (buffer,
learner and explorer as processes) on the tiny model with the local sampler for a few steps,
checks that every step was trained and that the recipe's own evaluations ran and are sane.
Whether the recipes learn takes tens of steps each: benchmarks/bench_rl_recipes.py measures
that over seeds (figures in docs/benchmarks.md)."""

import json
import math
from pathlib import Path

import pytest

from rlpipe.pipeline.buffer import read_groups
from rlpipe.metrics import read_metrics
from tests.scripted import load_recipe as recipe

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")


def check_run(out: dict, steps: int) -> list[dict]:
    """Every learner step wrote its metrics, and the roles ended cleanly (main() raises
    SystemExit when any role fails)."""
    run_dir = Path(out["run_dir"])
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert out["steps"] == steps
    for r in records:
        assert r["staleness/max"] <= 1 and r["tokens/sampled"] > 0 and math.isfinite(r["loss/sum"])
    buffer = json.loads((run_dir / "buffer_stats.json").read_text())
    assert buffer["dropped"].get("env_error", 0) == 0 and buffer["dropped"].get("invalid", 0) == 0
    return records


def logged_groups(run_dir: Path, model: str, tmp_path: Path) -> list:
    """Every group the buffer still holds (those after the learner's last compacted position)."""
    groups = read_groups(run_dir / "buffer")
    assert groups, "the buffer holds no groups"
    return groups


def action_runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_math_rl_recipe(tmp_path):
    out = recipe("math_rl")(["--sampler", "local", "--steps", "6", "--sft-steps", "10", "--runs-dir", str(tmp_path),
                             "--groups-per-batch", "8", "--group-size", "8", "--lr", "1e-3", "--eval-n", "200"])
    records = check_run(out, 6)
    for r in records:
        assert 0.0 <= r["reward/mean"] <= 1.1 and 0.0 <= r["env/correct"] <= 1.0
    assert "eval/accuracy" in records[-1] and records[-1]["eval/n"] == 200  # the learner's own evaluators ran:
    assert records[-1]["eval/tokens"] > 200 and 0.0 < records[-1]["eval/nll"] < 20.0  # greedy accuracy and NLL
    assert out["eval_nll_after"] == records[-1]["eval/nll"]
    assert 0.0 <= out["eval_before"] <= 1.0 and out["eval_after"] == records[-1]["eval/accuracy"]
    for key in ("sampled_reward", "sampled_format"):
        assert 0.0 <= out[f"{key}_before"] <= 1.1 and 0.0 <= out[f"{key}_after"] <= 1.1


def test_tool_use_rl_recipe(tmp_path, tiny_model_path):
    out = recipe("tool_use_rl")(["--sampler", "local", "--steps", "4", "--runs-dir", str(tmp_path),
                                 "--groups-per-batch", "4", "--group-size", "8", "--eval-tasks", "32"])
    records = check_run(out, 4)
    for r in records:
        assert 0.0 <= r["reward/mean"] <= 2.0 and 1.0 <= r["env/turns"] <= 2.0  # right (1) + format bonus (1)
    # Multi-turn plumbing: episodes of more than one turn whose tool results are observation
    # tokens (mask 0, no logprob, no policy version) between the assistant's turns.
    multi_turn = 0
    for group in logged_groups(Path(out["run_dir"]), tiny_model_path, tmp_path):
        for t in group.trajectories:
            assert t.reward in (0.0, 1.0, 2.0)
            runs = action_runs(t.action_mask)
            assert len(runs) == t.metrics["turns"]
            for (_, end), (start, _) in zip(runs, runs[1:]):
                gap = range(end, start)
                assert len(gap) > 0
                assert all(t.policy_versions[i] == -1 and t.sampling_logprobs[i] == 0.0 for i in gap)
            multi_turn += len(runs) > 1
    assert multi_turn > 0
    for key in ("eval_format", "eval_tool_errors"):
        assert 0.0 <= out[f"{key}_before"] <= 2.0 and 0.0 <= out[f"{key}_after"] <= 2.0


def test_multi_agent_rl_recipe(tmp_path):
    out = recipe("multi_agent_rl")(["--sampler", "local", "--steps", "4", "--sft-steps", "3", "--runs-dir", str(tmp_path),
                                    "--games-per-batch", "16", "--eval-games", "16"])
    records = check_run(out, 4)
    for r in records:
        assert r["reward/mean"] == pytest.approx(0.0, abs=1e-6)  # zero-sum: X's reward + O's reward = 0
        assert 0.0 <= r["env/illegal"] <= 1.0 and 1.0 <= r["env/moves"] <= 9.0
    assert 0.0 <= out["eval_unreadable_per_move_after"] <= 1.0 and 1.0 <= out["eval_moves_after"] <= 9.0
