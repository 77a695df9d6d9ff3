"""Learner throughput by layout: trained tokens/s of forward_backward + optim_step.

    python benchmarks/bench_training.py [--model DIR] [--threads 1,2] [--repeats 7] [--shapes rl,sft]

Two batch shapes:
- rl:  the demo's RL batch, 8 prompts x 16 samples = 128 datums of 14-23 tokens;
- sft: 16 datums of 64-512 tokens.
Layouts (rlpipe.training.packing): "rows@W" packs datums into rows of width W (block-diagonal mask),
"padded" puts each datum in its own row padded to the longest, "varlen" runs attention per
datum (on CPU a reference loop; on CUDA torch's flash varlen kernel), "per-datum" calls
forward_backward once per datum (no padding, no packing, batch size 1). rows@4096 was the
default before the layout became per device. All figures in one run, so ratios compare
like with like on a shared machine.
"""

import argparse
import time

import numpy as np
import torch

from rlpipe import ServiceClient, types
from rlpipe.testing.embedded import default_model_path

SHAPES = {"rl": (128, 14, 23), "sft": (16, 64, 512)}
LAYOUTS = {"rows@64": ("rows", 64), "rows@128": ("rows", 128), "rows@256": ("rows", 256), "rows@512": ("rows", 512),
           "rows@4096": ("rows", 4096), "padded": ("padded", 0), "varlen": ("varlen", 0), "per-datum": ("padded", 0)}


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
                "advantages": (rng.normal(size=length) / 1000).astype(np.float32),
            },
        ))
    return data


def step_seconds(client, data, repeats: int, per_datum: bool) -> float:
    adam = types.AdamParams(learning_rate=1e-5)

    def step():
        for part in ([[d] for d in data] if per_datum else [data]):
            client.forward_backward(part, "importance_sampling")
        client.optim_step(adam).result()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure, comma-separated")
    parser.add_argument("--shapes", default="rl,sft")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    service = ServiceClient("/tmp/rlpipe-bench")
    layouts = args.layouts.split(",")
    clients = {name: service.create_lora_training_client(model, rank=args.rank, seed=0, layout=LAYOUTS[name][0],
                                                         row_tokens=LAYOUTS[name][1]) for name in layouts}
    first = next(iter(clients.values()))
    print(f"model {model}  device {first.device}  LoRA rank {args.rank}  vocab {first.vocab_size}")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in args.shapes.split(","):
            n, lo, hi = SHAPES[shape]
            data = make_data(n, lo, hi, first.vocab_size)
            real = sum(d.model_input.length for d in data)
            print(f"\n{shape}: {n} datums of {lo}-{hi} tokens ({real} tokens), {threads} torch thread(s)")
            print(f"{'layout':>10} {'ms/step':>9} {'tokens/s':>10} {'vs rows@4096':>13}")
            results = {name: real / step_seconds(c, data, args.repeats, name == "per-datum") for name, c in clients.items()}
            old = results.get("rows@4096")
            for name, tps in results.items():
                ratio = f"{tps / old:12.2f}x" if old else ""
                print(f"{name:>10} {1000 * real / tps:9.1f} {tps:10.0f} {ratio:>13}")
            best = max(results, key=results.get)
            print(f"fastest: {best}")


if __name__ == "__main__":
    main()
