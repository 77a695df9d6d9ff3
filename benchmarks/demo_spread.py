"""The demo's figures over seeds, torch thread counts and CPU kernel sets: what the README quotes.

    python benchmarks/demo_spread.py                         # seeds 0,1,2 x threads 1,2 x kernels native,avx2
    python benchmarks/demo_spread.py --seeds 0 --isa native  # one run

The demo starts from the shipped embedded model, identical everywhere; its SFT warm-up and RL
then run on this processor's float kernels, and RL sampling is random. Each run is
`rlpipe demo --seed S` with OMP_NUM_THREADS and ATEN_CPU_CAPABILITY set (avx2 on an AVX-512
machine stands in for a processor without AVX-512). Prints each run's held-out greedy accuracy
after the warm-up and after RL, the training reward, and the wall time, then the range of each.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARMUP = re.compile(r"held-out greedy accuracy (\d+\.\d)%")
AFTER = re.compile(r"held-out greedy accuracy: (\d+\.\d)% -> (\d+\.\d)%\s+total (\d+) s")
REWARD = re.compile(r"train reward (-?\d+\.\d+) \(first \d+ steps\) -> (-?\d+\.\d+)")


def one_run(seed: int, threads: int, isa: str, steps: int | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    if isa != "native":
        env["ATEN_CPU_CAPABILITY"] = isa
    with tempfile.TemporaryDirectory() as runs:
        cmd = [sys.executable, "-m", "rlpipe.cli", "demo", "--quiet", "--seed", str(seed), "--runs-dir", runs]
        if steps:
            cmd += ["--steps", str(steps)]
        start = time.monotonic()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - start
    out = done.stdout + done.stderr
    after, reward = AFTER.search(out), REWARD.search(out)
    if done.returncode != 0 or after is None or reward is None:
        raise SystemExit(f"the demo failed (seed {seed}, {threads} threads, {isa}):\n{out[-3000:]}")
    return {"seed": seed, "threads": threads, "isa": isa, "warmup": float(after.group(1)),
            "after": float(after.group(2)), "reward_first": float(reward.group(1)),
            "reward_last": float(reward.group(2)), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--isa", default="native,avx2")
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default: the demo's 100)")
    args = parser.parse_args()
    runs = []
    grid = itertools.product(map(int, args.seeds.split(",")), map(int, args.threads.split(",")), args.isa.split(","))
    for seed, threads, isa in grid:
        run = one_run(seed, threads, isa, args.steps)
        runs.append(run)
        print(f"seed {seed}, {threads} thread(s), kernels {isa}: held-out greedy accuracy {run['warmup']:.1f}% after "
              f"the warm-up -> {run['after']:.1f}% after RL; train reward {run['reward_first']:.3f} -> "
              f"{run['reward_last']:.3f}; {run['wall_s']:.0f} s", flush=True)
    for key, label in (("warmup", "accuracy after the warm-up (%)"), ("after", "accuracy after RL (%)"),
                       ("reward_first", "train reward, first fifth of RL"),
                       ("reward_last", "train reward, last fifth of RL"), ("wall_s", "wall time (s)")):
        values = [r[key] for r in runs]
        print(f"{label}: {min(values):.3g} - {max(values):.3g} (median {statistics.median(values):.3g}, "
              f"{len(values)} runs)")
    gains = [r["after"] - r["warmup"] for r in runs]
    print(f"RL's gain in held-out accuracy (points): {min(gains):.1f} - {max(gains):.1f}")
    rewards = [r["reward_last"] - r["reward_first"] for r in runs]
    print(f"RL's gain in train reward: {min(rewards):+.3f} - {max(rewards):+.3f}")


if __name__ == "__main__":
    main()
