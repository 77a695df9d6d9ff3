"""Trained tokens/s and the stale-drop share with more explorers and more learner processes.

    python benchmarks/bench_scale.py [--explorers 1,2,3] [--processes 1,2] [--steps 60] [--max-staleness 1]
        [--sampler local|vllm] [--strategy ddp|fsdp] [--explorer-devices D,D,..] [--learner-devices cuda:I,J,..]
        [--set key=value ...] [--model PATH] [--dir DIR] [--grid]

Each configuration is one `rlpipe run` to the end on the toy digits env (rewards graded from
the first step) in the demo's shape (8 groups x 16 samples x <= 12 tokens, LoRA rank 16), with
explorer.count = E explorers sharing the buffer's admission budget and learner.processes = P
learner ranks (torchrun; gloo on the CPU). The runs: each explorer count with the first process
count, and each process count with the first explorer count (--grid: every pair). Figures:

    wall      seconds from launch to exit (engine starts, model loads and shutdown included)
    tok/s     trained tokens/s: tokens/trained summed over steps 2..N, divided by the time from
              the end of step 1 to the end of step N ("time_end" in metrics.jsonl), so engine
              start and the first step's warm-up are left out
    received  groups the buffer received; stale: of these, dropped as stale at serve time
    share     stale / received; x base: tok/s over the 1-explorer, 1-process run's (or the first run's)

A line per run as it ends, then the table and one JSON line with every figure. The defaults
(4 runs of 60 steps) take about 2.5 minutes on a 2-core machine, --grid (6 runs) about 3.5.

Measured on the 2-core development machine (--grid, 60 steps, local sampler, gloo):

    explorers procs  wall s    tok/s received stale  share x base
            1     1      31     6757      484     0   0.0%   1.00
            2     1      26     9945      496     0   0.0%   1.47
            3     1      29     9352      493     0   0.0%   1.38
            1     2      36     6922      488     0   0.0%   1.02
            2     2      32     9997      490     0   0.0%   1.48
            3     2      36     9138      494     0   0.0%   1.35

The limits of this machine (2 CPU cores, no GPU). The buffer, the learner rank(s) and every
explorer with its sampler share the same 2 cores, so these figures are not speed-ups to expect
on real hardware. What they show: the stale-drop share stays at 0 as explorers are added (the
shared admission budget keeps them from starting groups that would be trained too late; with
each explorer deciding alone, 3 explorers lost 19-33% of their groups as stale here), and the
extra processes cost little once each explorer's engine takes its own share of the cores
(explorer.engine.cpu_threads; before that, 2 explorers ran 15x slower than 1, every engine's OpenMP
threads spinning on both cores). Two engines of one thread each sample the tiny model faster
than one engine of two threads (small matrices: per-call overhead, not arithmetic, bounds
it), hence the 1.4x; 2 learner ranks on 2 shared cores gain nothing and lose little.
Speed-ups need a device per explorer and per rank: on a GPU machine, one vLLM engine per GPU,
e.g. `--sampler vllm --explorer-devices cuda:2,cuda:3,cuda:4 --learner-devices cuda:0,1` (a run
with E explorers and P ranks uses the first E and P of them; each --set goes to every run as it is).
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlpipe.metrics import read_metrics
from rlpipe.pipeline import transport
from rlpipe.pipeline.stats import run_stats

REPO = Path(__file__).resolve().parent.parent


def write_config(root: Path, name: str, explorers: int, processes: int, args) -> Path:
    ports = [transport.free_port() for _ in range(3)]
    config = root / f"{name}.toml"
    config.write_text("\n".join([
        f'name = "{name}"', f'runs_dir = "{root}"', f"max_staleness = {args.max_staleness}",
        f"groups_per_batch = {args.groups}", f'base_model = "{args.model}"',
        "[dataset]", 'factory = "envs.toy:DigitsDataset"', f"args = {{ group_size = {args.group_size} }}",
        # Each explorer may hold two batches' worth: the shared budget, not concurrency, is the limit.
        "[explorer]", f"count = {explorers}", f'sampler = "{args.sampler}"', f"concurrency = {2 * args.groups}",
        f"max_tokens = {args.max_tokens}",
        *([f"devices = {json.dumps(args.explorer_devices.split(',')[:explorers])}"] if args.explorer_devices else []),
        "[learner]", f"steps = {args.steps}", f"processes = {processes}", "rank = 16", "learning_rate = 3e-4",
        "checkpoint_every = 1000", f'strategy = "{args.strategy}"',
        *([f'device = "cuda:{",".join(args.learner_devices.removeprefix("cuda:").split(",")[:processes])}"']
          if args.learner_devices else []),
        "[addresses]", *(f'{k} = "tcp://127.0.0.1:{p}"' for k, p in zip(("experience", "batches", "control"), ports)),
    ]) + "\n")
    return config


def leftovers(config: Path) -> list[int]:
    """Processes whose command line names the config: torchrun's ranks run in sessions of their own."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(config) in cmdline.read_text():
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass  # gone meanwhile
    return pids


def show_failure(out: str, run_dir: Path) -> None:
    print(out[-3000:])
    for log in sorted((run_dir / "logs").glob("*.log")):
        print(f"--- {log} (tail)")
        print("\n".join(log.read_text(errors="replace").splitlines()[-30:]))


