"""Learner peak memory and speed against batch size: one piece vs micro-batches.

    python benchmarks/bench_memory.py [--budget 4096] [--max-tokens 65536] [--seq-len 512]

A ~48M-parameter Llama-architecture model with a 32k vocabulary and tied embeddings (random
init, built here) trains forward_backward + optim_step on batches of 512 up to 64k tokens
(datums of --seq-len tokens). Each point runs in a fresh process, so its peak RSS is its own.
Modes: "one piece" (max_tokens_per_micro_batch 0), "micro" (the budget), "micro+ckpt" (the
budget and gradient checkpointing). A point whose predicted peak exceeds --mem-limit-gb is
not run. Printed: peak RSS above the loaded model (activations, logits, gradients, Adam),
tokens/s, and micro vs one piece wherever one piece fits.
"""

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

CACHE = Path("/tmp/rlpipe-bench-memory")


def build_model() -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlpipe.testing.embedded import default_model_path

    path = CACHE / "llama-48m-32k"
    if (path / "config.json").exists():
        return str(path)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=10,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def one_point(model: str, tokens: int, seq_len: int, budget: int, ckpt: bool) -> dict:
    """Runs in its own process: load, warm up on one datum, then one timed step."""
    import numpy as np
    import torch

    from rlpipe import ServiceClient, types

    client = ServiceClient(CACHE / "ckpt").create_lora_training_client(
        model, rank=16, seed=0, max_tokens_per_micro_batch=budget, gradient_checkpointing=ckpt)
    rng = np.random.default_rng(0)

    def datum(n):
        ids = rng.integers(0, 32000, n + 1)
        return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()),
                           loss_fn_inputs={"target_tokens": ids[1:], "logprobs": np.full(n, -10.0, np.float32),
                                           "advantages": (rng.normal(size=n) / tokens).astype(np.float32)})

    adam = types.AdamParams(learning_rate=1e-5)
    client.forward_backward([datum(64)], "importance_sampling").result()
    client.optim_step(adam).result()
    data = [datum(seq_len) for _ in range(tokens // seq_len)]
    loaded = rss_mb()
    peak = [loaded]
    done = threading.Event()

    def watch():  # the step's own peak (the process's lifetime peak includes loading the model)
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_mb())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    client.forward_backward(data, "importance_sampling").result()
    client.optim_step(adam).result()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return {"loaded_mb": loaded, "peak_mb": max(peak[0], rss_mb()), "seconds": seconds,
            "tokens_per_s": tokens / seconds, "threads": torch.get_num_threads()}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_point(args, model, tokens, budget, ckpt) -> dict:
    cmd = [sys.executable, __file__, "--point", json.dumps([model, tokens, args.seq_len, budget, ckpt])]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--min-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--mem-limit-gb", type=float, default=16.0)
    parser.add_argument("--modes", default="one piece,micro,micro+ckpt")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(one_point(*json.loads(args.point))))
        return
    model = build_model()
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters())
    print(f"model: {params / 1e6:.1f}M parameters, vocab 32000, tied embeddings, LoRA rank 16 on attention, MLP and lm_head")
    print(f"batches of datums of {args.seq_len} tokens; micro-batch budget {args.budget} tokens; peak = RSS above the loaded model")
    modes = {"one piece": (0, False), "micro": (args.budget, False), "micro+ckpt": (args.budget, True)}
    modes = {m: modes[m] for m in args.modes.split(",")}
    print(f"{'tokens':>7} " + " ".join(f"{m + ' MB':>14} {m + ' tok/s':>17}" for m in modes) + f" {'micro/one piece speed':>22}")
    growth = {m: None for m in modes}  # MB per token, to skip points that would not fit
    tokens = args.min_tokens
    while tokens <= args.max_tokens:
        row, results = [], {}
        for mode, (budget, ckpt) in modes.items():
            per_token = growth[mode]
            held = min(tokens, budget) if budget else tokens  # micro-batches hold one budget's worth
            if per_token is not None and per_token * held > args.mem_limit_gb * 1024:
                row.append(f"{'> %.0f GB' % args.mem_limit_gb:>14} {'-':>17}")
                continue
            r = run_point(args, model, tokens, budget, ckpt)
            if "error" in r:
                row.append(f"{'failed':>14} {r['error'][:17]:>17}")
                continue
            results[mode] = r
            extra = r["peak_mb"] - r["loaded_mb"]
            if not budget or tokens <= budget:
                growth[mode] = max(extra, 1.0) / tokens
            row.append(f"{extra:14.0f} {r['tokens_per_s']:17.0f}")
        ratio = ""
        if "one piece" in results and "micro" in results:
            ratio = f"{results['micro']['tokens_per_s'] / results['one piece']['tokens_per_s']:22.2f}"
        print(f"{tokens:7d} " + " ".join(row) + f" {ratio}", flush=True)
        tokens *= 2


if __name__ == "__main__":
    main()
