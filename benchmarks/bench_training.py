"""forward_backward throughput on variable-length data: packed rows vs padding.

    python benchmarks/bench_training.py [--model DIR] [--datums 64] [--repeats 3]

Prints trained (non-pad) tokens per second for both modes and their ratio. Lengths are drawn
uniformly from [min_len, max_len], as RL episodes are, so padding to the longest wastes about
half of the compute.
"""

import argparse
import time

import numpy as np
import torch

from rlpipe import ServiceClient, types
from rlpipe.tiny import default_model_path


def make_data(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        tokens = rng.integers(0, vocab, length + 1)
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
            loss_fn_inputs={
                "target_tokens": tokens[1:],
                "logprobs": -rng.uniform(0.1, 5, length).astype(np.float32),
                "advantages": rng.normal(size=length).astype(np.float32),
            },
        ))
    return data


def tokens_per_second(client, data, repeats: int) -> float:
    client.forward_backward(data, "importance_sampling").result()  # warm-up
    n_tokens = sum(d.model_input.length for d in data)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        client.forward_backward(data, "importance_sampling").result()
        times.append(time.perf_counter() - start)
    return n_tokens / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--datums", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--row-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    service = ServiceClient("/tmp/rlpipe-bench")
    packed = service.create_lora_training_client(model, rank=16, seed=0, pack=True, max_row_tokens=args.row_tokens)
    padded = service.create_lora_training_client(model, rank=16, seed=0, pack=False)
    data = make_data(args.datums, args.min_len, args.max_len, packed.vocab_size)
    real = sum(d.model_input.length for d in data)
    print(f"model {model}  device {packed.device}  torch threads {torch.get_num_threads()}")
    print(f"{args.datums} datums, lengths {args.min_len}..{args.max_len}, {real} real tokens, "
          f"{args.datums * max(d.model_input.length for d in data)} with padding")
    tps_packed = tokens_per_second(packed, data, args.repeats)
    tps_padded = tokens_per_second(padded, data, args.repeats)
    print(f"packed  {tps_packed:10.0f} tokens/s (rows of <= {args.row_tokens} tokens)")
    print(f"padded  {tps_padded:10.0f} tokens/s")
    print(f"ratio packed/padded {tps_packed / tps_padded:.2f}")


if __name__ == "__main__":
    main()
