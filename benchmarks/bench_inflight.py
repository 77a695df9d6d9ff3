"""What an in-flight weight update costs, and keeping the KV against recomputing it.

    python benchmarks/bench_inflight.py [--requests 16] [--max-tokens 192] [--updates 3]

On the embedded model with the vLLM sampler in weight_updates="inflight" mode: `--requests`
sequences decode at once (one request, n samples) while `--updates` new adapter versions
load in the middle, each one real learner step (TrainingClient, cross_entropy, Adam at the
rule-of-thumb learning rate) after the last. For each way of treating the running requests'
KV (recompute: rlpipe's choice; keep: PipelineRL's), and for the same batch with no update:
- the load_adapter call's wall time per update (snapshot, pause, in-place swap, resume) and
  the pause alone;
- the batch's wall time against the no-update run: the cost the running requests pay
  (with recompute, their prefill again);
- |sampling logprob - learner logprob under the version that sampled the token| (peft on the
  base + that version's adapter, fp32), over the tokens sampled after the first update;
- the update's cost as a fraction of one learner step: the demo's batch (8 groups x 8, ~48
  tokens) and a long-tail one (64 x (16 + max_tokens)).

The adapters start from a warm start (a few supervised steps on random token runs without
EOS) so that the embedded model's samples run to max_tokens instead of stopping after ~10.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import numpy as np
import torch

from rlpipe import ServiceClient, types
from rlpipe.sampling import SamplingClient, start_engine
from rlpipe.testing.embedded import default_model_path
from rlpipe.training.hyperparams import get_lr
from rlpipe.types import ModelInput, SamplingParams

PROMPT = [3, 40, 50, 60, 4]


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def learner_step(tc, data, lr: float) -> float:
    started = time.perf_counter()
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=lr)).result()
    return time.perf_counter() - started


def scorer(model_path: str):
    """score(tokens_after_prompt, adapter_dir) -> per-token logprobs under peft on the base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = {}

    @torch.no_grad()
    def score(completion: list[int], adapter: str) -> np.ndarray:
        if adapter not in models:
            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            models[adapter] = PeftModel.from_pretrained(base, adapter).eval()
        ids = torch.tensor([PROMPT + completion])
        logits = models[adapter](input_ids=ids).logits[0, len(PROMPT) - 1:-1].double()
        return torch.log_softmax(logits, -1).gather(1, ids[0, len(PROMPT):, None])[:, 0].numpy()

    return score


