"""Sampling throughput (vLLM vs the local torch backend) and weight-sync latency.

    python benchmarks/bench_sampling.py [--models tiny,100m] [--batch 64] [--max-tokens 128]

For each model and backend (vLLM, local): generated tokens per second for a batch of
`--batch` different prompts submitted at once (one sample each, temperature 1), first on the
base model, then on a rank-32 LoRA from the learner, and the vLLM / local ratios; and the
weight-sync latency: from the learner's save_weights_for_sampler to the first token sampled
with the new version, split into save / hot-load / first token. "tiny" is the embedded tiny Llama's architecture, "100m" a
~100M-parameter Llama (hidden 768, 12 layers, 12 heads of 64), both randomly initialised so
that samples are near-uniform and run to max_tokens (the throughput is the architecture's).
"""

import argparse
import statistics
import tempfile
import time

from rlpipe import ServiceClient, types
from rlpipe.sampling import create_sampling_client, shutdown_engines
from rlpipe.testing.embedded import corpus, default_model_path

# Both randomly initialised (train_steps=0): near-uniform next tokens, so sequences run to
# max_tokens instead of stopping at EOS after a few tokens as the pre-trained tiny model does.
MODELS = {
    "tiny": dict(train_steps=0),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, train_steps=0),
}


def prompts_for(model_path: str, n: int) -> list[types.ModelInput]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    texts = corpus(n, seed=123)
    return [types.ModelInput.from_ints(tok(t[:40])["input_ids"]) for t in texts]


def throughput(client, prompts, max_tokens: int) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) for all prompts submitted at once."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0)
    client.sample(prompts[0], 1, types.SamplingParams(max_tokens=4)).result()  # warm-up
    start = time.perf_counter()
    futures = [client.sample(p, 1, params) for p in prompts]
    tokens = sum(len(s.tokens) for f in futures for s in f.result().sequences)
    seconds = time.perf_counter() - start
    return tokens / seconds, tokens, seconds


def weight_sync(model_path: str, backend: str, repeats: int):
    """Median seconds: learner save -> sampler hot-load of the new version -> first token.
    Also returns the last version's client (rank-32 LoRA) for the adapter throughput."""
    service = ServiceClient(tempfile.mkdtemp(prefix="rlpipe-bench-"))
    tc = service.create_lora_training_client(model_path, rank=32, seed=0)
    tokens = prompts_for(model_path, 1)[0].to_ints() + [5, 6, 7]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    prompt = types.ModelInput.from_ints(tokens[:8])
    runs = []
    for version in range(1, repeats + 1):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        t0 = time.perf_counter()
        path = tc.save_weights_for_sampler(f"bench-{version}").result().path
        t1 = time.perf_counter()
        client = create_sampling_client(model_path, path, backend=backend, policy_version=version)
        t2 = time.perf_counter()
        seq = client.sample(prompt, 1, types.SamplingParams(max_tokens=1)).result().sequences[0]
        t3 = time.perf_counter()
        assert seq.policy_version == version
        runs.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    tc.close()
    medians = {k: statistics.median(r[i] for r in runs) for i, k in enumerate(("save", "load", "first_token", "total"))}
    return medians, client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,100m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sync-repeats", type=int, default=3)
    parser.add_argument("--skip-local", action="store_true")
    args = parser.parse_args()

    for name in args.models.split(","):
        path = str(default_model_path(**MODELS[name]))
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
        print(f"\n== {name}: {params / 1e6:.1f}M parameters, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
              f"head_dim {cfg.hidden_size // cfg.num_attention_heads}, vocab {cfg.vocab_size}")
        prompts = prompts_for(path, args.batch)
        result = {}
        for backend in ["vllm"] + ([] if args.skip_local else ["local"]):
            t = time.perf_counter()
            client = create_sampling_client(path, backend=backend)
            started = time.perf_counter() - t
            tps, tokens, seconds = throughput(client, prompts, args.max_tokens)
            result[backend, "base"] = tps
            print(f"{backend:6s} start {started:5.1f} s   base model:      {args.batch} prompts x <= {args.max_tokens} tokens: "
                  f"{tokens} tokens in {seconds:6.2f} s = {tps:8.1f} tokens/s")
            sync, tuned = weight_sync(path, backend, args.sync_repeats)
            print(f"{backend:6s} weight sync (rank-32 LoRA, median of {args.sync_repeats}): save {sync['save'] * 1e3:.0f} ms, "
                  f"hot-load {sync['load'] * 1e3:.0f} ms, first token {sync['first_token'] * 1e3:.0f} ms, "
                  f"total {sync['total'] * 1e3:.0f} ms")
            tps, tokens, seconds = throughput(tuned, prompts, args.max_tokens)
            result[backend, "lora"] = tps
            print(f"{backend:6s}                 rank-32 LoRA:    {args.batch} prompts x <= {args.max_tokens} tokens: "
                  f"{tokens} tokens in {seconds:6.2f} s = {tps:8.1f} tokens/s")
        if not args.skip_local:
            for kind in ("base", "lora"):
                print(f"vLLM / local throughput ratio ({kind}): {result['vllm', kind] / result['local', kind]:.2f}x")
        shutdown_engines()  # one model's engines at a time


if __name__ == "__main__":
    main()
