"""Supervised fine-tuning with the Tinker primitives: forward_backward + optim_step.

    python examples/sft_basic.py                 # the embedded tiny model, ~1 minute on 2 CPU cores
    python examples/sft_basic.py --model DIR     # any local Hugging Face causal LM

The data is a small generated chat set: "What is a + b?" answered with "a + b = c". Only the
assistant's tokens carry loss weight, so the printed loss is the NLL of the answers per token.
"""

import argparse
import random
import time

import numpy as np

from rlpipe import ServiceClient, types
from rlpipe.datums import supervised_datum
from rlpipe.training.hyperparams import get_lr
from rlpipe.testing.embedded import default_model_path


def make_conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        out.append([
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}"},
        ])
    return out


def to_datum(tokenizer, conversation: list[dict]) -> types.Datum:
    # Render the prompt with the chat template and append the answer's tokens and EOS,
    # exactly the tokens the sampler will later produce for this turn.
    prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(conversation[-1]["content"], add_special_tokens=False)["input_ids"]
    return supervised_datum(prompt_ids, answer_ids + [tokenizer.eos_token_id])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF model dir (default: the embedded tiny model)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: rlpipe.training.hyperparams.get_lr(model)")
    parser.add_argument("--checkpoint-dir", default="runs/sft_basic")
    args = parser.parse_args()

    model = args.model or str(default_model_path())
    lr = args.lr or get_lr(model)
    client = ServiceClient(args.checkpoint_dir).create_lora_training_client(model, rank=args.rank, seed=0)
    tokenizer = client.get_tokenizer()
    train = [to_datum(tokenizer, c) for c in make_conversations(2000, seed=0)]
    held_out = [to_datum(tokenizer, c) for c in make_conversations(64, seed=1)]
    print(f"model {model}\nLoRA rank {args.rank}, lr {lr:.2e}, {client.get_info().trainable_params} trainable params")

    def nll(data) -> float:
        out = client.forward(data, "cross_entropy").result()
        return out.metrics["loss:sum"] / sum(d.loss_fn_inputs["weights"].to_numpy().sum() for d in data)

    start_nll = nll(held_out)
    print(f"step   0  held-out NLL/token {start_nll:.3f}")
    rng = np.random.default_rng(0)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        batch = [train[i] for i in rng.choice(len(train), args.batch_size, replace=False)]
        # Submit both calls before waiting: they run in order on the client's worker.
        fwd_bwd = client.forward_backward(batch, "cross_entropy")
        optim = client.optim_step(types.AdamParams(learning_rate=lr, grad_clip_norm=1.0))
        out = fwd_bwd.result()
        optim.result()
        n_tokens = sum(d.loss_fn_inputs["weights"].to_numpy().sum() for d in batch)
        if step % 5 == 0 or step == args.steps:
            print(f"step {step:3d}  train NLL/token {out.metrics['loss:sum'] / n_tokens:.3f}  "
                  f"held-out {nll(held_out):.3f}  ({time.time() - t0:.0f} s)")
    end_nll = nll(held_out)
    path = client.save_weights_for_sampler("final").result().path
    print(f"held-out NLL/token {start_nll:.3f} -> {end_nll:.3f}; adapter saved to {path}")


if __name__ == "__main__":
    main()
