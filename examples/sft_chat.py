"""Chat SFT: multi-turn conversations through the renderer, trained on every assistant turn.

    python examples/sft_chat.py                  # the embedded tiny model, 1-2 minutes on 2 CPU cores
    python examples/sft_chat.py --model DIR      # any local Hugging Face causal LM with a chat template
    python examples/sft_chat.py --data chats.jsonl --model DIR   # your conversations (.jsonl/.json/.parquet)

The default data is a small generated chat set: a user asks a sum, then asks to keep adding,
and sometimes says thanks. `--data FILE` trains on the conversations of a file instead, rows
{"messages": [{"role": ..., "content": ...}, ...]} (roles system/user/assistant/tool), read
through Hugging Face `datasets` (rlpipe.data_files); a tenth of them (at most 48) is held out
for the NLL, and a bad row stops the script before training with its 1-based row number.
The renderer turns each conversation into tokens plus weights that are 1 exactly on the
assistant turns (content and end-of-turn token), so the printed NLL is per assistant token.
At the end the trained adapter answers a held-out follow-up question.
"""

import argparse
import random
import time

import numpy as np

from rlpipe import ServiceClient, types
from rlpipe.data_files import load_conversations, row_error
from rlpipe.evaluators import nll_eval
from rlpipe.training.hyperparams import get_lr
from rlpipe.renderers import conversation_to_datum, get_renderer
from rlpipe.testing.embedded import default_model_path
from rlpipe.training.sft import minibatches, train_step


def make_chat(rng: random.Random) -> list[dict]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    total = a + b
    chat = [{"role": "system", "content": "You are a calculator."}] if rng.random() < 0.5 else []
    chat += [{"role": "user", "content": f"What is {a} + {b}?"},
             {"role": "assistant", "content": f"{a} + {b} = {total}"}]
    for _ in range(rng.randint(1, 2)):
        d = rng.randint(1, 9)
        chat += [{"role": "user", "content": f"Now add {d}."},
                 {"role": "assistant", "content": f"{total} + {d} = {total + d}"}]
        total += d
    if rng.random() < 0.3:
        chat += [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
    return chat


def file_datums(renderer, path: str, max_length: int | None = None) -> tuple[list[list[dict]], list[types.Datum]]:
    """(conversations, their Datums) from a chat file; a conversation the renderer refuses
    (no assistant turn, say) is reported with its row number."""
    chats = load_conversations(path)
    datums = []
    for number, chat in enumerate(chats, 1):
        try:
            datums.append(conversation_to_datum(renderer, chat, "all_assistant", max_length))
        except ValueError as err:
            raise row_error(path, number, str(err)) from err
    return chats, datums


def weights(datum: types.Datum):
    return datum.loss_fn_inputs["weights"].to_numpy()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF model dir (default: the embedded tiny model)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="conversations to train on: .jsonl/.json/.parquet rows {\"messages\": [...]} "
                             "(default: generated sums)")
    parser.add_argument("--max-length", type=int, default=None, help="truncate conversations to this many tokens")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: rlpipe.training.hyperparams.get_lr(model)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--checkpoint-dir", default="runs/sft_chat")
    parser.add_argument("--seed", type=int, default=0, help="added to every seed the recipe uses (0: the documented run)")
    args = parser.parse_args(argv)

    model = args.model or str(default_model_path())
    lr = args.lr or get_lr(model)
    seed = args.seed  # every seed below is its base (0 unless written) + --seed
    client = ServiceClient(args.checkpoint_dir).create_lora_training_client(model, rank=args.rank, seed=seed)
    renderer = get_renderer(client.get_tokenizer())
    # all_assistant: every assistant turn is a target, not only the last one, so one
    # conversation teaches the first answer and each follow-up.
    if args.data:
        chats, datums = file_datums(renderer, args.data, args.max_length)
        if len(chats) < 2:
            raise ValueError(f"{args.data}: {len(chats)} conversation; at least 2 are needed (one is held out)")
        # A fixed shuffle before the split, so a file sorted by topic still holds out a mix.
        keep = np.random.default_rng(seed).permutation(len(chats))
        n_held = min(48, max(1, len(chats) // 10))
        held_out_chats = [chats[i] for i in keep[:n_held]]
        held_out = [datums[i] for i in keep[:n_held]]
        train = [datums[i] for i in keep[n_held:]]
    else:
        rng = random.Random(seed)
        train = [conversation_to_datum(renderer, make_chat(rng), "all_assistant", args.max_length)
                 for _ in range(1000)]
        held_out_chats = [make_chat(random.Random(seed + 10_000 + i)) for i in range(48)]
        held_out = [conversation_to_datum(renderer, c, "all_assistant", args.max_length) for c in held_out_chats]
    if len(train) < args.batch_size:
        raise ValueError(f"{len(train)} training conversations, fewer than --batch-size {args.batch_size}")
    print(f"model {model}\nLoRA rank {args.rank}, lr {lr:.2e}, {len(train)} chats, "
          f"{client.get_info().trainable_params} trainable params")

    start_nll = nll_eval(client, held_out)["eval/nll"]
    print(f"step   0  held-out NLL/assistant token {start_nll:.3f}")
    adam = types.AdamParams(learning_rate=lr, grad_clip_norm=1.0)
    t0 = time.time()
    for step, batch in enumerate(minibatches(train, args.steps, args.batch_size, seed), 1):
        # The loss is a sum over tokens; dividing the weights by the batch's token count turns it
        # into the mean NLL per token, so the gradient (and the clip at 1.0) has one scale
        # whatever the length of this batch's conversations.
        n_tokens = sum(weights(d).sum() for d in batch)
        batch = [types.Datum(d.model_input, {**d.loss_fn_inputs, "weights": weights(d) / n_tokens})
                 for d in batch]
        train_nll = train_step(client, batch, adam)["loss:sum"]
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step:3d}  train NLL {train_nll:.3f}  held-out {nll_eval(client, held_out)['eval/nll']:.3f}"
                  f"  ({time.time() - t0:.0f} s)")
    end_nll = nll_eval(client, held_out)["eval/nll"]

    # Ask the trained model the follow-up of a held-out chat: the prompt is the history up to
    # the second assistant turn (the first in a chat that has one only), rendered exactly as
    # in training. A chat opening with an assistant turn has no prompt to ask with.
    for chat in held_out_chats:
        turns = [i for i, m in enumerate(chat) if m["role"] == "assistant" and i > 0]
        if turns:
            turn = turns[min(1, len(turns) - 1)]
            sampler = client.save_weights_and_get_sampling_client("final", backend="local")
            prompt = renderer.build_generation_prompt(chat[:turn])
            params = types.SamplingParams(max_tokens=24, temperature=0.0, stop=renderer.stop_sequences)
            reply, ended = renderer.parse_response(sampler.sample(prompt, 1, params).result().sequences[0].tokens)
            print(f"{chat[turn - 1]['content']!r} -> {reply['content']!r} "
                  f"(expected {chat[turn]['content']!r}, ended={ended})")
            break
    print(f"held-out NLL/assistant token {start_nll:.3f} -> {end_nll:.3f}")
    return {"nll_before": start_nll, "nll_after": end_nll}


if __name__ == "__main__":
    main()
