"""The same workload in synchronous and asynchronous mode.

    python benchmarks/bench_pipeline.py [--steps 20] [--sampler vllm|local] [--model DIR]

Prints per mode: wall time per learner step, learner idle fraction, sampler busy fraction,
and the overlap ratio  async step time / max(sample time, train time)  where sample time is
what one batch costs the sampler (measured in sync mode, where nothing overlaps) and train
time is the learner's forward_backward + optim_step. A ratio near 1 means sampling and
training fully overlap; the sync step time is about sample + train.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rlpipe import transport
from rlpipe.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def run(mode: str, args, root: Path) -> list[dict]:
    ports = [transport.free_port() for _ in range(3)]
    staleness = 0 if mode == "sync" else 1
    config = root / f"{mode}.toml"
    config.write_text("\n".join([
        f'name = "{mode}"', f'runs_dir = "{root}"', f"max_staleness = {staleness}", f"groups_per_batch = {args.groups}",
        f'base_model = "{args.model}"' if args.model else "",
        "[dataset]", 'factory = "envs.toy:DigitsDataset"', f"args = {{ group_size = {args.group_size} }}",
        "[explorer]", f'sampler = "{args.sampler}"', f"concurrency = {args.groups * 2}", f"max_tokens = {args.max_tokens}",
        "[learner]", f"steps = {args.steps}", "rank = 16", "learning_rate = 1e-3", "checkpoint_every = 1000",
        f"cpu_threads = {args.learner_threads}",
        "[addresses]", *(f'{k} = "tcp://127.0.0.1:{p}"' for k, p in zip(("experience", "batches", "control"), ports)),
    ]) + "\n")
    subprocess.run([sys.executable, "-m", "rlpipe.cli", "run", str(config)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    return read_metrics(root / mode / "metrics.jsonl")[args.skip:]


def median(records, key):
    return statistics.median(r[key] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the figures")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sampler", default="vllm" if __import__("importlib").util.find_spec("vllm") else "local")
    parser.add_argument("--model", default="")
    parser.add_argument("--learner-threads", type=int, default=0, help="learner.cpu_threads (0 = torch default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sync = run("sync", args, Path(tmp))
        async_ = run("async", args, Path(tmp))
    train = median(sync + async_, "time/train_s")
    sync_step = median(sync, "time/step_s")
    sample = max(sync_step - median(sync, "time/train_s") - median(sync, "sync/publish_s"), 1e-9)
    print(f"workload: {args.groups} groups x {args.group_size} samples x <= {args.max_tokens} tokens per step, "
          f"sampler {args.sampler}, {len(sync)} measured steps per mode")
    for name, records in (("sync", sync), ("async", async_)):
        print(f"{name:5s}  step {median(records, 'time/step_s'):6.2f} s  learner idle {median(records, 'learner/idle_frac'):5.1%}"
              f"  sampler busy {records[-1]['explorer/sampler_busy_frac']:5.1%}  max staleness {max(r['staleness/max'] for r in records):.0f}")
    async_step = median(async_, "time/step_s")
    print(f"sample time / batch {sample:.2f} s, train time {train:.2f} s")
    print(f"speed-up async vs sync {sync_step / async_step:.2f}x; "
          f"overlap ratio async step / max(sample, train) = {async_step / max(sample, train):.2f}")


if __name__ == "__main__":
    main()
