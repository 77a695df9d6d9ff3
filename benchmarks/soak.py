"""Soak: the pipeline for a long time, with RSS per role and disk use sampled over time.

    python benchmarks/soak.py [--minutes 60] [--every-s 30] [--warmup-minutes 5]

The demo's workload (arithmetic, embedded tiny model, vLLM sampler, async, a checkpoint every
10 steps, the newest 3 kept) runs until --minutes are up. Every --every-s the script records
each role's RSS (its whole process group: the explorer's includes the vLLM engine core) and
the run directory's size, split into the state rlpipe bounds (buffer store, checkpoints,
explorer outbox and adapters) and the append-only records (metrics.jsonl and role logs, which
grow by a line per step by design). Printed: the table, and each figure's growth from the end
of warm-up to the end, against the 5% target.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_realistic import rss_mb

from rlpipe.metrics import read_metrics
from rlpipe.pipeline import transport
from rlpipe.pipeline.launch import group_members

REPO = Path(__file__).resolve().parent.parent
RECORDS = ("metrics.jsonl", "logs")


def size_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:
            pass  # deleted meanwhile (pruning)
    return total / 2**20


def sample(run_dir: Path) -> dict:
    roles = json.loads((run_dir / "pids.json").read_text()) if (run_dir / "pids.json").exists() else {}
    out = {f"rss {role}": rss_mb(group_members(pid)) for role, pid in sorted(roles.items())}
    records = sum(size_mb(run_dir / n) for n in RECORDS if (run_dir / n).exists())
    out["disk state"] = size_mb(run_dir) - records
    out["disk records"] = records
    metrics = read_metrics(run_dir / "metrics.jsonl")
    out["step"] = metrics[-1]["step"] if metrics else 0
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--every-s", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ports = [transport.free_port() for _ in range(3)]
        config = root / "soak.toml"
        config.write_text("\n".join([
            'name = "soak"', f'runs_dir = "{root}"', "max_staleness = 1", "groups_per_batch = 8",
            "[dataset]", 'factory = "envs.arithmetic:ArithmeticDataset"', "args = { group_size = 16, difficulty = 2 }",
            "[explorer]", 'sampler = "vllm"', "concurrency = 16", "max_tokens = 12",
            "[learner]", "steps = 100000000", "rank = 16", "learning_rate = 3e-4", "checkpoint_every = 10",
            "keep_checkpoints = 3",
            "[addresses]", *(f'{k} = "tcp://127.0.0.1:{p}"' for k, p in zip(("experience", "batches", "control"), ports)),
        ]) + "\n")
        run_dir = root / "soak"
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "rlpipe.cli", "run", str(config)], cwd=REPO,
                                env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        print(f"run directory {run_dir} (rlpipe stats {run_dir})", flush=True)
        rows: list[tuple[float, dict]] = []
        try:
            while time.time() - start < args.minutes * 60:
                if proc.poll() is not None:
                    sys.exit(f"the run stopped by itself (exit {proc.returncode}):\n{proc.stderr.read()[-3000:]}")
                time.sleep(args.every_s)
                rows.append((time.time() - start, sample(run_dir)))
                minute, figures = rows[-1]
                print(f"{minute / 60:6.1f} min  " + "  ".join(f"{k} {v:8.1f}" for k, v in figures.items()), flush=True)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
        print(subprocess.run([sys.executable, "-m", "rlpipe.cli", "stats", str(run_dir)], capture_output=True,
                             text=True, cwd=REPO).stdout)
        warm = next((f for t, f in rows if t >= args.warmup_minutes * 60), rows[0][1])
        last = rows[-1][1]
        steps = last["step"] - warm["step"]
        print(f"\nafter warm-up ({args.warmup_minutes:g} min) to the end: {steps} steps")
        for key in last:
            if key == "step" or key not in warm:
                continue
            growth = (last[key] - warm[key]) / max(warm[key], 1e-9)
            verdict = "(grows by design: a line per step)" if key == "disk records" else \
                ("under 5%" if growth < 0.05 else "OVER 5%")
            print(f"  {key:14s} {warm[key]:9.1f} -> {last[key]:9.1f} MB  {growth:+7.1%}  {verdict}")


if __name__ == "__main__":
    main()
