"""Prompt (context) distillation: bake a long system prompt into the weights.

    python examples/prompt_distillation.py                     # the embedded tiny model, 1-2 minutes on 2 CPU cores
    python examples/prompt_distillation.py --model DIR --prompt-sft-steps 0

The teacher is the model *with* a long system prompt; it answers training questions through
a sampling client. The student is the same model *without* the prompt, trained with
cross-entropy on the teacher's answers, token for token as sampled. Afterwards the student
behaves as if the prompt were there, without paying for its tokens on every request.

Stage 0 exists only because the 2-layer tiny model was never taught to follow a system
prompt (with one it just ends the turn), so there would be nothing to distil. A short SFT
gives it one prompt-dependent behaviour, standing in for an instruction-tuned model: with
the prompt it answers "3 + 4 = 7", without it "The answer is 7." With a real instruct model
pass --prompt-sft-steps 0.

Printed before/after on held-out questions, the student always without the prompt: its NLL
per token of the teacher's answers (a KL proxy), and how often its greedy answer takes the
equation form the prompt asks for (next to the prompted teacher's own rate).
"""

import argparse
import time

from envs.arithmetic import ANSWER_FORM, make_problems
from rlpipe import ServiceClient, types
from rlpipe.datums import supervised_datum
from rlpipe.evaluators import nll_eval, run_sampling_eval
from rlpipe.training.hyperparams import get_lr
from rlpipe.renderers import conversation_to_datum, get_renderer
from rlpipe.testing.embedded import default_model_path
from rlpipe.training.sft import sft_steps

SYSTEM_PROMPT = (
    "You are Calc, a terse calculator. Whatever the user asks, reply with the whole equation "
    "written out: the first number, the operator, the second number, an equals sign and the "
    "result, for example 2 + 3 = 5. Never add words, never explain, never greet."
)


