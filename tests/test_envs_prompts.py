"""Prompts go through the renderer (rlpipe.renderers), and ProblemEnv, the single-turn env that
arithmetic and GSM8K are made of.

The envs used to render their prompts with their own copies of apply_chat_template + tokenize;
`chat_template_tokens` below is that old code, kept here to check, env by env, that the prompt
tokens of the embedded model did not change when the renderer took over."""

import asyncio

import pytest
from transformers import AutoTokenizer

from envs import arithmetic, gsm8k, multi_agent, tool_use, toy
from rlpipe.env import ProblemEnv, ProblemGroupBuilder, problem_prompt, reference_datum
from rlpipe.renderers import RoleColonRenderer, get_renderer
from rlpipe.testing.embedded import default_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def chat_template_tokens(tokenizer, messages: list[dict]) -> list[int]:
    """How every env rendered its prompt before the renderer did."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def first_prompt(builder) -> list[list[int]]:
    async def prompts():
        return [(await env.initial_observation())[0].to_ints() for env in await builder.make_envs()]

    return asyncio.run(prompts())


def test_arithmetic_prompts_are_token_exact(tokenizer):
    dataset = arithmetic.ArithmeticDataset(tokenizer, groups_per_batch=4, group_size=2, difficulty=4, seed=3)
    for builder in dataset.get_batch(0):
        old = chat_template_tokens(tokenizer, user(builder.problem.question))
        assert first_prompt(builder) == [old, old]
    for (prompt, _), p in zip(arithmetic.eval_items(tokenizer, n=4, seed=5), arithmetic.make_problems(4, seed=5)):
        assert prompt.to_ints() == chat_template_tokens(tokenizer, user(p.question))
    for datum, p in zip(arithmetic.answer_datums(tokenizer, n=4, seed=5), arithmetic.make_problems(4, seed=5)):
        answer = tokenizer(p.solution(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert datum.model_input.to_ints() == (chat_template_tokens(tokenizer, user(p.question)) + answer)[:-1]


def test_gsm8k_prompts_are_token_exact(tokenizer):
    dataset = gsm8k.GSM8KDataset(tokenizer, gsm8k.SAMPLE_PATH, groups_per_batch=3, group_size=2)
    for builder in dataset.get_batch(0):
        old = chat_template_tokens(tokenizer, user(f"{builder.problem.question}\n{gsm8k.INSTRUCTION}"))
        assert first_prompt(builder) == [old, old]
    problems = gsm8k.load_problems(gsm8k.SAMPLE_PATH)
    for datum, p in zip(gsm8k.answer_datums(tokenizer), problems):
        answer = tokenizer(p.solution.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        old = chat_template_tokens(tokenizer, user(f"{p.question}\n{gsm8k.INSTRUCTION}"))
        assert datum.model_input.to_ints() == (old + answer)[:-1]


def test_toy_prompts_are_token_exact(tokenizer):
    for builder in toy.DigitsDataset(tokenizer, groups_per_batch=4, group_size=2).get_batch(0):
        old = chat_template_tokens(tokenizer, user(builder.prompt))
        assert first_prompt(builder) == [old, old]


def test_tool_use_and_multi_agent_prompts_are_token_exact(tokenizer):
    tools = tool_use.default_tools()
    task = tool_use.load_tasks()[0]
    old = chat_template_tokens(tokenizer, [{"role": "system", "content": tool_use.system_prompt(tools)},
                                           *user(task.question)])
    assert first_prompt(tool_use.ToolUseGroupBuilder(task, tokenizer, tools, 2)) == [old, old]

    async def x_prompt():  # O's first observation waits for X's move
        x = (await multi_agent.TicTacToeGroupBuilder(tokenizer).make_envs())[0]
        return (await x.initial_observation())[0].to_ints(), x.report()

    prompt, report = asyncio.run(x_prompt())
    assert prompt == chat_template_tokens(tokenizer, [{"role": "system", "content": multi_agent.RULES},
                                                      *user(f"You play X. You move first.\n{report}")])

    env = multi_agent.GuessNumberEnv(7, tokenizer, max_turns=4)
    text = ("I am thinking of an integer from 1 to 100. Guess it: reply with a single number. "
            "I will say 'higher', 'lower' or 'correct'. You have 4 guesses.")
    assert asyncio.run(env.initial_observation())[0].to_ints() == chat_template_tokens(tokenizer, user(text))


class Riddle:
    """A Problem written for this test alone: ProblemEnv needs nothing else."""

    question = "What has keys but opens no locks?"

    def check_answer(self, response: str) -> bool:
        return "piano" in response.lower()

    def check_format(self, response: str) -> bool:
        return response.strip().endswith(".")

    def reference_answer(self) -> str:
        return "A piano."

    def metrics(self, response: str) -> dict[str, float]:
        return {"words": float(len(response.split()))}


@pytest.mark.parametrize("reply, reward, correct, formatted", [
    ("A piano.", 1.25, 1.0, 1.0), ("piano", 1.0, 1.0, 0.0), ("A door.", 0.25, 0.0, 1.0), ("door", 0.0, 0.0, 0.0),
])
def test_problem_env_rewards_answer_and_format(tokenizer, reply, reward, correct, formatted):
    renderer = get_renderer(tokenizer)
    builder = ProblemGroupBuilder(Riddle(), renderer, group_size=3, format_coef=0.25, instruction="One word.",
                                  convo_prefix=[{"role": "system", "content": "Be brief."}])
    envs = asyncio.run(builder.make_envs())
    assert len(envs) == 3
    prompt, stop = asyncio.run(envs[0].initial_observation())
    assert stop == renderer.stop_sequences == [tokenizer.eos_token_id]
    assert prompt.to_ints() == chat_template_tokens(tokenizer, [
        {"role": "system", "content": "Be brief."}, *user(f"{Riddle.question}\nOne word.")])
    action = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    result = asyncio.run(envs[1].step(action))
    assert result.episode_done and result.reward == pytest.approx(reward)
    assert result.metrics == {"correct": correct, "format": formatted, "words": float(len(reply.split()))}


def test_problem_env_matches_the_envs_own_graders(tokenizer):
    """arithmetic.grade and gsm8k.grade (kept for graders that hold only the answer) give
    what the ProblemEnv of the same problem gives."""
    renderer = get_renderer(tokenizer)
    cases = [(arithmetic.Problem(3, "+", 4), arithmetic.grade, ["3 + 4 = 7", "7", "3 + 4 = 8", "no"]),
             (gsm8k.load_problems()[0], gsm8k.grade, ["#### 32", "it is 32", "\\boxed{31}", "none"])]
    for problem, grade, replies in cases:
        for reply in replies:
            env = ProblemEnv(problem, renderer, format_coef=0.1)
            result = asyncio.run(env.step(tokenizer(reply, add_special_tokens=False)["input_ids"]))
            assert (result.reward, result.metrics) == grade(reply, problem.answer), reply


def test_reference_datum_and_its_error(tokenizer):
    renderer = get_renderer(tokenizer)
    datum = reference_datum(renderer, Riddle())
    answer = tokenizer("A piano.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = problem_prompt(renderer, Riddle()).to_ints()
    assert datum.model_input.to_ints() == (prompt + answer)[:-1]
    assert datum.loss_fn_inputs["weights"].to_numpy().sum() == len(answer)
    with pytest.raises(ValueError, match="stop token"):
        reference_datum(RoleColonRenderer(tokenizer), Riddle())
