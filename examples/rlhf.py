"""RLHF in three stages: SFT, a reward model from preferences, then RL against that reward model.

    python examples/rlhf.py                      # the embedded tiny model, 1-3 minutes on 2 CPU cores
    python examples/rlhf.py --rl-steps 40

1. SFT: the policy learns the answer form "a + b = c" from demonstrations.
2. Reward model: the SFT policy answers training questions, and a labeller prefers the
   reference solution over each wrong answer (the problem's check_answer stands in for the human
   raters). Two corrupted references per question (a wrong result; a true equation about
   other numbers) widen the wrong answers beyond the policy's own. The reward model is a copy
   of the SFT policy with its own LoRA; its score is the mean logprob of the answer's tokens,
   trained with the Bradley-Terry loss -log sigmoid(score(chosen) - score(rejected)) plus the
   chosen answers' NLL through forward_backward_custom. Reward = exp(score), in (0, 1).
   (A "does the judge say Yes" score is the usual alternative; the 2-layer tiny model could
   not carry the answer's content to the judge's last token, and stayed near chance.)
3. RL: a plain synchronous loop. Sample a group of answers per question from the current
   policy, score them with the frozen reward model, centre the rewards within each group and
   train with the importance_sampling loss on exactly the sampled tokens.

The true grade is printed next to the reward. On the tiny model the reward rises while the
grade stays flat: the policy drifts to answers the reward model over-rates (a few favourite,
likely-looking equations). That is reward hacking in miniature, the classic RLHF failure; a
KL penalty towards the SFT policy and a reward model that can actually do the arithmetic are
the usual remedies.
"""

import argparse
import random
import time

import numpy as np
import torch

from envs.arithmetic import make_problems
from rlpipe import ServiceClient, types
from rlpipe.datums import group_datums
from rlpipe.training.hyperparams import get_lr
from rlpipe.renderers import conversation_to_datum, get_renderer
from rlpipe.rollouts import center_advantages
from rlpipe.testing.embedded import default_model_path
from rlpipe.training.sft import sft_steps, train_step

SAMPLE_TOKENS = 16


def sample_params(renderer, seed: int, index: int) -> types.SamplingParams:
    # Sample j of a request uses seed + j, so requests get seeds far apart: reproducible
    # runs without two questions sharing one random stream.
    return types.SamplingParams(max_tokens=SAMPLE_TOKENS, temperature=1.0, seed=seed * 100_000 + index * 100,
                                stop=renderer.stop_sequences)


# --------------------------------------------------------------------------- reward model


def answer_datum(renderer, question: str, answer: str) -> types.Datum:
    """What the reward model scores: the answer's tokens (and end of turn) after the question."""
    return conversation_to_datum(renderer, [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}], "last_assistant")


def scores(data: list[types.Datum], logprobs: list[torch.Tensor]) -> torch.Tensor:
    """Mean logprob per answer token, one score per datum."""
    weights = [d.loss_fn_inputs["weights"].to_torch() for d in data]
    return torch.stack([(lp * w).sum() / w.sum() for lp, w in zip(logprobs, weights)])


def bradley_terry(data, logprobs):
    """-log sigmoid(score(chosen) - score(rejected)), plus the chosen answers' NLL: Bradley-Terry
    alone only fixes differences, so every score could drift down together; the NLL term
    anchors the chosen ones on the log-probability scale."""
    s = scores(data, logprobs)
    margin = s[0::2] - s[1::2]  # chosen minus rejected
    loss = -torch.nn.functional.logsigmoid(margin).mean() - s[0::2].mean()
    return loss, {"accuracy:mean": float((margin > 0).float().mean())}


def rm_scores(rm, data: list[types.Datum]) -> np.ndarray:
    out = rm.forward(data, "cross_entropy").result()
    return scores(data, [o["logprobs"].to_torch() for o in out.loss_fn_outputs]).numpy()


