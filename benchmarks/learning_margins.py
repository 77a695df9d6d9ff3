"""How far each learning test's bound sits from what the tests measure, over seeds, torch thread
counts and CPU kernel sets.

    python benchmarks/learning_margins.py                       # the whole grid, every `learning` test
    python benchmarks/learning_margins.py --seeds 0 --isa native,avx2 -- tests/test_recipes.py

A learning test asserts an effect of training (tests/learning.py: holds()). Its size depends on
the seed and on float rounding, and the rounding depends on the processor: torch picks AVX-512,
AVX2 or plain kernels by what the CPU has, and the same training run on the same weights lands
elsewhere with each (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine moves the embedded model's
pre-training by up to 0.15 per weight). So each test runs once per (seed, threads, kernels):
RLPIPE_TEST_SEED, RLPIPE_TEST_THREADS (and OMP_NUM_THREADS for the processes a test starts) and
ATEN_CPU_CAPABILITY. Per check it prints the bound, the values' mean, worst, range and standard
deviation (the spread), and the margin (mean to bound) in spreads. A check passes the bar when
every run of the grid passed and its margin is at least 2 spreads: the bound then sits inside
the worst case measured, by at least the spread that seeds and kernel sets give together.

The table is also written as Markdown (--out, default benchmarks/learning_margins.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_grid(seeds, threads, isas, pytest_args, log) -> tuple[list[dict], list[str]]:
    records, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed, n, isa in itertools.product(seeds, threads, isas):
            margins = Path(tmp) / f"{seed}-{n}-{isa}.jsonl"
            env = {**os.environ, "RLPIPE_TEST_SEED": str(seed), "RLPIPE_TEST_THREADS": str(n),
                   "OMP_NUM_THREADS": str(n), "RLPIPE_MARGINS": str(margins), "HF_HUB_OFFLINE": "1"}
            if isa != "native":
                env["ATEN_CPU_CAPABILITY"] = isa
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "learning", *pytest_args]
            start = time.monotonic()
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
            log(f"seed {seed}, {n} thread(s), kernels {isa}: {summary} ({time.monotonic() - start:.0f} s)")
            if done.returncode != 0:
                failures.append(f"seed {seed}, threads {n}, {isa}: {summary}")
                log("\n".join(line for line in done.stdout.splitlines()
                               if line.startswith(("FAILED", "ERROR", "E   "))))
            if margins.exists():
                records += [json.loads(line) for line in margins.read_text().splitlines() if line.strip()]
    return records, failures


def table(records: list[dict]) -> list[dict]:
    checks = defaultdict(list)
    for r in records:
        checks[r["test"], r["what"], r["op"], r["bound"]].append(r)
    rows = []
    for (test, what, op, bound), runs in sorted(checks.items()):
        values = [r["value"] for r in runs]
        mean, spread = statistics.fmean(values), max(values) - min(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        worst = min(values) if op == ">" else max(values)
        margin = (mean - bound) if op == ">" else (bound - mean)
        passed = all((v > bound) if op == ">" else (v < bound) for v in values)
        rows.append({"test": test, "what": what, "op": op, "bound": bound, "n": len(values), "mean": mean,
                     "worst": worst, "min": min(values), "max": max(values), "range": spread, "sd": sd,
                     "margin": margin, "spreads": margin / sd if sd > 0 else float("inf"),
                     "ok": passed and margin >= 2 * sd})
    return rows


def markdown(rows: list[dict], grid: str) -> str:
    lines = [f"Learning-test margins over {grid} (python benchmarks/learning_margins.py).", "",
             "| test | check | bound | runs | mean | worst | range | spread (sd) | margin / spread | bar |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['test'].split('::', 1)[-1]} | {r['what']} | {r['op']} {r['bound']:.3g} | {r['n']} | "
                     f"{r['mean']:.3g} | {r['worst']:.3g} | {r['range']:.3g} | {r['sd']:.3g} | {r['spreads']:.1f} | "
                     f"{'ok' if r['ok'] else 'BELOW'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--isa", default="native,avx2", help="torch kernel sets: native, avx2, default (no SIMD)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "learning_margins.md"))
    parser.add_argument("--records", default="", help="also keep every measured value here (JSONL)")
    parser.add_argument("pytest_args", nargs="*", help="after --: test files or -k expressions")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    isas = args.isa.split(",")
    records, failures = run_grid(seeds, threads, isas, args.pytest_args, lambda s: print(s, flush=True))
    if args.records:
        Path(args.records).write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = table(records)
    grid = f"seeds {args.seeds}, threads {args.threads}, kernels {args.isa}"
    text = markdown(rows, grid)
    print("\n" + text)
    Path(args.out).write_text(text)
    below = [r for r in rows if not r["ok"]]
    print(f"{len(rows)} checks, {len(below)} below the bar (margin under 2 spreads or a failed run); "
          f"{len(failures)} failed pytest runs")
    sys.exit(1 if below or failures else 0)


if __name__ == "__main__":
    main()
