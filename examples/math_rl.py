"""Math RL through the async pipeline: arithmetic (default) or a GSM8K-format JSONL.

    python examples/math_rl.py                          # SFT warm-up, then 40 async RL steps
    python examples/math_rl.py --sampler local --steps 10 --sft-steps 150
    python examples/math_rl.py --gsm8k envs/data/gsm8k_sample.jsonl --steps 5

1. Optional SFT warm-up in this process (teaches the answer format "a + b = c"); its
   `save_state` checkpoint becomes `learner.init_from`.
2. `rlpipe.pipeline.launch.run` starts buffer, learner and explorer as processes (the same code path
   as `rlpipe run CONFIG`); the config is written as JSON next to the run's metrics.
3. Key figures: train reward and env/correct over the first vs the last steps (from
   runs/<name>/metrics.jsonl) and held-out greedy accuracy before RL (computed here) and after
   RL (the learner's own evaluator, `dataset.eval_factory = "envs.arithmetic:eval_items"`),
   with the NLL of the right answers to the same problems (`dataset.nll_eval_factory`), and
   the same problems sampled 4 times each at the explorer's temperature before and after RL
   (reward, correct and format share: `rlpipe.evaluators.rollout_eval`).

`--gsm8k PATH` trains on GSM8K-format problems with `envs.gsm8k.GSM8KDataset` instead, with
the warm-up on the file's worked solutions. It shows the plumbing only: the 0.48M-parameter
embedded model cannot solve word problems, so rewards stay at (almost) 0 and nothing is
learnt. Because groups whose rewards are all equal carry no signal and the buffer would drop
every one of them (the learner would wait for a batch forever), this mode keeps them
(`buffer.drop_constant_reward_groups = False`): the pipeline runs, with zero advantages.
Point `--base-model` at a real local model directory to train for real.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from rlpipe.cli import console
from rlpipe.metrics import window_mean
from rlpipe.pipeline import launch, transport
from rlpipe.pipeline.config import RunConfig
from rlpipe.pipeline.learner import latest_checkpoint
from rlpipe.pipeline.warmup import sft_warm_up


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="RL (learner) steps")
    p.add_argument("--sft-steps", type=int, default=250, help="SFT warm-up steps before RL (0 = none)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--name", default="math_rl")
    p.add_argument("--sampler", choices=("auto", "vllm", "local"), default="auto")
    p.add_argument("--base-model", default="", help="local HF model dir (default: the embedded tiny model)")
    p.add_argument("--gsm8k", default=None, metavar="PATH", help="train on a GSM8K-format .jsonl/.json/.parquet file instead")
    p.add_argument("--difficulty", type=int, default=1, help="arithmetic difficulty (1-4)")
    p.add_argument("--groups-per-batch", type=int, default=8)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--eval-n", type=int, default=200, help="held-out arithmetic problems")
    p.add_argument("--lr", type=float, default=3e-4, help="RL learning rate")
    p.add_argument("--seed", type=int, default=0, help="added to every seed the recipe uses (0: the documented run)")
    return p.parse_args(argv)


def make_config(args) -> RunConfig:
    # Every seed is its base (0 unless written) + --seed; config.seed seeds the LoRA init and the warm-up.
    config = RunConfig(name=args.name, runs_dir=args.runs_dir, base_model=args.base_model, seed=args.seed,
                       max_staleness=1, groups_per_batch=args.groups_per_batch)
    config.explorer.sampler = args.sampler
    config.explorer.concurrency = args.groups_per_batch * 2
    config.learner.steps = args.steps
    config.learner.learning_rate = args.lr
    config.learner.checkpoint_every = max(args.steps, 1)
    if args.gsm8k:
        config.dataset.factory = "envs.gsm8k:GSM8KDataset"
        config.dataset.args = {"path": os.path.abspath(args.gsm8k), "group_size": args.group_size, "seed": args.seed}
        config.explorer.max_tokens = 128
        config.buffer.drop_constant_reward_groups = False  # see the docstring
    else:
        config.dataset.args = {"group_size": args.group_size, "difficulty": args.difficulty, "seed": args.seed + 1}
        config.explorer.max_tokens = 12
        config.dataset.eval_factory = "envs.arithmetic:eval_items"
        config.dataset.eval_args = {"n": args.eval_n, "difficulty": args.difficulty, "seed": args.seed + 999}
        config.dataset.nll_eval_factory = "envs.arithmetic:answer_datums"  # NLL of the right answers
        config.dataset.nll_eval_args = dict(config.dataset.eval_args)
        config.learner.eval_every = args.steps  # greedy held-out accuracy once, after the last step
    # Fresh ports, so that several runs (or a test session) can share a machine.
    config.addresses.experience, config.addresses.batches, config.addresses.control = (
        f"tcp://127.0.0.1:{transport.free_port()}" for _ in range(3))
    return config


def sft_data(tokenizer, args) -> list:
    if args.gsm8k:
        from envs.gsm8k import answer_datums as solution_datums

        return solution_datums(tokenizer, args.gsm8k)
    from envs.arithmetic import answer_datums

    return answer_datums(tokenizer, 2000, args.difficulty, seed=args.seed + 123)  # 123: not the RL or eval seed


def heldout_accuracy(model: str, adapter: str | None, config: RunConfig) -> float:
    """Greedy accuracy on the same held-out items the learner's evaluator uses."""
    from transformers import AutoTokenizer

    from envs.arithmetic import eval_items
    from rlpipe.evaluators import greedy_eval

    tok = AutoTokenizer.from_pretrained(model)
    return greedy_eval(model, adapter, eval_items(tok, **config.dataset.eval_args), tok,
                       max_tokens=config.explorer.max_tokens, backend=config.learner.eval_sampler)["eval/accuracy"]


