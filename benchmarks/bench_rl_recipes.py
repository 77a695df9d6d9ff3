"""Do the RL recipes learn? Each one end to end (buffer, learner and explorer as processes, the
local sampler), over seeds, with its key metric before and after RL on held-out tasks.

    python benchmarks/bench_rl_recipes.py                          # every recipe, seeds 0,1,2
    python benchmarks/bench_rl_recipes.py --recipes math_rl --seeds 0

These checks need tens of steps each (2-5 minutes a run on 2 CPU cores), so they live here and
not in the test suite; tests/test_rl_recipes.py runs each recipe a few steps and checks its
plumbing. Each run's gain is compared with a bar set well inside the spread measured here; the
script exits 1 if any run falls below its bar.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# recipe -> (its arguments, [(what, gain from the recipe's results, bar)])
RECIPES = {
    "math_rl": (["--steps", "60", "--sft-steps", "10", "--groups-per-batch", "8", "--group-size", "8", "--lr", "1e-3",
                 "--eval-n", "200"],
                [("sampled reward (200 problems x 4)", lambda m: m["sampled_reward_after"] - m["sampled_reward_before"],
                  0.01),
                 ("answer-form rate", lambda m: m["sampled_format_after"] - m["sampled_format_before"], 0.15)]),
    "tool_use_rl": (["--steps", "15", "--groups-per-batch", "4", "--group-size", "8", "--eval-tasks", "128"],
                    [("well-formed episodes (128 tasks x 2)", lambda m: m["eval_format_after"] - m["eval_format_before"],
                      0.1),
                     ("tool errors per episode, fewer", lambda m: m["eval_tool_errors_before"] - m["eval_tool_errors_after"],
                      0.1)]),
    "multi_agent_rl": (["--steps", "15", "--sft-steps", "3", "--games-per-batch", "16", "--eval-games", "64"],
                       [("unreadable moves, fewer (64 games)",
                         lambda m: m["eval_unreadable_per_move_before"] - m["eval_unreadable_per_move_after"], 0.15),
                        ("moves per game", lambda m: m["eval_moves_after"] - m["eval_moves_before"], 0.5)]),
}


def main() -> None:
    from tests.scripted import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    below = 0
    for name in args.recipes.split(","):
        recipe_args, checks = RECIPES[name]
        gains: dict[str, list[float]] = {what: [] for what, _, _ in checks}
        for seed in map(int, args.seeds.split(",")):
            start = time.monotonic()
            with tempfile.TemporaryDirectory() as runs:
                m = load_recipe(name)([*recipe_args, "--sampler", "local", "--seed", str(seed), "--runs-dir", runs])
            figures = []
            for what, gain, bar in checks:
                g = gain(m)
                gains[what].append(g)
                below += g <= bar
                figures.append(f"{what} {g:+.3f}{'' if g > bar else ' BELOW ' + str(bar)}")
            print(f"{name} seed {seed}: {'; '.join(figures)} ({time.monotonic() - start:.0f} s)", flush=True)
        for what, _, bar in checks:
            values = gains[what]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{name}: {what}: gain {min(values):+.3f} .. {max(values):+.3f} (mean {statistics.fmean(values):+.3f},"
                  f" sd {sd:.3f}), bar > {bar}")
    sys.exit(1 if below else 0)


if __name__ == "__main__":
    main()
