"""Multi-turn tool use through the async pipeline: call the calculator, read its result, answer.

    python examples/tool_use_rl.py                      # SFT warm-up, then 30 async RL steps
    python examples/tool_use_rl.py --sampler local --steps 6 --sft-steps 40

Each episode is up to --max-turns assistant turns of `envs.tool_use.ToolUseEnv`:

    user:      What is 37 * 52?
    assistant: <tool_call>{"name": "calculator", "arguments": {"expression": "37 * 52"}}</tool_call>
    tool:      1924                     <- observation tokens, appended, never trained on
    assistant: <answer>1924</answer>

What the embedded 0.48M-parameter model can do, honestly: untrained, it writes no
well-formed tool call at all, and RL has nothing to reinforce. So a short SFT warm-up first
trains on correct transcripts made by driving the env itself with scripted actions (the
tokens are exactly those an episode produces, tool results and chat headers included, with
loss only on the assistant's turns). That teaches the *format*: after the warm-up a good share
of turns are well-formed calls and answers, and RL (reward = correct + 0.1 format bonus)
works on that. The model cannot multiply, and it copies numbers from the question and the
tool result unreliably, so correctness stays low; the figure to watch is the well-formed
share (1 - tool_errors / turns) and the answered share, first vs last steps.

Cost: a group has a learning signal only if its rewards differ (one rollout answered in form
and another did not); the rest are dropped by the buffer (counted as dropped/no_signal) and
replaced. After a 40-step warm-up about 1 group in 100 has signal, so RL steps are slow; the
default 150 warm-up steps make that much less rare. `--keep-no-signal` trains on every group
(zero advantages where rewards are equal): fast, and only good for checking the plumbing.

The tasks are generated arithmetic questions (written as a JSONL next to the run) and the tool
set is the calculator alone with a one-line description: the default three tools' system
prompt is 606 tokens, longer than the tiny model's 512-token context. The dataset factory
(`tool_use_rl:calculator_dataset`, below) is found by the explorer process through PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- env side (imported by the explorer)


def calculator_tools() -> dict:
    from envs.tool_use import Tool, calculator_tool

    calc = calculator_tool()
    return {"calculator": Tool("calculator", "evaluates an arithmetic expression", calc.parameters, calc.run)}


def calculator_dataset(tokenizer, **kwargs):
    """config.dataset.factory: a ToolUseDataset with the calculator as its only tool."""
    from envs.tool_use import ToolUseDataset

    return ToolUseDataset(tokenizer, tools=calculator_tools(), **kwargs)


def make_tasks(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    for _ in range(n):
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+*")
        tasks.append({"question": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a * b),
                      "expression": f"{a} {op} {b}"})
    return tasks


# --------------------------------------------------------------------------- SFT transcripts


class ScriptedSampler:
    """Stands in for the policy: returns the next scripted action text as tokens."""

    def __init__(self, tokenizer, actions: list[str]):
        self.tokenizer, self.actions = tokenizer, list(actions)

    async def sample_async(self, prompt, num_samples, sampling_params):
        from rlpipe.types import SampledSequence, SampleResponse

        ids = self.tokenizer(self.actions.pop(0), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return SampleResponse([SampledSequence(stop_reason="stop", tokens=ids, logprobs=[0.0] * len(ids))])


def transcripts(tokenizer, tasks: list[dict], max_turns: int) -> list:
    """One SFT datum per task: the env driven with the correct call, then the correct answer."""
    from envs.tool_use import ToolTask, ToolUseEnv
    from rlpipe.datums import datum_from_tokens_weights
    from rlpipe.rollouts import do_episode
    from rlpipe.types import SamplingParams

    data = []
    for task in tasks:
        call = json.dumps({"name": "calculator", "arguments": {"expression": task["expression"]}})
        actions = [f"<tool_call>{call}</tool_call>", f"<answer>{task['answer']}</answer>"]
        env = ToolUseEnv(ToolTask(task["question"], task["answer"]), tokenizer, calculator_tools(), max_turns)
        traj = asyncio.run(do_episode(env, lambda s=ScriptedSampler(tokenizer, actions): s, SamplingParams(), max_turns))
        assert traj.metrics["correct"] == 1.0, traj.metrics  # the script is right, or the env changed
        data.append(datum_from_tokens_weights(traj.tokens, traj.action_mask))
    return data


# --------------------------------------------------------------------------- the recipe


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="RL (learner) steps")
    p.add_argument("--sft-steps", type=int, default=150, help="SFT warm-up steps (0 = none)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--name", default="tool_use_rl")
    p.add_argument("--sampler", choices=("auto", "vllm", "local"), default="auto")
    p.add_argument("--groups-per-batch", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-turns", type=int, default=2, help="assistant turns per episode (call, then answer)")
    p.add_argument("--max-tokens", type=int, default=80, help="per turn; the call is ~60 tokens")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--keep-no-signal", action="store_true",
                   help="train on groups whose rewards are all equal too (zero advantages): for smoke tests; "
                        "by default the buffer drops them and the explorer rolls out others")
    return p.parse_args(argv)


def make_config(args, tasks_path: Path):
    from rlpipe import transport
    from rlpipe.config import RunConfig

    config = RunConfig(name=args.name, runs_dir=args.runs_dir, max_staleness=1, groups_per_batch=args.groups_per_batch)
    config.dataset.factory = "tool_use_rl:calculator_dataset"
    config.dataset.args = {"path": str(tasks_path), "group_size": args.group_size, "max_turns": args.max_turns}
    config.explorer.sampler = args.sampler
    config.explorer.concurrency = args.groups_per_batch * 2
    config.explorer.max_turns = args.max_turns
    config.explorer.max_tokens = args.max_tokens
    config.learner.steps = args.steps
    config.learner.learning_rate = args.lr
    config.learner.checkpoint_every = max(args.steps, 1)
    config.buffer.drop_constant_reward_groups = not args.keep_no_signal
    config.addresses.experience, config.addresses.batches, config.addresses.control = (
        f"tcp://127.0.0.1:{transport.free_port()}" for _ in range(3))
    return config


def well_formed(record: dict) -> float:
    """Share of assistant turns that were a well-formed call or answer (batch means)."""
    return 1.0 - record["env/tool_errors"] / record["env/turns"]


def window(records, fn, first: bool) -> float:
    k = max(1, len(records) // 4)
    return float(np.mean([fn(r) for r in (records[:k] if first else records[-k:])]))


def main(argv=None) -> dict:
    from rlpipe import launch
    from rlpipe.config import dump, load
    from rlpipe.metrics import read_metrics
    from rlpipe.warmup import sft_warm_up

    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # The roles are separate processes: they import the dataset factory from this folder.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    run_dir = Path(args.runs_dir) / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    tasks_path = run_dir / "tasks.jsonl"
    tasks_path.write_text("".join(json.dumps(t) + "\n" for t in make_tasks(500, seed=1)))
    config = make_config(args, tasks_path)
    t0 = time.time()
    if args.sft_steps:
        # seed 7: tasks the RL run does not use
        config.learner.init_from = sft_warm_up(
            config, lambda tok: transcripts(tok, make_tasks(256, seed=7), args.max_turns), args.sft_steps, batch_size=8)
        print(f"SFT warm-up on scripted transcripts: {args.sft_steps} steps ({time.time() - t0:.0f} s)")
    path = run_dir / "tool_use_rl_config.json"
    path.write_bytes(dump(config))
    code = launch.run(load(path), str(path), [])
    if code != 0:
        raise SystemExit(f"the pipeline failed (exit code {code}); see {run_dir / 'logs'}")
    records = read_metrics(run_dir / "metrics.jsonl")
    out = {"steps": len(records), "run_dir": str(run_dir), "seconds": time.time() - t0,
           "no_signal_dropped": records[-1].get("dropped/no_signal", 0.0) if records else 0.0}
    for name, fn in (("reward", lambda r: r["reward/mean"]), ("well_formed", well_formed),
                     ("answered", lambda r: r["env/answered"]), ("correct", lambda r: r["env/correct"]),
                     ("turns", lambda r: r["env/turns"])):
        out[f"{name}_first"], out[f"{name}_last"] = window(records, fn, True), window(records, fn, False)
        print(f"{name:>12}: {out[f'{name}_first']:.3f} -> {out[f'{name}_last']:.3f}  (first vs last quarter of the steps)")
    print(f"total {out['seconds']:.0f} s; everything the run wrote is in {run_dir}")
    return out


if __name__ == "__main__":
    main()
