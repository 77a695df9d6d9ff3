"""tinker-cookbook's recipes, unchanged, against `rlpipe serve` on the embedded tiny model: how
far they get.

    python benchmarks/bench_cookbook.py [--sl-epochs 6] [--rl-steps 20]

1. chat_sl on generated arithmetic conversations (role_colon: "User: What is 4 + 5?" ->
   "Assistant: 9", then a new problem): train_mean_nll of the first and last steps.
2. math_rl env=arithmetic (importance_sampling) from the SL checkpoint: reward, format and
   correct of the first and last three steps.
3. The same RL from the bare model, for comparison.
Needs tinker-cookbook (`.ci/setup` installs it). Prints the figures and the wall time of each run.

Measured 2026-12-01 (2 cores): NLL 9.60 -> 1.02 in 48 SL steps (9 s); RL 20 steps from the SL
checkpoint (35 s) and from the bare model (17 s), reward -0.1 throughout: the tiny model never
writes the stop sequence "\n\nUser:" (7 of its character-level tokens) that the env's format
score needs, so every group has one reward and no gradient.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlpipe.testing.embedded import default_model_path
from tests.serve_helpers import ServeProcess
from tests.test_serve_cookbook import arithmetic_conversations, recipe, rows


def rl_run(server, model, log_path, steps, start=None):
    args = ["env=arithmetic", f"model_name={model}", f"log_path={log_path}", "loss_fn=importance_sampling",
            "group_size=8", "groups_per_batch=8", "learning_rate=1e-3", "lora_rank=8", "max_tokens=8",
            f"max_steps={steps}", "eval_every=0", "save_every=0"]
    if start:
        args.append(f"load_checkpoint_path={start}")
    began = time.monotonic()
    recipe("tinker_cookbook.recipes.math_rl.train", args, server, timeout_s=3600)
    steps = [r for r in rows(log_path) if "env/all/reward/total" in r]
    return steps, time.monotonic() - began


def summary(name, steps, wall):
    def avg(part, key):
        return statistics.mean(r[key] for r in part)

    head, tail = steps[:3], steps[-3:]
    print(f"{name}: {len(steps)} steps in {wall:.0f} s")
    for key in ("env/all/reward/total", "env/all/format", "env/all/correct"):
        print(f"  {key:24s} first 3 steps {avg(head, key):.3f} -> last 3 steps {avg(tail, key):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sl-epochs", type=int, default=6)
    parser.add_argument("--rl-steps", type=int, default=20)
    args = parser.parse_args()
    model = str(default_model_path())
    work = Path(tempfile.mkdtemp(prefix="bench-cookbook-"))
    server = ServeProcess(model, work / "state")
    server.start()
    try:
        data = work / "arith.jsonl"
        arithmetic_conversations(data, n=256)
        began = time.monotonic()
        recipe("tinker_cookbook.recipes.chat_sl.train", [f"model_name={model}", f"dataset={data}", f"log_path={work / 'sl'}",
               "batch_size=32", "learning_rate=3e-3", "lora_rank=8", "max_length=128", f"num_epochs={args.sl_epochs}",
               "save_every=0", "eval_every=0"], server, timeout_s=3600)
        nll = [r["train_mean_nll"] for r in rows(work / "sl") if "train_mean_nll" in r]
        print(f"chat_sl: {len(nll)} steps in {time.monotonic() - began:.0f} s, train_mean_nll "
              f"{statistics.mean(nll[:3]):.3f} (first 3 steps) -> {statistics.mean(nll[-3:]):.3f} (last 3)")
        state = [json.loads(line) for line in open(work / "sl" / "checkpoints.jsonl")][-1]["state_path"]
        summary("math_rl from the SL checkpoint", *rl_run(server, model, work / "rl", args.rl_steps, state))
        summary("math_rl from the bare model", *rl_run(server, model, work / "rl-bare", args.rl_steps))
    finally:
        server.stop()
    print(f"logs in {work}")


if __name__ == "__main__":
    main()
