"""The TRL side of benchmarks/bench_async.py: GRPOTrainer on the long-tail counting task.

Run as a subprocess of bench_async.py (`--worker SPEC.json`), so it pays its own imports and
start as rlpipe's roles pay theirs. The setup follows benchmarks/compare_trl.py (read its
docstring for what is comparable): the warm start's lm_head LoRA merged into a copy of the
base and the rest trained as a PEFT adapter (compare_trl.split_lm_head), generation by
transformers `generate`, loss "dapo" with scale_rewards "none" (rlpipe's importance_sampling
loss with its token normalisation), AdamW(0.9, 0.95), constant LR, grad clip, no KL, one
optimizer step per generation batch (on-policy, the reference point of a synchronous trainer).
What differs from compare_trl: the dataset (envs.longtail, same problems in the same order as
rlpipe's runs), the reward (envs.longtail.Problem.score on the completion decoded as
CountEnv.step decodes it) and max_completion_length (the runs' max_tokens).

The worker records, per optimizer step, the rewards and completion lengths and two clocks: when
the reward function is called (generation has just ended) and when the optimizer step ends, so
generation's share of the wall time (TRL's "sampler busy") comes out of the same run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from envs.longtail import LongTailDataset

    out = Path(spec["out_dir"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    base = AutoModelForCausalLM.from_pretrained(spec["trl_base"], dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, spec["trl_adapter"], is_trainable=True)
    groups, group_size = spec["groups_per_batch"], spec["group_size"]
    problems = LongTailDataset(tokenizer, groups_per_batch=groups, group_size=group_size,
                               **spec["dataset_args"]).problems[: groups * spec["steps"]]
    by_question = {p.question: p for p in problems}
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}]} for p in problems])

    log: list[dict] = []  # one entry per optimizer step

    def count_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        generated = time.time()
        scores = [by_question[p[-1]["content"]].score(tokenizer.decode(ids, skip_special_tokens=True))
                  for p, ids in zip(prompts, completion_ids)]
        log.append({"generated": generated, "rewards": scores, "tokens": [len(ids) for ids in completion_ids]})
        return scores

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            log[-1]["end"] = time.time()

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
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[count_reward], args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[StepClock()])
    train_start = time.time()
    trainer.train()
    (out / "worker.json").write_text(json.dumps({"version": trl.__version__, "train_start": train_start, "log": log}))


def run_trl(spec: dict, python: str, extra_path: str = "") -> dict:
    """Runs the worker; returns the step records bench_async.py tabulates (see summarize_trl)."""
    sys.path.insert(0, str(HERE))
    from compare_trl import split_lm_head

    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    spec["trl_base"], spec["trl_adapter"] = split_lm_head(spec["model"], spec["init"], out)  # before the clock
    (out / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    if extra_path:  # a folder with trl and its extra packages (pip install --target), for this process only
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH", "")) if p)
    launch = time.time()
    subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(out / "spec.json")],
                   cwd=HERE.parent, env=env, check=True)
    end = time.time()
    worker_out = json.loads((out / "worker.json").read_text())
    return summarize_trl(worker_out, spec["group_size"], launch, end)


def summarize_trl(worker_out: dict, group_size: int, launch: float, end: float) -> dict:
    """Per step: wall time at its end, the reward over groups with signal (the filter rlpipe's
    buffer applies, so the curves compare) and over all, sampled tokens, generation seconds."""
    steps, previous = [], worker_out["train_start"]
    no_signal = groups = 0
    for entry in worker_out["log"]:
        rewards = entry["rewards"]
        chunks = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
        signal = [r for c in chunks if len(set(c)) > 1 for r in c]
        groups += len(chunks)
        no_signal += sum(len(set(c)) == 1 for c in chunks)
        steps.append({"time_end": entry["end"], "reward": statistics.fmean(signal) if signal else None,
                      "reward_all": statistics.fmean(rewards), "tokens": sum(entry["tokens"]),
                      "generate_s": entry["generated"] - previous, "step_s": entry["end"] - previous})
        previous = entry["end"]
    return {"name": f"TRL {worker_out['version']}", "launch": launch, "end": end, "steps": steps,
            "groups": groups, "no_signal": no_signal, "startup_s": worker_out["train_start"] - launch}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        raise SystemExit("run by benchmarks/bench_async.py (async_trl.py --worker SPEC.json)")
