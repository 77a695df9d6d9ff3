"""The arithmetic env: grading, problem generation, the held-out helpers and a group rollout."""

import pytest
from transformers import AutoTokenizer

from envs.arithmetic import FORMAT_BONUS, ArithmeticDataset, Problem, answer_datums, eval_items, grade, make_problems
from rlpipe.env import ProblemEnv
from rlpipe.renderers import get_renderer
from rlpipe.rollouts import do_group
from rlpipe.types import SampledSequence, SampleResponse, SamplingParams
from tests.scripted import fake_logprobs


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def prompt_tokens(tokenizer, question: str) -> list[int]:
    """The question as a user message, rendered for generation: what the env prompts with."""
    return get_renderer(tokenizer).build_generation_prompt([{"role": "user", "content": question}]).to_ints()


@pytest.mark.parametrize("text, reward, correct, formatted", [
    ("3 + 4 = 7", 1.0 + FORMAT_BONUS, 1.0, 1.0),
    (" 3 + 4 = 7 ", 1.0 + FORMAT_BONUS, 1.0, 1.0),
    ("the answer 7", 1.0, 1.0, 0.0),         # right number, not in the taught form
    ("3 + 4 = 8", FORMAT_BONUS, 0.0, 1.0),   # in form, wrong
    ("8", 0.0, 0.0, 0.0),
    ("banana", 0.0, 0.0, 0.0),               # nothing to parse
    ("", 0.0, 0.0, 0.0),
    ("3 + 4 = 7 = 7", 1.0, 1.0, 0.0),        # not the form; the last number is still read
])
def test_grade(text, reward, correct, formatted):
    assert grade(text, 7) == (pytest.approx(reward), {"correct": correct, "format": formatted})


def test_problems_follow_difficulty_and_seed():
    assert make_problems(50, 1, seed=3) == make_problems(50, 1, seed=3)
    assert make_problems(50, 1, seed=3) != make_problems(50, 1, seed=4)
    easy = make_problems(200, 1, seed=0)
    assert {p.op for p in easy} == {"+"} and all(0 <= p.a <= 9 and 0 <= p.b <= 9 for p in easy)
    assert {p.op for p in make_problems(300, 4, seed=0)} == {"+", "-", "*"}
    p = Problem(6, "*", 7)
    assert (p.question, p.answer, p.solution()) == ("What is 6 * 7?", 42, "6 * 7 = 42")
    with pytest.raises(ValueError, match="difficulty"):
        make_problems(1, 5)


def test_eval_items_grade_right_answers_only(tokenizer):
    items = eval_items(tokenizer, n=5, difficulty=1, seed=11)
    problems = make_problems(5, 1, seed=11)
    for (prompt, grader), p in zip(items, problems):
        assert prompt.to_ints() == prompt_tokens(tokenizer, p.question)
        assert grader(p.solution()) and grader(str(p.answer)) and not grader(f"{p.answer + 1}")


def test_answer_datums_train_on_the_answer_only(tokenizer):
    data = answer_datums(tokenizer, n=4, difficulty=1, seed=5)
    for datum, p in zip(data, make_problems(4, 1, seed=5)):
        prompt = prompt_tokens(tokenizer, p.question)
        answer = tokenizer(p.solution(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        weights = datum.loss_fn_inputs["weights"].to_numpy()
        targets = datum.loss_fn_inputs["target_tokens"].to_numpy()
        assert datum.model_input.to_ints() == (prompt + answer)[:-1]  # inputs and targets are shifted by one
        assert weights.sum() == len(answer) and list(targets[weights > 0]) == answer


class AnswerSampler:
    """Stands in for the policy (the env is under test, not the sampler): each call returns
    the next scripted text with made-up logprobs."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts = tokenizer, list(texts)
        self.requests = []  # num_samples of each call

    async def sample_async(self, prompt, num_samples, sampling_params):
        self.requests.append(num_samples)
        return SampleResponse(sequences=[self._one() for _ in range(num_samples)])  # one scripted text each

    def _one(self):
        tokens = self.tokenizer(self.texts.pop(0), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return SampledSequence(stop_reason="stop", tokens=tokens, logprobs=fake_logprobs(len(tokens)), policy_version=2)


async def test_group_rollout(tokenizer):
    dataset = ArithmeticDataset(tokenizer, groups_per_batch=2, group_size=3, difficulty=1, n_problems=10, seed=0)
    assert len(dataset) == 5
    builder = dataset.get_batch(0)[0]
    p = builder.problem
    sampler = AnswerSampler(tokenizer, [p.solution(), str(p.answer), "no idea"])
    group = await do_group(builder, lambda: sampler, SamplingParams(max_tokens=12))
    assert not group.failed, group.error
    assert sampler.requests == [3]  # one prompt for the whole group: one request of 3 samples
    assert [t.reward for t in group.trajectories] == pytest.approx([1.1, 1.0, 0.0])
    assert sum(t.advantage for t in group.trajectories) == pytest.approx(0.0)
    for t in group.trajectories:
        n_prompt = len(prompt_tokens(tokenizer, p.question))
        assert t.action_mask == [0] * n_prompt + [1] * (len(t.tokens) - n_prompt)
        assert set(t.policy_versions[n_prompt:]) == {2}


async def test_group_with_different_prompts_samples_env_by_env(tokenizer):
    """Envs that do not share their first observation each get their own request."""
    problems = [Problem(1, "+", 2), Problem(3, "+", 4)]

    class Mixed:
        async def make_envs(self):
            return [ProblemEnv(p, get_renderer(tokenizer)) for p in problems]

    sampler = AnswerSampler(tokenizer, ["3", "9"])
    group = await do_group(Mixed(), lambda: sampler, SamplingParams(max_tokens=12))
    assert not group.failed, group.error
    assert sampler.requests == [1, 1]
    assert [t.reward for t in group.trajectories] == pytest.approx([1.0, 0.0])