def corruptions(p, rng: random.Random) -> list[str]:
    """Wrong answers the policy has not (yet) produced: a wrong result, and a true equation
    about other numbers than the question's."""
    wrong = rng.choice([x for x in range(200) if x != p.answer])
    a, b = rng.choice([(x, y) for x in range(10) for y in range(10) if (x, y) != (p.a, p.b)])
    return [f"{p.a} {p.op} {p.b} = {wrong}", f"{a} {p.op} {b} = {a + b if p.op == '+' else a - b}"]


def preference_pairs(renderer, sampler, problems, seed) -> list[types.Datum]:
    """Datums alternating chosen (the reference solution) and rejected (a wrong answer)."""
    rng = random.Random(seed)
    futures = [sampler.sample(renderer.build_generation_prompt([{"role": "user", "content": p.question}]), 2,
                              sample_params(renderer, seed, i)) for i, p in enumerate(problems)]
    data = []
    for p, future in zip(problems, futures):
        answers = [renderer.parse_response(seq.tokens)[0]["content"] for seq in future.result().sequences]
        for answer in answers + corruptions(p, rng):
            if not p.check_answer(answer):  # a right answer ties with the reference
                data += [answer_datum(renderer, p.question, p.solution()), answer_datum(renderer, p.question, answer)]
    return data


# --------------------------------------------------------------------------- RL


def rollouts(renderer, sampler, rm, problems, group_size, seed):
    """Sample a group per problem and score it: (sequences, rewards, true grades) per group."""
    prompts = [renderer.build_generation_prompt([{"role": "user", "content": p.question}]) for p in problems]
    futures = [sampler.sample(prompt, group_size, sample_params(renderer, seed, i)) for i, prompt in enumerate(prompts)]
    groups = [f.result().sequences for f in futures]
    answers = [[renderer.parse_response(s.tokens) for s in group] for group in groups]
    judged = rm_scores(rm, [answer_datum(renderer, p.question, msg["content"])
                            for p, group in zip(problems, answers) for msg, _ in group])
    rewards = np.exp(judged).reshape(len(problems), group_size)
    # An answer cut off at max_tokens never ended its turn: it gets the lowest reward.
    ended = np.array([[ok for _, ok in group] for group in answers])
    rewards = np.where(ended, rewards, 0.0)
    correct = np.array([[float(p.check_answer(msg["content"])) for msg, _ in group]
                        for p, group in zip(problems, answers)])
    return prompts, groups, rewards, correct


