"""The demo's workload through `rlpipe run`, synchronous and asynchronous, and where a step goes.

    python benchmarks/bench_pipeline.py [--steps 40] [--sampler vllm|local] [--learner-threads 0,1,2]

Workload: the demo's shape (8 prompts x 16 samples, <= 12 new tokens, LoRA rank 16) on the toy
digits env, whose rewards are graded from the first step, so no SFT warm-up is needed and
every group carries signal (as most do in the demo after its warm-up).

Printed per run: time from launch to the end of the first step, steady seconds per step
(median after --skip steps), and the split of a learner step: waiting for the batch,
training (forward_backward + optim_step), publishing the adapter, checkpoint and the rest
(metrics, control messages; from consecutive step end times); trained tokens/s; learner idle
and sampler busy fractions; the explorer's weight-sync latency and engine start time.
--learner-threads measures the learner's torch threads against the sampler's (0 = rlpipe's
default); `taskset -c 0 python benchmarks/bench_pipeline.py ...` shows a 1-core machine.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlpipe.pipeline import transport
from rlpipe.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def run(name: str, staleness: int, threads: int, args, root: Path) -> tuple[list[dict], float, dict]:
    ports = [transport.free_port() for _ in range(3)]
    config = root / f"{name}.toml"
    config.write_text("\n".join([
        f'name = "{name}"', f'runs_dir = "{root}"', f"max_staleness = {staleness}", f"groups_per_batch = {args.groups}",
        f'base_model = "{args.model}"',
        "[dataset]", 'factory = "envs.toy:DigitsDataset"', f"args = {{ group_size = {args.group_size} }}",
        "[explorer]", f'sampler = "{args.sampler}"', f"concurrency = {args.groups * 2}", f"max_tokens = {args.max_tokens}",
        "[learner]", f"steps = {args.steps}", "rank = 16", "learning_rate = 3e-4", "checkpoint_every = 10",
        f"cpu_threads = {threads}",
        "[addresses]", *(f'{k} = "tcp://127.0.0.1:{p}"' for k, p in zip(("experience", "batches", "control"), ports)),
    ]) + "\n")
    start = time.time()
    subprocess.run([sys.executable, "-m", "rlpipe.cli", "run", str(config)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    explorer = next((root / name).glob("explorer-*/stats.json"), None)
    return read_metrics(root / name / "metrics.jsonl"), start, json.loads(explorer.read_text()) if explorer else {}


def median(records, key, default=0.0):
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else default


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the steady figures")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--sampler", default="vllm" if __import__("importlib").util.find_spec("vllm") else "local")
    parser.add_argument("--model", default="")
    parser.add_argument("--modes", default="sync,async")
    parser.add_argument("--learner-threads", default="0", help="comma-separated learner.cpu_threads (0 = default)")
    args = parser.parse_args()
    print(f"workload: {args.groups} groups x {args.group_size} samples x <= {args.max_tokens} tokens per step, "
          f"sampler {args.sampler}, {args.steps} steps per run, steady = after step {args.skip}")
    header = (f"{'run':>14} {'1st step':>9} {'s/step':>7} {'wait':>6} {'train':>6} {'publish':>8} {'ckpt':>6} "
              f"{'rest':>6} {'train tok/s':>12} {'idle':>6} {'busy':>6} {'sync lat':>9} {'engine':>7}")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for threads in map(int, args.learner_threads.split(",")):
            for mode in args.modes.split(","):
                name = f"{mode}-t{threads or 'auto'}"
                # A repeated setting gets its own run directory: reusing one would resume the earlier run.
                root = Path(tempfile.mkdtemp(dir=tmp))
                records, start, explorer = run(name, 0 if mode == "sync" else 1, threads, args, root)
                steady = records[args.skip:]
                ends = [r["time_end"] for r in steady]
                step = statistics.median(b - a for a, b in zip(ends, ends[1:]))
                parts = {k: median(steady, k) for k in ("time/wait_batch_s", "time/train_s", "sync/publish_s")}
                ckpt = statistics.mean(r.get("time/checkpoint_s", 0.0) for r in steady)
                rest = step - sum(parts.values()) - ckpt
                print(f"{name:>14} {records[0]['time_end'] - start:8.1f}s {step:7.3f} {parts['time/wait_batch_s']:6.3f} "
                      f"{parts['time/train_s']:6.3f} {parts['sync/publish_s']:8.4f} {ckpt:6.4f} {rest:6.3f} "
                      f"{median(steady, 'tokens/trained_per_s'):12.0f} {median(steady, 'time/learner_idle_frac'):6.1%} "
                      f"{steady[-1].get('time/sampler_busy_frac', float('nan')):6.1%} "
                      f"{median(steady, 'sync/weight_latency_s'):8.3f}s "
                      f"{explorer.get('engine_start_s', float('nan')):6.1f}s", flush=True)
    print("columns: seconds; 'rest' = step minus wait, train, publish and checkpoint (metrics, control messages); "
          "'idle' = learner waiting for batches; 'busy' = sampler busy; 'engine' = the explorer's engine start")


if __name__ == "__main__":
    main()