def run(engine, dirs: dict[int, str], first: int, updates: list[int], requests: int, max_tokens: int,
        spacing_s: float) -> tuple[float, list[float], list]:
    adapter = engine.load_adapter(dirs[first], first)
    client = SamplingClient(engine, adapter, first)
    started = time.perf_counter()
    future = client.sample(ModelInput.from_ints(PROMPT), requests, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=5))
    load_ms = []
    for version in updates:
        time.sleep(spacing_s)
        t = time.perf_counter()
        engine.load_adapter(dirs[version], version)
        load_ms.append((time.perf_counter() - t) * 1e3)
    seqs = future.result().sequences
    return time.perf_counter() - started, load_ms, seqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind, interleaved; medians reported")
    args = parser.parse_args()
    model = str(default_model_path())
    rng = random.Random(0)

    # Adapter versions: a warm start, then one learner step each.
    tc = ServiceClient(checkpoint_dir=tempfile.mkdtemp()).create_lora_training_client(base_model=model, rank=8, seed=0)
    runs = [datum([rng.randrange(20, 300) for _ in range(160)]) for _ in range(8)]
    for _ in range(4):
        learner_step(tc, runs, 2e-2)
    lr = get_lr(model)
    dirs = {0: tc.save_weights_for_sampler("v0").result().path}
    for v in range(1, 2 + (3 + 2 * args.updates) * args.repeats):
        learner_step(tc, runs, lr)
        dirs[v] = tc.save_weights_for_sampler(f"v{v}").result().path
    demo = [datum([rng.randrange(20, 300) for _ in range(48)]) for _ in range(64)]
    long_tail = [datum([rng.randrange(20, 300) for _ in range(16 + args.max_tokens)]) for _ in range(64)]
    step_demo = statistics.median(learner_step(tc, demo, lr) for _ in range(3))
    step_long = statistics.median(learner_step(tc, long_tail, lr) for _ in range(2))

    engine = start_engine(model, "vllm", weight_updates="inflight", max_loaded_adapters=2)
    score = scorer(model)
    try:
        engine.load_adapter(dirs[0], 0)
        run(engine, dirs, 0, [], 4, 8, 0)  # warm-up
        spacing = run(engine, dirs, 1, [], args.requests, args.max_tokens, 0)[0] / (args.updates + 1)
        results = {"none": [], "recompute": [], "keep": []}
        next_version = 2
        for _ in range(args.repeats):  # interleaved, so that the machine's load hits every kind alike
            for name in results:
                engine._live.recompute_kv = name == "recompute"
                first = next_version
                updates = [] if name == "none" else list(range(first + 1, first + 1 + args.updates))
                next_version += 1 + len(updates)
                pauses = len(engine._live.pause_ms)
                wall, load_ms, seqs = run(engine, dirs, first, updates, args.requests, args.max_tokens, spacing)
                after = []
                for s in seqs if updates else []:
                    versions = np.array(s.token_versions())
                    ref = np.empty(len(s.tokens))
                    for v in set(versions.tolist()):
                        ref[versions == v] = score(s.tokens, dirs[v])[versions == v]
                    after += np.abs(np.array(s.logprobs) - ref)[versions != first].tolist()
                results[name].append((wall, sum(len(s.tokens) for s in seqs), load_ms,
                                      engine._live.pause_ms[pauses + 1:], after))  # [pauses]: the run's first load
    finally:
        engine.shutdown()

    base_s = statistics.median(r[0] for r in results["none"])
    base_tokens = statistics.median(r[1] for r in results["none"])
    rows = []
    for name in ("recompute", "keep"):
        runs_ = results[name]
        after = [d for r in runs_ for d in r[4]]
        rows.append((name, statistics.median(x for r in runs_ for x in r[2]), statistics.median(x for r in runs_ for x in r[3]),
                     statistics.median(r[0] for r in runs_), statistics.median(r[1] for r in runs_), len(after),
                     float(np.mean(after)) if after else float("nan"), float(np.max(after)) if after else float("nan")))
    print(f"embedded model, vLLM CPU, {args.requests} sequences x up to {args.max_tokens} tokens, {args.updates} updates, "
          f"medians of {args.repeats} interleaved runs")
    print(f"no update: {base_s:.2f} s for {base_tokens:.0f} tokens ({base_tokens / base_s:.0f} tok/s)")
    print(f"learner step: demo batch (64 x 48 tokens) {step_demo * 1e3:.0f} ms, long-tail batch "
          f"(64 x {16 + args.max_tokens}) {step_long * 1e3:.0f} ms")
    print(f"{'KV':10s} {'update ms':>9s} {'pause ms':>8s} {'batch s':>7s} {'extra ms/upd':>12s} {'% demo step':>11s} "
          f"{'% long step':>11s} {'tokens after':>12s} {'mean |d lp|':>11s} {'max |d lp|':>10s}")
    for name, load, pause, wall, tokens, n_after, mean, mx in rows:  # n_after: over all runs
        # the batch's extra time over the no-update run, per token so that lengths do not count
        extra_ms = max(0.0, (wall / tokens - base_s / base_tokens) * tokens / args.updates * 1e3)
        cost_ms = load + extra_ms
        print(f"{name:10s} {load:9.1f} {pause:8.1f} {wall:7.2f} {extra_ms:12.1f} {100 * cost_ms / 1e3 / step_demo:10.1f}% "
              f"{100 * cost_ms / 1e3 / step_long:10.1f}% {n_after:12d} {mean:11.2e} {mx:10.2e}")
    print("update ms: load_adapter's wall time; extra ms/upd: the batch's time over the no-update run's "
          "(per token), per update; % of a learner step: (update + extra) / step")


if __name__ == "__main__":
    main()