def trajectory_group(prompt: types.ModelInput, group: list[types.SampledSequence], rewards: list[float],
                     version: int) -> types.TrajectoryGroup:
    """A group of answers to one prompt as the pipeline's explorer makes it: prompt plus sampled
    tokens, only the sampled ones acting (with their logprobs and version), advantages centred."""
    n = prompt.length
    trajectories = [types.Trajectory(tokens=prompt.to_ints() + seq.tokens, action_mask=[0] * n + [1] * len(seq.tokens),
                                     sampling_logprobs=[0.0] * n + list(seq.logprobs),
                                     policy_versions=[-1] * n + [version] * len(seq.tokens), reward=r, advantage=a)
                    for seq, r, a in zip(group, rewards, center_advantages(rewards))]
    return types.TrajectoryGroup(group_id=f"{version}-{id(prompt)}", trajectories=trajectories)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF model dir (default: the embedded tiny model)")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--rm-steps", type=int, default=40)
    parser.add_argument("--rl-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="SFT examples / RM pairs per step")
    parser.add_argument("--problems-per-step", type=int, default=8, help="RL: questions per step")
    parser.add_argument("--group-size", type=int, default=8, help="RL: answers per question")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: rlpipe.training.hyperparams.get_lr(model)")
    parser.add_argument("--checkpoint-dir", default="runs/rlhf")
    parser.add_argument("--seed", type=int, default=0, help="added to every seed the recipe uses (0: the documented run)")
    args = parser.parse_args(argv)

    model = args.model or str(default_model_path())
    lr = args.lr or get_lr(model)
    adam = types.AdamParams(learning_rate=lr, grad_clip_norm=1.0)
    seed = args.seed  # every seed below is its base (0 unless written) + --seed
    service = ServiceClient(args.checkpoint_dir)
    policy = service.create_lora_training_client(model, rank=args.rank, seed=seed)
    renderer = get_renderer(policy.get_tokenizer())
    print(f"model {model}\nLoRA rank {args.rank}, lr {lr:.2e}")
    t0 = time.time()

    # 1. SFT on demonstrations.
    demos = [conversation_to_datum(renderer, [{"role": "user", "content": p.question},
                                              {"role": "assistant", "content": p.solution()}])
             for p in make_problems(1000, difficulty=1, seed=seed)]
    metrics = sft_steps(policy, demos, args.sft_steps, args.batch_size, adam, seed=seed)[-1]
    sft_state = policy.save_state("sft").result().path
    sft_sampler = policy.save_weights_and_get_sampling_client("sft", backend="local")
    print(f"[1 SFT] {args.sft_steps} steps, last batch NLL sum {metrics['loss:sum']:.1f}  ({time.time() - t0:.0f} s)")

    # 2. Reward model: starts from the SFT weights, so it already reads the task's language.
    rm = service.create_training_client_from_state(sft_state)
    train_pairs = preference_pairs(renderer, sft_sampler, make_problems(256, difficulty=1, seed=seed + 1), seed=seed + 1)
    held_pairs = preference_pairs(renderer, sft_sampler, make_problems(64, difficulty=1, seed=seed + 2), seed=seed + 2)

    def rm_accuracy() -> float:
        s = rm_scores(rm, held_pairs)
        return float((s[0::2] > s[1::2]).mean())

    rm_before = rm_accuracy()
    pairs_per_batch = min(args.batch_size, len(train_pairs) // 2)
    sft_steps(rm, train_pairs, args.rm_steps, pairs_per_batch, adam, seed=seed + 1, loss_fn=bradley_terry, group=2)
    rm_after = rm_accuracy()
    print(f"[2 RM] {len(train_pairs) // 2} pairs, held-out pairwise accuracy {rm_before:.2f} -> {rm_after:.2f}"
          f"  ({time.time() - t0:.0f} s)")

    # 3. RL against the frozen reward model.
    held_problems = make_problems(32, difficulty=1, seed=seed + 3)

    def evaluate(sampler) -> tuple[float, float]:
        _, _, rewards, correct = rollouts(renderer, sampler, rm, held_problems, 4, seed=seed + 3)
        return float(rewards.mean()), float(correct.mean())

    reward_before, correct_before = evaluate(sft_sampler)
    print(f"[3 RL] step  0  held-out reward {reward_before:.3f}  correct {correct_before:.2f}")
    train_problems = make_problems(args.rl_steps * args.problems_per_step, difficulty=1, seed=seed + 4)
    sampler = sft_sampler
    for step in range(1, args.rl_steps + 1):
        problems = train_problems[(step - 1) * args.problems_per_step : step * args.problems_per_step]
        prompts, groups, rewards, correct = rollouts(renderer, sampler, rm, problems, args.group_size, seed=seed + step)
        # The pipeline's datum step: group-centred advantages (the group mean is the baseline)
        # spread over the sampled tokens and divided by the batch's sampled tokens.
        data = group_datums([trajectory_group(prompt, group, r.tolist(), step - 1)
                             for prompt, group, r in zip(prompts, groups, rewards)])
        train_step(policy, data, adam, "importance_sampling")
        sampler = policy.save_weights_and_get_sampling_client(backend="local")  # on-policy: sample the new weights
        print(f"[3 RL] step {step:2d}  reward {rewards.mean():.3f}  correct {correct.mean():.2f}"
              f"  ({time.time() - t0:.0f} s)")
    reward_after, correct_after = evaluate(sampler)
    print(f"reward model held-out accuracy {rm_before:.2f} -> {rm_after:.2f}; policy held-out reward "
          f"{reward_before:.3f} -> {reward_after:.3f}, correct {correct_before:.2f} -> {correct_after:.2f}")
    return {"rm_accuracy_before": rm_before, "rm_accuracy_after": rm_after, "reward_before": reward_before,
            "reward_after": reward_after, "correct_before": correct_before, "correct_after": correct_after}


if __name__ == "__main__":
    main()
