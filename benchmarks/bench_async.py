"""Where async pays: the long-tail counting task, synchronous vs asynchronous vs TRL.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_async.py \\
        [--settings sync,async1,async2,async4,trl] [--inflight] [--steps 24] [--init DIR] \\
        [--threshold 0.5] [--trl-path DIR] [--out runs/bench_async] [--smoke]

Workload: envs.longtail (count from 1 to n, n heavy-tailed: most answers a few tokens, one in
ten over 50, the longest about 300; max_tokens 320), 4 groups x 8 samples per step, LoRA rank 16,
on the embedded model after an SFT warm-up on the task's format (run once and shared by every
setting; `--init` reuses one). Every setting starts from the same warm start with the same seed,
dataset, batch shape and step budget:
  sync      max_staleness = 0: the learner waits for each batch, sampling waits for each adapter;
  asyncK    max_staleness = K (1, 2, 4);
  inflight  max_staleness = 2 with explorer.weight_updates = "inflight" (--inflight; the setting
            is skipped with a note where the config has no such field);
  trl       TRL's GRPOTrainer, synchronous, as benchmarks/async_trl.py sets it up. Needs trl 1.16:
            `pip install trl==1.16.0` into the venv, or without touching it
            `pip install --no-deps --target DIR/site-packages trl==1.16.0` and --trl-path
            DIR/site-packages (the folder's path must contain "site-packages": datasets
            fingerprints through dill, which pickles modules elsewhere by value and fails on
            pyarrow's MonthDayNano, unslothai/unsloth#9791). Skipped with a note if absent.

Figures per setting (one markdown table, also RESULTS/results.md; the reward curves against wall
time in RESULTS/curves.csv and RESULTS/curves.png):
- time from launch to the reward threshold (the mean train reward of 3 consecutive steps at or
  above it) and to the end; the rewards are those of the groups trained (rlpipe's buffer drops
  groups whose rewards are all equal; TRL's are filtered the same way);
- steps/s and sampled tokens/s from the end of the first step to the last (engine start left
  out); tokens are those of the trained samples (TRL: every completion);
- sampler busy % (the explorer's busy fraction; TRL: generation's share of its steps) and
  learner idle % (waiting for batches; TRL: the same share, it does one thing at a time);
- lag: per-token version lag, mean and max (staleness/mean where the learner logs it, else
  the mean over trained samples of the lag of their oldest token), and the max;
- stale and no-signal drops (the buffer's counts at the last step).
--smoke: 2 steps per setting, a tiny task (max 12 numbers, 48 tokens), the local sampler, a
5-step warm-up and no-signal groups kept: checks the plumbing (tests/test_bench_async.py).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WINDOW = 3  # steps in the rolling mean that must reach the threshold
SFT_STEPS = 150
SFT_BATCH = 16
SFT_LEARNING_RATE = 3e-3
RL_LEARNING_RATE = 3e-4


def task_args(args) -> dict:
    return {"group_size": args.group_size, "max_count": args.max_count, "seed": args.seed}


def base_config(args, name: str, staleness: int):
    from rlpipe.pipeline.config import RunConfig

    config = RunConfig(name=name, runs_dir=str(Path(args.out).resolve()), max_staleness=staleness,
                       groups_per_batch=args.groups, seed=args.seed)
    config.dataset.factory = "envs.longtail:LongTailDataset"
    config.dataset.args = task_args(args)
    config.explorer.sampler = args.sampler
    config.explorer.concurrency = args.concurrency
    config.explorer.max_tokens = args.max_tokens
    config.learner.steps = args.steps
    config.learner.rank = 16
    config.learner.learning_rate = args.lr
    config.learner.checkpoint_every = max(args.steps, 1)  # one checkpoint, at the end, for every setting
    # The smoke run's 5-step warm-up earns no reward: every group would be dropped as having no
    # signal and the learner would wait for batches that never come.
    config.buffer.drop_constant_reward_groups = not args.keep_no_signal
    return config


# --------------------------------------------------------------------------- warm start

def warm_start(args) -> str:
    """SFT on right answers (envs.longtail.answer_datums); returns the save_state path."""
    from envs.longtail import answer_datums
    from rlpipe.pipeline.warmup import sft_warm_up

    config = base_config(args, "warmup", 0)
    data = lambda tok: answer_datums(tok, n=2000, max_count=args.max_count)  # noqa: E731
    t0 = time.time()
    init = sft_warm_up(config, data, args.sft_steps, batch_size=SFT_BATCH, learning_rate=SFT_LEARNING_RATE)
    print(f"SFT warm-up ({args.sft_steps} steps of {SFT_BATCH}, {time.time() - t0:.0f} s): {init}  (reuse with --init)",
          flush=True)
    return init


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def profile_start(args, init: str) -> dict:
    """Samples the warm start on held-out problems (the RL dataset's law, another seed) as the
    explorer would: the length distribution of its answers (tokens) and its reward."""
    from transformers import AutoTokenizer

    from envs.longtail import LongTailDataset
    from rlpipe.pipeline import launch
    from rlpipe.rollouts import do_group
    from rlpipe.sampling import create_sampling_client
    from rlpipe.types import SamplingParams

    config = base_config(args, "profile", 0)
    model = config.model_path()
    tok = AutoTokenizer.from_pretrained(model)
    dataset = LongTailDataset(tok, groups_per_batch=args.profile_groups, **(task_args(args) | {"seed": args.seed + 999}))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
    with launch.launcher_output(config.run_dir, stop_engines=True):  # the engine is gone before the runs start
        sampler = create_sampling_client(model, model_path=f"{init}/adapter",
                                         backend=None if args.sampler == "auto" else args.sampler)

        async def sample():
            return await asyncio.gather(*(do_group(b, lambda: sampler, params) for b in dataset.get_batch(0)))

        groups = asyncio.run(sample())
    trajectories = [t for g in groups for t in g.trajectories]
    lengths = [sum(t.action_mask) for t in trajectories]
    expected = [tok(b.problem.reference_answer(), add_special_tokens=False)["input_ids"] for b in dataset.get_batch(0)]
    out = {"samples": len(trajectories), "len_p50": percentile(lengths, 0.5), "len_p90": percentile(lengths, 0.9),
           "len_max": max(lengths), "truncated": sum(n >= args.max_tokens for n in lengths) / len(lengths),
           "answer_p50": percentile([len(e) + 1 for e in expected], 0.5),
           "answer_p90": percentile([len(e) + 1 for e in expected], 0.9), "answer_max": max(len(e) + 1 for e in expected),
           "reward": statistics.fmean(t.reward for t in trajectories),
           "correct": statistics.fmean(t.metrics.get("correct", 0.0) for t in trajectories),
           "signal_groups": sum(len({t.reward for t in g.trajectories}) > 1 for g in groups) / len(groups)}
    print(f"warm start on {out['samples']} samples ({args.profile_groups} held-out problems x {args.group_size}): "
          f"sampled tokens p50 {out['len_p50']} / p90 {out['len_p90']} / max {out['len_max']} "
          f"({out['truncated']:.0%} at max_tokens; right answers p50 {out['answer_p50']} / p90 {out['answer_p90']} / "
          f"max {out['answer_max']}); reward {out['reward']:.3f}, exact {out['correct']:.1%}, "
          f"groups with signal {out['signal_groups']:.0%}", flush=True)
    return out


# --------------------------------------------------------------------------- rlpipe runs

def run_rlpipe(args, init: str, setting: str) -> dict | None:
    from rlpipe.pipeline import launch
    from rlpipe.pipeline.config import ExplorerConfig

    staleness = {"sync": 0, "async1": 1, "async2": 2, "async4": 4, "inflight": 2}[setting]
    config = base_config(args, setting, staleness)
    config.learner.init_from = init
    if setting == "inflight":
        if "weight_updates" not in ExplorerConfig.__struct_fields__:
            print("inflight: skipped, this checkout's explorer config has no weight_updates field", flush=True)
            return None
        config.explorer.weight_updates = "inflight"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    start = time.time()
    records = launch.run_to_end(config, "bench_config.json", replace=True, quiet=True)
    end = time.time()
    return summarize_rlpipe(setting, records, start, end)


def lag_figures(records: list[dict]) -> tuple[float, float]:
    """(mean, max) version lag of what was trained: staleness/mean (the mean over a batch's
    action tokens, where the learner logs it; weighted here by each step's sampled tokens) or
    else the mean over trained samples of their oldest token's lag (the staleness/<k> counts);
    max is the oldest token's (staleness/max)."""
    if any("staleness/mean" in r for r in records):
        weights = [(r["staleness/mean"], r.get("tokens/sampled", 1.0)) for r in records if "staleness/mean" in r]
        mean = sum(m * w for m, w in weights) / max(sum(w for _, w in weights), 1e-9)
    else:
        counts: dict[int, float] = {}
        for r in records:
            for key, n in r.items():
                if key.startswith("staleness/") and key.split("/", 1)[1].isdigit():
                    counts[int(key.split("/", 1)[1])] = counts.get(int(key.split("/", 1)[1]), 0.0) + n
        mean = sum(k * n for k, n in counts.items()) / max(sum(counts.values()), 1e-9)
    top = max((r.get("staleness/max", 0.0) for r in records), default=0.0)
    return mean, top


def summarize_rlpipe(setting: str, records: list[dict], start: float, end: float) -> dict:
    steps = [{"time_end": r["time_end"], "reward": r.get("reward/mean"), "tokens": r.get("tokens/sampled", 0.0)}
             for r in records]
    steady = records[1:] or records
    last = records[-1]
    mean_of = lambda key: statistics.fmean(r[key] for r in steady if key in r) if any(key in r for r in steady) else None  # noqa: E731
    lag_mean, lag_max = lag_figures(records)
    lag_keys = sorted({k for r in records for k in r if "lag" in k})  # figures a newer learner may log
    trained = sum(r.get("buffer/groups", 0) for r in records)
    return {"name": setting, "launch": start, "end": end, "steps": steps,
            "busy": mean_of("time/sampler_busy_frac"), "idle": mean_of("time/learner_idle_frac"),
            "lag_mean": lag_mean, "lag_max": lag_max,
            "extra_lag": {k: last[k] for k in lag_keys if k in last},
            "stale": last.get("buffer/dropped_stale", 0.0), "no_signal": last.get("buffer/dropped_no_signal", 0.0),
            "groups": trained + last.get("buffer/dropped_stale", 0.0) + last.get("buffer/dropped_no_signal", 0.0)}


# --------------------------------------------------------------------------- the table

def time_to(result: dict, threshold: float) -> float | None:
    rewards = [s["reward"] for s in result["steps"]]
    for i in range(WINDOW - 1, len(rewards)):
        window = [r for r in rewards[i - WINDOW + 1 : i + 1] if r is not None]
        if len(window) == WINDOW and statistics.fmean(window) >= threshold:
            return result["steps"][i]["time_end"] - result["launch"]
    return None


def rates(result: dict) -> tuple[float, float]:
    """(steps/s, sampled tokens/s) from the end of the first step to the end of the last."""
    steps = result["steps"]
    if len(steps) < 2:
        return float("nan"), float("nan")
    span = max(steps[-1]["time_end"] - steps[0]["time_end"], 1e-9)
    return (len(steps) - 1) / span, sum(s["tokens"] for s in steps[1:]) / span


def pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def table(results: list[dict], threshold: float, baseline: str = "sync") -> str:
    base = next((r for r in results if r["name"] == baseline), None)
    base_t = time_to(base, threshold) if base else None
    lines = [f"| setting | time to reward {threshold:g} (s) | vs sync | total (s) | steps/s | sampled tok/s | "
             "sampler busy | learner idle | lag mean / max | stale drops | no-signal drops | reward first -> last 3 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = time_to(r, threshold)
        sps, tps = rates(r)
        speedup = f"{base_t / t:.2f}x" if t and base_t else "n/a"
        rewards = [s["reward"] for s in r["steps"] if s["reward"] is not None]
        arrow = (f"{statistics.fmean(rewards[:WINDOW]):.3f} -> {statistics.fmean(rewards[-WINDOW:]):.3f}"
                 if rewards else "n/a")
        lag = "n/a" if r.get("lag_mean") is None else f"{r['lag_mean']:.2f} / {r['lag_max']:.0f}"
        groups = max(r.get("groups", 0), 1)
        stale = "n/a" if r.get("stale") is None else f"{r['stale']:.0f} ({r['stale'] / groups:.0%})"
        lines.append(f"| {r['name']} | {'not reached' if t is None else f'{t:.1f}'} | {speedup} | "
                     f"{r['end'] - r['launch']:.1f} | {sps:.3f} | {tps:.0f} | {pct(r.get('busy'))} | {pct(r.get('idle'))} | "
                     f"{lag} | {stale} | {r.get('no_signal', 0):.0f} of {groups:.0f} groups | {arrow} |")
    return "\n".join(lines)


def write_curves(results: list[dict], out: Path) -> None:
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "step", "wall_s", "reward"])
        for r in results:
            for i, s in enumerate(r["steps"], 1):
                writer.writerow([r["name"], i, round(s["time_end"] - r["launch"], 3), s["reward"]])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        xs = [s["time_end"] - r["launch"] for s in r["steps"] if s["reward"] is not None]
        ax.plot(xs, [s["reward"] for s in r["steps"] if s["reward"] is not None], marker=".", label=r["name"])
    ax.set_xlabel("wall time from launch (s)")
    ax.set_ylabel("train reward (groups with signal)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="sync,async1,async2,async4,trl")
    parser.add_argument("--inflight", action="store_true", help="add async with explorer.weight_updates = 'inflight'")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16, help="explorer.concurrency (groups in flight)")
    parser.add_argument("--max-count", type=int, default=100, help="the longest answer, in numbers")
    parser.add_argument("--max-tokens", type=int, default=320)
    parser.add_argument("--sampler", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=RL_LEARNING_RATE, help="RL learning rate (every setting)")
    parser.add_argument("--threshold", type=float, default=0.5, help="train reward to reach")
    parser.add_argument("--init", default="", help="a save_state dir to start from (default: run the warm-up)")
    parser.add_argument("--sft-steps", type=int, default=SFT_STEPS)
    parser.add_argument("--profile-groups", type=int, default=16, help="held-out problems to profile the warm start on")
    parser.add_argument("--trl-python", default=sys.executable)
    parser.add_argument("--trl-path", default="", help="a folder holding trl (pip install --target), for TRL's process only")
    parser.add_argument("--trl-threads", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_async")
    parser.add_argument("--retable", action="store_true",
                        help="only print the table again from the settings' saved results in --out (another --threshold, say)")
    parser.add_argument("--keep-no-signal", action="store_true", help="train on groups whose rewards are all equal")
    parser.add_argument("--smoke", action="store_true", help="2 steps per setting on a tiny task with the local sampler")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.groups, args.group_size, args.max_count, args.max_tokens = 2, 2, 4, 12, 48
        args.sampler, args.sft_steps, args.profile_groups, args.concurrency = "local", 5, 2, 4
        args.keep_no_signal = True
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The roles and TRL's worker import this checkout, whatever is installed in the venv.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, str(REPO))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.retable:
        names = args.settings.split(",") + (["inflight"] if args.inflight else [])
        results = [json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").exists()]
        print(table(results, args.threshold))
        return results
    init = str(Path(args.init).resolve()) if args.init else warm_start(args)
    start_profile = profile_start(args, init)
    results = []
    for setting in args.settings.split(",") + (["inflight"] if args.inflight else []):
        print(f"--- {setting} ---", flush=True)
        if setting == "trl":
            result = run_trl_setting(args, init)
        else:
            result = run_rlpipe(args, init, setting)
        if result is not None:
            results.append(result)
            (out / f"{setting}.json").write_text(json.dumps(result))
            print(table([result], args.threshold).splitlines()[-1], flush=True)
    text = table(results, args.threshold)
    write_curves(results, out)
    profile = (f"warm start: sampled tokens p50 {start_profile['len_p50']} / p90 {start_profile['len_p90']} / "
               f"max {start_profile['len_max']}, reward {start_profile['reward']:.3f}")
    (out / "results.md").write_text(f"{profile}\n\n{text}\n")
    print(f"\n{profile}\n{text}\ncurves: {out / 'curves.csv'}", flush=True)
    return results


def run_trl_setting(args, init: str) -> dict | None:
    import importlib.util

    sys.path.insert(0, str(REPO / "benchmarks"))
    from async_trl import run_trl

    if not args.trl_path and args.trl_python == sys.executable and importlib.util.find_spec("trl") is None:
        print("trl: skipped, trl is not installed (pip install trl==1.16.0, or --trl-path DIR)", flush=True)
        return None
    config = base_config(args, "trl", 0)
    spec = {"model": config.model_path(), "init": init, "out_dir": str(Path(args.out).resolve() / "trl"),
            "steps": args.steps, "seed": args.seed, "groups_per_batch": args.groups, "group_size": args.group_size,
            "dataset_args": {k: v for k, v in task_args(args).items() if k != "group_size"},
            "max_tokens": args.max_tokens, "temperature": config.explorer.temperature,
            "learning_rate": args.lr, "grad_clip_norm": config.learner.grad_clip_norm, "threads": args.trl_threads}
    result = run_trl(spec, args.trl_python, args.trl_path)
    steps = result["steps"][1:] or result["steps"]
    share = sum(s["generate_s"] for s in steps) / max(sum(s["step_s"] for s in steps), 1e-9)
    return result | {"busy": share, "idle": share, "lag_mean": 0.0, "lag_max": 0.0, "stale": 0.0}


if __name__ == "__main__":
    main()
