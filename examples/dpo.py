"""Direct Preference Optimisation with forward_backward_custom.

    python examples/dpo.py                       # the embedded tiny model, about a minute on 2 CPU cores
    python examples/dpo.py --model DIR --beta 0.1

Preference pairs are generated: for "What is a + b?" (one-digit a, b) the chosen answer is
"a + b = c" and the rejected one has a wrong c drawn from 0..99. Most wrong answers are
implausible for a sum of two digits, and that is the cue the 2-layer tiny model learns;
near misses (c +- 1) would need real arithmetic and stay near chance at this size. The DPO
loss for a pair is

    -log sigmoid(beta * [(lp(chosen) - ref(chosen)) - (lp(rejected) - ref(rejected))])

with lp the policy's summed logprob of the answer tokens and ref the reference model's.

The reference is the same client's forward pass before the first optim_step: a fresh LoRA
adapter has B = 0, so at step 0 the policy *is* the base model. One forward over the data
set gives every reference logprob, and they travel with each Datum as a per-token input
("ref_logprobs"); a second, never-stepped TrainingClient would give the same numbers at the
cost of a second model in memory and a forward per batch.

Printed on held-out pairs: preference accuracy (how often the policy gives the chosen answer
a higher logprob than the rejected one) and the mean implicit reward margin (the bracket
above times beta; it is 0 at step 0 by construction and rises as the policy moves away from
the reference in the preferred direction).
"""

import argparse
import random
import time

import numpy as np
import torch

from envs.arithmetic import make_problems
from rlpipe import ServiceClient, types
from rlpipe.training.hyperparams import get_lr
from rlpipe.renderers import conversation_to_datum, get_renderer
from rlpipe.testing.embedded import default_model_path
from rlpipe.training.sft import minibatches, train_step


def make_pairs(n: int, seed: int) -> list[tuple[list[dict], list[dict]]]:
    """(chosen, rejected) conversations that differ only in the final number."""
    rng = random.Random(seed)
    pairs = []
    for p in make_problems(n, difficulty=1, seed=seed):
        wrong = rng.choice([x for x in range(100) if x != p.answer])
        question = {"role": "user", "content": p.question}
        pairs.append((
            [question, {"role": "assistant", "content": p.solution()}],
            [question, {"role": "assistant", "content": f"{p.a} {p.op} {p.b} = {wrong}"}],
        ))
    return pairs


def answer_logprobs(client, data: list[types.Datum]) -> np.ndarray:
    """Summed logprob of each datum's weighted (answer) tokens, from a forward pass."""
    out = client.forward(data, "cross_entropy").result()
    return np.array([(o["logprobs"].to_numpy() * d.loss_fn_inputs["weights"].to_numpy()).sum()
                     for o, d in zip(out.loss_fn_outputs, data)])


def with_reference(data: list[types.Datum], client) -> list[types.Datum]:
    """Attach the reference model's per-token logprobs to each datum (call before any step)."""
    out = client.forward(data, "cross_entropy").result()
    return [types.Datum(d.model_input, {**d.loss_fn_inputs, "ref_logprobs": o["logprobs"]})
            for d, o in zip(data, out.loss_fn_outputs)]


def dpo_loss(beta: float):
    """The custom loss: data alternates chosen, rejected, chosen, rejected, ..."""

    def loss_fn(data: list[types.Datum], logprobs: list[torch.Tensor]):
        def summed(i: int, lp: torch.Tensor) -> torch.Tensor:
            return (lp * data[i].loss_fn_inputs["weights"].to_torch()).sum()

        policy = torch.stack([summed(i, lp) for i, lp in enumerate(logprobs)])
        ref = torch.stack([summed(i, d.loss_fn_inputs["ref_logprobs"].to_torch()) for i, d in enumerate(data)])
        log_ratio = policy - ref
        margin = beta * (log_ratio[0::2] - log_ratio[1::2])
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        accuracy = (margin > 0).float().mean()
        return loss, {"margin:mean": float(margin.detach().mean()), "reward_accuracy:mean": float(accuracy)}

    return loss_fn


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF model dir (default: the embedded tiny model)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs-per-batch", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: get_lr(model) / 2 (DPO likes a smaller step)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--checkpoint-dir", default="runs/dpo")
    parser.add_argument("--seed", type=int, default=0, help="added to every seed the recipe uses (0: the documented run)")
    args = parser.parse_args(argv)

    model = args.model or str(default_model_path())
    lr = args.lr or get_lr(model) / 2
    seed = args.seed  # every seed below is its base (0 unless written) + --seed
    client = ServiceClient(args.checkpoint_dir).create_lora_training_client(model, rank=args.rank, seed=seed)
    renderer = get_renderer(client.get_tokenizer())

    def to_data(pairs):  # chosen, rejected, chosen, rejected, ...
        return [conversation_to_datum(renderer, c, "last_assistant") for pair in pairs for c in pair]

    train = with_reference(to_data(make_pairs(400, seed=seed)), client)  # step 0: the policy is still the reference
    held_out = to_data(make_pairs(64, seed=seed + 1))
    ref_held_out = answer_logprobs(client, held_out)
    print(f"model {model}\nLoRA rank {args.rank}, lr {lr:.2e}, beta {args.beta}, {len(train) // 2} training pairs")

    def evaluate() -> tuple[float, float]:
        lp = answer_logprobs(client, held_out)
        accuracy = float((lp[0::2] > lp[1::2]).mean())
        ratio = lp - ref_held_out
        return accuracy, float(args.beta * (ratio[0::2] - ratio[1::2]).mean())

    start_acc, start_margin = evaluate()
    print(f"step   0  held-out preference accuracy {start_acc:.2f}  reward margin {start_margin:+.3f}")
    adam = types.AdamParams(learning_rate=lr, grad_clip_norm=1.0)
    t0 = time.time()
    # group=2 keeps each chosen/rejected pair together, as the loss reads them
    for step, batch in enumerate(minibatches(train, args.steps, args.pairs_per_batch, seed, group=2), 1):
        metrics = train_step(client, batch, adam, dpo_loss(args.beta))
        if step % args.eval_every == 0 or step == args.steps:
            acc, margin = evaluate()
            print(f"step {step:3d}  train loss {metrics['loss:sum']:.3f} margin {metrics['margin:mean']:+.3f}  "
                  f"held-out accuracy {acc:.2f} margin {margin:+.3f}  ({time.time() - t0:.0f} s)")
    end_acc, end_margin = evaluate()
    path = client.save_weights_for_sampler("final").result().path
    print(f"held-out preference accuracy {start_acc:.2f} -> {end_acc:.2f}, "
          f"reward margin {start_margin:+.3f} -> {end_margin:+.3f}; adapter saved to {path}")
    return {"accuracy_before": start_acc, "accuracy_after": end_acc,
            "margin_before": start_margin, "margin_after": end_margin}


if __name__ == "__main__":
    main()