def sampled_eval(model: str, adapter: str | None, config: RunConfig, samples: int = 4) -> dict[str, float]:
    """The same held-out problems, each sampled `samples` times at the explorer's temperature:
    mean reward, correct and format share of the policy as RL sees it (greedy accuracy hides
    a policy that is right only some of the time)."""
    from transformers import AutoTokenizer

    from envs.arithmetic import FORMAT_BONUS, make_problems
    from rlpipe.env import ProblemGroupBuilder
    from rlpipe.evaluators import run_rollout_eval
    from rlpipe.renderers import get_renderer
    from rlpipe.types import SamplingParams

    renderer, a = get_renderer(AutoTokenizer.from_pretrained(model)), config.dataset.eval_args
    builders = [ProblemGroupBuilder(p, renderer, samples, FORMAT_BONUS)
                for p in make_problems(a["n"], a["difficulty"], a["seed"])]
    params = SamplingParams(max_tokens=config.explorer.max_tokens, temperature=config.explorer.temperature)
    return run_rollout_eval(model, adapter, builders, params, backend=config.learner.eval_sampler, max_turns=1)


def main(argv=None, stop_engines: bool = False) -> dict:
    """stop_engines: shut the evaluation engine down at the end (as a script; a test session shares it)."""
    from rlpipe.pipeline.launch import launcher_output

    args = parse_args(argv)
    # SFT and evaluations run here, in the launcher: engine output to the run's log, results to the console.
    with launcher_output(Path(args.runs_dir) / args.name, stop_engines=stop_engines):
        return run(args)


def run(args) -> dict:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the roles log to runs/<name>/logs
    config = make_config(args)
    model = config.model_path()
    t0 = time.time()
    out: dict = {"sft_steps": args.sft_steps}
    if args.sft_steps:
        config.learner.init_from = sft_warm_up(config, lambda tok: sft_data(tok, args), args.sft_steps)
        console.say(f"SFT warm-up: {args.sft_steps} steps ({time.time() - t0:.0f} s)")
    if not args.gsm8k:
        adapter = f"{config.learner.init_from}/adapter" if config.learner.init_from else None
        out["eval_before"] = heldout_accuracy(model, adapter, config)
        sampled_before = sampled_eval(model, adapter, config)
        console.say(f"held-out greedy accuracy before RL: {out['eval_before']:.1%}")

    records = launch.run_to_end(config, "math_rl_config.json", replace=True)
    out.update(steps=len(records), run_dir=str(config.run_dir), seconds=time.time() - t0,
               **{f"{name}_{w}": window_mean(records, lambda r, k=key: r.get(k), w == "first")
                  for name, key in (("reward", "reward/mean"), ("correct", "env/correct"), ("format", "env/format"))
                  for w in ("first", "last")})
    if records and "eval/accuracy" in records[-1]:
        out["eval_after"] = records[-1]["eval/accuracy"]
        out["eval_nll_after"] = records[-1]["eval/nll"]
        sampled_after = sampled_eval(model, latest_checkpoint(config.run_dir)["path"] + "/adapter", config)
        for key in ("reward", "correct", "format"):
            out[f"sampled_{key}_before"] = sampled_before[f"eval/{key}"]
            out[f"sampled_{key}_after"] = sampled_after[f"eval/{key}"]
    console.say(f"RL ({len(records)} async steps): train reward {out['reward_first']:.3f} -> {out['reward_last']:.3f}, "
          f"correct {out['correct_first']:.1%} -> {out['correct_last']:.1%}, format {out['format_first']:.1%} -> "
          f"{out['format_last']:.1%} (first vs last quarter of the steps)")
    if "eval_after" in out:
        console.say(f"held-out greedy accuracy: {out['eval_before']:.1%} -> {out['eval_after']:.1%}; "
              f"NLL per token of the right answers after RL: {out['eval_nll_after']:.3f}")
        console.say("held-out, 4 samples each at temperature {:g}: reward {:.3f} -> {:.3f}, correct {:.1%} -> {:.1%}, "
              "format {:.1%} -> {:.1%}".format(config.explorer.temperature, *(
                  out[f"sampled_{k}_{w}"] for k in ("reward", "correct", "format") for w in ("before", "after"))))
    (Path(out["run_dir"]) / "summary.json").write_text(json.dumps(out, indent=1))
    console.say(f"total {out['seconds']:.0f} s; everything the run wrote (summary.json: these figures) is in {config.run_dir}")
    return out


if __name__ == "__main__":
    main(stop_engines=True)