def run(explorers: int, processes: int, args, root: Path) -> dict:
    name = f"e{explorers}-p{processes}"
    config = write_config(root, name, explorers, processes, args)
    sets = [x for s in args.set for x in ("--set", s)]
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "rlpipe.cli", "run", str(config), "--quiet", *sets], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=args.timeout_s)
        error = f"exit code {proc.returncode}" if proc.returncode else ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # `rlpipe run` stops its roles on SIGINT
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        error = f"timed out after {args.timeout_s:.0f} s"
    wall = time.monotonic() - start
    if left := leftovers(config):
        print(f"{name}: {len(left)} processes left behind, killed: {left}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    row = {"name": name, "explorers": explorers, "processes": processes, "wall_s": round(wall, 1), "error": error}
    run_dir = root / name
    if error:
        print(f"{name}: FAILED ({error})")
        show_failure(out, run_dir)
        return row
    records = read_metrics(run_dir / "metrics.jsonl")
    stats = run_stats(run_dir)
    buffer = stats["buffer"]
    stale = buffer["dropped"].get("stale", 0)
    span = records[-1]["time_end"] - records[0]["time_end"] if len(records) > 1 else 0.0
    tokens = sum(r["tokens/trained"] for r in records[1:])
    return {**row, "steps": len(records), "learner_processes": records[-1].get("learner/processes"),
            "tokens_per_s": round(tokens / span, 1) if span > 0 else math.nan,
            "received": buffer["received"], "stale": stale, "stale_share": round(stale / max(1, buffer["received"]), 4),
            "finished_by_explorer": {k: v["finished"] for k, v in stats["explorers"]["by_explorer"].items()}}


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if r["explorers"] == r["processes"] == 1 and not r["error"]),
                next((r for r in rows if not r["error"]), None))
    print(f"{'explorers':>9} {'procs':>5} {'wall s':>7} {'steps':>5} {'tok/s':>8} {'received':>8} {'stale':>5} "
          f"{'share':>6} {'x base':>6}")
    for r in rows:
        if r["error"]:
            print(f"{r['explorers']:>9} {r['processes']:>5} {r['wall_s']:>7.0f}  FAILED: {r['error']}")
            continue
        r["vs_base"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base["tokens_per_s"] else math.nan
        print(f"{r['explorers']:>9} {r['processes']:>5} {r['wall_s']:>7.0f} {r['steps']:>5} {r['tokens_per_s']:>8.0f} "
              f"{r['received']:>8} {r['stale']:>5} {r['stale_share']:>6.1%} {r['vs_base']:>6.2f}")
    if base:
        print(f"x base: tok/s over {base['name']}'s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--explorers", default="1,2,3", help="comma-separated explorer.count values")
    parser.add_argument("--processes", default="1,2", help="comma-separated learner.processes values")
    parser.add_argument("--grid", action="store_true", help="every (explorers, processes) pair, not the two axes")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-staleness", type=int, default=1)
    parser.add_argument("--groups", type=int, default=8, help="groups_per_batch")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--sampler", choices=("local", "vllm"), default="local", help="vllm: an engine per explorer")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="learner.strategy")
    parser.add_argument("--explorer-devices", default="", help="explorer.devices: a run with E explorers takes the first E")
    parser.add_argument("--learner-devices", default="", help="cuda:I,J,..: a run with P ranks takes the first P GPUs")
    parser.add_argument("--set", action="append", default=[], help="key=value for every run (repeatable)")
    parser.add_argument("--model", default="", help="default: the embedded tiny model")
    parser.add_argument("--dir", default="", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--timeout-s", type=float, default=900, help="per run")
    args = parser.parse_args()
    explorer_counts = [int(x) for x in args.explorers.split(",")]
    process_counts = [int(x) for x in args.processes.split(",")]
    pairs = [(e, p) for p in process_counts for e in explorer_counts
             if args.grid or e == explorer_counts[0] or p == process_counts[0]]
    print(f"workload: {args.groups} groups x {args.group_size} samples x <= {args.max_tokens} tokens per step, "
          f"{args.steps} steps, max_staleness {args.max_staleness}, sampler {args.sampler}, {os.cpu_count()} cores; "
          f"runs (explorers, processes): {pairs}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.dir:  # a fresh directory inside it: an existing run directory would be resumed
            Path(args.dir).mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(dir=args.dir) if args.dir else tmp).resolve()
        print(f"run directories in {root}", flush=True)
        for explorers, processes in pairs:
            row = run(explorers, processes, args, root)
            rows.append(row)
            if not row["error"]:
                print(f"{row['name']}: {row['wall_s']:.0f} s, {row['steps']} steps, {row['tokens_per_s']:.0f} tok/s, "
                      f"{row['stale']}/{row['received']} stale ({row['stale_share']:.1%})", flush=True)
    print()
    print_table(rows)
    print(json.dumps({"workload": {k: getattr(args, k) for k in ("steps", "max_staleness", "groups", "group_size",
                                                                   "max_tokens", "sampler", "strategy", "set", "model")},
                      "cores": os.cpu_count(), "runs": rows}))


if __name__ == "__main__":
    main()