def ask(question: str, system: bool) -> list[dict]:
    return ([{"role": "system", "content": SYSTEM_PROMPT}] if system else []) + [{"role": "user", "content": question}]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF model dir (default: the embedded tiny model)")
    parser.add_argument("--prompt-sft-steps", type=int, default=30, help="stage 0 (see above); 0 for an instruct model")
    parser.add_argument("--steps", type=int, default=30, help="distillation steps")
    parser.add_argument("--questions", type=int, default=256, help="training questions the teacher answers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: rlpipe.training.hyperparams.get_lr(model)")
    parser.add_argument("--temperature", type=float, default=1.0, help="teacher sampling temperature")
    parser.add_argument("--checkpoint-dir", default="runs/prompt_distillation")
    parser.add_argument("--seed", type=int, default=0, help="added to every seed the recipe uses (0: the documented run)")
    args = parser.parse_args(argv)

    model = args.model or str(default_model_path())
    lr = args.lr or get_lr(model)
    adam = types.AdamParams(learning_rate=lr, grad_clip_norm=1.0)
    seed = args.seed  # every seed below is its base (0 unless written) + --seed
    service = ServiceClient(args.checkpoint_dir)
    teacher = service.create_lora_training_client(model, rank=args.rank, seed=seed)
    renderer = get_renderer(teacher.get_tokenizer())
    prompt_tokens = len(teacher.get_tokenizer()(SYSTEM_PROMPT, add_special_tokens=False)["input_ids"])
    print(f"model {model}\nLoRA rank {args.rank}, lr {lr:.2e}, system prompt {prompt_tokens} tokens")

    if args.prompt_sft_steps:
        chats = []
        for i, p in enumerate(make_problems(512, difficulty=1, seed=seed + 100)):
            system = i % 2 == 0  # half with the prompt (equation form), half without (a sentence)
            answer = p.solution() if system else f"The answer is {p.answer}."
            chats.append(ask(p.question, system) + [{"role": "assistant", "content": answer}])
        data = [conversation_to_datum(renderer, c) for c in chats]
        sft_steps(teacher, data, args.prompt_sft_steps, args.batch_size, adam, seed=seed + 100)
        print(f"stage 0: {args.prompt_sft_steps} SFT steps so the model follows the system prompt")
    # The student starts as an exact copy of the teacher's weights; only the prompt differs.
    teacher_state = teacher.save_state("teacher").result().path
    teacher_sampler = teacher.save_weights_and_get_sampling_client("teacher", backend="local")
    student = service.create_training_client_from_state(teacher_state)

    def teacher_answers(questions, temperature):
        """The teacher's sampled answers (with the prompt) as token lists, each ending in the stop token."""
        # One seed per question: reproducible, and different questions get different random draws.
        futures = [teacher_sampler.sample(renderer.build_generation_prompt(ask(q, True)), 1, types.SamplingParams(
                       max_tokens=24, temperature=temperature, seed=seed + i, stop=renderer.stop_sequences))
                   for i, q in enumerate(questions)]
        return [f.result().sequences[0] for f in futures]

    def student_data(questions, answers):
        # Token-exact: the student's prompt (no system message) plus the teacher's tokens as
        # sampled; answers cut off at max_tokens never ended the turn, so they are left out.
        return [supervised_datum(renderer.build_generation_prompt(ask(q, False)).to_ints(), a.tokens)
                for q, a in zip(questions, answers) if a.stop_reason == "stop"]

    train_q = [p.question for p in make_problems(args.questions, difficulty=1, seed=seed)]
    held_q = [p.question for p in make_problems(48, difficulty=1, seed=seed + 1)]
    t0 = time.time()
    train = student_data(train_q, teacher_answers(train_q, args.temperature))
    held_out = student_data(held_q, teacher_answers(held_q, args.temperature))
    example = renderer.parse_response(teacher_answers(held_q[:1], 0.0)[0].tokens)[0]["content"]
    print(f"teacher answered {len(train)}/{len(train_q)} training questions ({time.time() - t0:.0f} s), "
          f"e.g. {held_q[0]!r} -> {example!r}")

    # Behaviour on held-out questions: how often the answer has the equation form the system
    # prompt asks for (the tiny model's numbers are mostly wrong either way, so exact agreement
    # with the teacher would measure its arithmetic, not the distillation). Greedy, the tiny
    # model answers every question in one form, so that rate is all or nothing; 4 samples per
    # question at temperature 1 measure the form's probability, which moves smoothly.
    def equation_rate(sampler, system: bool, samples: int = 1) -> float:
        items = [(renderer.build_generation_prompt(ask(q, system)), lambda text: ANSWER_FORM.match(text) is not None)
                 for q in held_q]
        params = types.SamplingParams(max_tokens=24, temperature=0.0 if samples == 1 else 1.0,
                                      stop=renderer.stop_sequences)
        metrics = run_sampling_eval(sampler, items, params, num_samples=samples,
                                    decode=lambda t: renderer.parse_response(t)[0]["content"])
        return metrics["eval/accuracy"]

    teacher_rate = equation_rate(teacher_sampler, system=True)
    # Before training the student has the teacher's weights, so the teacher's sampler serves for both.
    nll_before, form_before = nll_eval(student, held_out)["eval/nll"], equation_rate(teacher_sampler, system=False)
    sampled_before = equation_rate(teacher_sampler, system=False, samples=4)
    print(f"before: student NLL/token of teacher answers {nll_before:.3f}, equation-form answers {form_before:.2f} "
          f"(the prompted teacher: {teacher_rate:.2f})")
    sft_steps(student, train, args.steps, args.batch_size, adam, seed=seed)
    nll_after = nll_eval(student, held_out)["eval/nll"]
    student_sampler = student.save_weights_and_get_sampling_client("student", backend="local")
    form_after = equation_rate(student_sampler, system=False)
    sampled_after = equation_rate(student_sampler, system=False, samples=4)
    print(f"after {args.steps} steps ({time.time() - t0:.0f} s), no system prompt: NLL/token of teacher answers "
          f"{nll_before:.3f} -> {nll_after:.3f}, equation-form answers {form_before:.2f} -> {form_after:.2f} greedy, "
          f"{sampled_before:.2f} -> {sampled_after:.2f} sampled")
    return {"nll_before": nll_before, "nll_after": nll_after, "form_before": form_before, "form_after": form_after,
            "sampled_form_before": sampled_before, "sampled_form_after": sampled_after, "form_teacher": teacher_rate}


if __name__ == "__main__":
    main()
