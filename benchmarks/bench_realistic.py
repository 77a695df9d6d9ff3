"""A realistic size on this machine: 3 RL steps through `rlpipe run` on a Qwen3-0.6B-shaped model.

    python benchmarks/bench_realistic.py [--steps 3] [--groups 4] [--group-size 4] [--max-tokens 16]

The model has the real Qwen3-0.6B configuration (hidden 1024, 28 layers, 16 heads / 8 KV heads
of dim 128, intermediate 3072, vocabulary 151,936, tied embeddings), random weights and a
tokenizer trained here (rlpipe.testing.families). The run is the toy digits env (constant-reward groups kept:
the random model rarely writes a digit), LoRA rank 16 on attention, MLP and lm_head, synchronous (each step samples with the newest adapter), the vLLM
sampler in fp32. Printed: seconds per step (and the learner's train / publish part), the
weight sync latency (learner saves -> explorer samples with it), time to the first step, and
the peak RSS of each role's process group (the explorer's includes its vLLM engine
processes), sampled every 0.2 s, and their sum against the machine's memory.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlpipe.pipeline import transport
from rlpipe.testing.families import QWEN3_0_6B, family_model_path
from rlpipe.pipeline.launch import group_members
from rlpipe.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError):
            pass  # gone meanwhile
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def series(records: list[dict], key: str, digits: int) -> str:
    return ", ".join(f"{r.get(key, float('nan')):.{digits}f}" for r in records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--micro-batch-tokens", type=int, default=1024)
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()
    t0 = time.time()
    model = family_model_path("qwen3", **QWEN3_0_6B)
    print(f"model {model} (built or found in {time.time() - t0:.0f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ports = [transport.free_port() for _ in range(3)]
        config = root / "realistic.toml"
        config.write_text("\n".join([
            'name = "realistic"', f'runs_dir = "{root}"', f'base_model = "{model}"', "max_staleness = 0",
            f"groups_per_batch = {args.groups}",
            "[dataset]", 'factory = "envs.toy:DigitsDataset"', f"args = {{ group_size = {args.group_size} }}",
            "[explorer]", 'sampler = "vllm"', f"concurrency = {args.groups}", f"max_tokens = {args.max_tokens}",
            "episode_timeout_s = 900", "first_weights_timeout_s = 1800", "[explorer.engine]", "max_model_len = 512",
            # A random-init model rarely writes a digit: constant-reward groups are trained
            # anyway (they carry no gradient) so that every step has its batch.
            "[buffer]", "drop_constant_reward_groups = false",
            "[learner]", f"steps = {args.steps}", "rank = 16", "learning_rate = 1e-5", "checkpoint_every = 1000",
            f"max_tokens_per_micro_batch = {args.micro_batch_tokens}", "batch_timeout_s = 1800",
            "[addresses]", *(f'{k} = "tcp://127.0.0.1:{p}"' for k, p in zip(("experience", "batches", "control"), ports)),
        ]) + "\n")
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "rlpipe.cli", "run", str(config)], cwd=REPO,
                                env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        pids_file = root / "realistic" / "pids.json"
        peaks: dict[str, float] = {}
        peak_total = 0.0
        try:
            while proc.poll() is None:
                if time.time() - start > args.timeout_s:
                    raise TimeoutError(f"the run did not finish within {args.timeout_s:.0f} s")
                if pids_file.exists():
                    roles = json.loads(pids_file.read_text())
                    now = {role: rss_mb(group_members(pid)) for role, pid in roles.items()}
                    for role, mb in now.items():
                        peaks[role] = max(peaks.get(role, 0.0), mb)
                    peak_total = max(peak_total, sum(now.values()))
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
            out = proc.communicate(timeout=120)[0]
        if proc.returncode != 0:
            sys.exit(f"rlpipe run failed (exit {proc.returncode}):\n{out[-3000:]}")
        wall = time.time() - start
        records = read_metrics(root / "realistic" / "metrics.jsonl")
    step_s = [r["time/step_s"] for r in records]
    print(f"{len(records)} RL steps of {args.groups} x {args.group_size} samples x <= {args.max_tokens} tokens, "
          f"sync, LoRA rank 16 (attention, MLP, lm_head), micro-batches of {args.micro_batch_tokens} tokens")
    print(f"time to the end of step 1: {records[0]['time_end'] - start:.0f} s   whole run: {wall:.0f} s")
    print(f"seconds per step: {', '.join(f'{s:.1f}' for s in step_s)} (median {statistics.median(step_s):.1f})")
    print(f"  of which training (forward_backward + optim_step): {series(records, 'time/train_s', 1)} s; "
          f"tokens trained per step {statistics.median(r['tokens/trained'] for r in records):.0f}")
    print(f"  publishing the adapter: {series(records, 'sync/publish_s', 2)} s")
    print(f"weight sync latency (learner saves -> explorer samples with it): "
          f"{series(records, 'sync/weight_latency_s', 2)} s")
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    for role, mb in sorted(peaks.items()):
        print(f"peak RSS {role:9s} {mb / 1024:6.2f} GB")
    print(f"peak RSS, all roles at once: {peak_total / 1024:.2f} GB of {total_gb:.1f} GB")


if __name__ == "__main__":
    main()
