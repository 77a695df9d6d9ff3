"""Supervised fine-tuning with the Tinker primitives: forward_backward + optim_step.

    python examples/sft_basic.py                 # the embedded tiny model, ~1 minute on 2 CPU cores
    python examples/sft_basic.py --model DIR     # any local Hugging Face causal LM

The data is a small generated chat set: "What is a + b?" answered with "a + b = c". Only the
assistant's tokens carry loss weight, so the printed loss is the NLL of the answers per token.
"""

import argparse
import random
import time

from rlpipe import ServiceClient, types
from rlpipe.datums import supervised_datum
from rlpipe.renderers import get_renderer
from rlpipe.training.hyperparams import get_lr
from rlpipe.testing.embedded import default_model_path
from rlpipe.training.sft import minibatches, train_step


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


def to_datum(renderer, conversation: list[dict]) -> types.Datum:
    # The prompt as the renderer gives it to a sampler (the chat template, up to the assistant
    # header), then the answer's tokens and the end of turn: exactly the tokens the sampler
    # will later produce for this turn.
    prompt_ids = renderer.build_generation_prompt(conversation[:-1]).to_ints()
    answer_ids = renderer.tokenizer(conversation[-1]["content"], add_special_tokens=False)["input_ids"]
    return supervised_datum(prompt_ids, answer_ids + [renderer.tokenizer.eos_token_id])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF model dir (default: the embedded tiny model)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: rlpipe.training.hyperparams.get_lr(model)")
    parser.add_argument("--checkpoint-dir", default="runs/sft_basic")
    parser.add_argument("--seed", type=int, default=0, help="added to every seed the recipe uses (0: the documented run)")
    args = parser.parse_args(argv)

    model = args.model or str(default_model_path())
    lr = args.lr or get_lr(model)
    seed = args.seed  # every seed below is its base (0 unless written) + --seed
    client = ServiceClient(args.checkpoint_dir).create_lora_training_client(model, rank=args.rank, seed=seed)
    renderer = get_renderer(client.get_tokenizer())
    train = [to_datum(renderer, c) for c in make_conversations(2000, seed=seed)]
    held_out = [to_datum(renderer, c) for c in make_conversations(64, seed=seed + 1)]
    print(f"model {model}\nLoRA rank {args.rank}, lr {lr:.2e}, {client.get_info().trainable_params} trainable params")

    def nll(data) -> float:
        out = client.forward(data, "cross_entropy").result()
        return out.metrics["loss:sum"] / sum(d.loss_fn_inputs["weights"].to_numpy().sum() for d in data)

    start_nll = nll(held_out)
    print(f"step   0  held-out NLL/token {start_nll:.3f}")
    adam = types.AdamParams(learning_rate=lr, grad_clip_norm=1.0)
    t0 = time.time()
    for step, batch in enumerate(minibatches(train, args.steps, args.batch_size, seed), 1):
        # train_step submits forward_backward and optim_step before waiting for both: they run
        # in order on the client's worker.
        metrics = train_step(client, batch, adam)
        n_tokens = sum(d.loss_fn_inputs["weights"].to_numpy().sum() for d in batch)
        if step % 5 == 0 or step == args.steps:
            print(f"step {step:3d}  train NLL/token {metrics['loss:sum'] / n_tokens:.3f}  "
                  f"held-out {nll(held_out):.3f}  ({time.time() - t0:.0f} s)")
    end_nll = nll(held_out)
    path = client.save_weights_for_sampler("final").result().path
    print(f"held-out NLL/token {start_nll:.3f} -> {end_nll:.3f}; adapter saved to {path}")
    return {"nll_before": start_nll, "nll_after": end_nll}


if __name__ == "__main__":
    main()
