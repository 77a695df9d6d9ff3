"""GSM8K env: answer parsing, grading, data loading and its errors, one group rollout."""

import json
from decimal import Decimal

import pytest
from transformers import AutoTokenizer

from envs.gsm8k import (FORMAT_BONUS, SAMPLE_PATH, GSM8KDataset, extract_answer, grade, load_problems,
                        parse_number)
from rlpipe.rollouts import do_group
from rlpipe.types import SampledSequence, SampleResponse, SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


class ScriptedSampler:
    """Stands in for the policy: returns the given completions in order, with made-up
    logprobs. The sampler is not under test here (the env and the token accounting are),
    so a fake one is fine."""

    def __init__(self, tokenizer, replies: list[str], version: int = 3):
        self.tokenizer, self.replies, self.version = tokenizer, list(replies), version

    async def sample_async(self, prompt, num_samples, sampling_params):
        return SampleResponse(sequences=[self._one() for _ in range(num_samples)])  # one scripted reply each

    def _one(self):
        tokens = self.tokenizer(self.replies.pop(0), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        logprobs = [-0.01 * (i + 1) for i in range(len(tokens))]
        return SampledSequence(stop_reason="stop", tokens=tokens, logprobs=logprobs, policy_version=self.version)


@pytest.mark.parametrize("text, value", [
    ("42", Decimal(42)), ("$1,234.50", Decimal("1234.50")), ("-7 degrees", Decimal(-7)), ("\u22123", Decimal(-3)),
    ("\\$12", Decimal(12)), ("-$4.25", Decimal("-4.25")), ("$-4.25", Decimal("-4.25")), ("3,4", Decimal(3)),
    ("18,000", Decimal(18000)), (".5", Decimal("0.5")), ("1{,}234", Decimal(1234)), ("no number", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text, value, formatted", [
    ("14 + 18 = 32\n#### 32", Decimal(32), True),
    ("So the answer is $\\boxed{-7}$.", Decimal(-7), True),
    ("#### $1,234.50", Decimal("1234.5"), True),
    ("first #### 5 then \\boxed{6}", Decimal(6), True),  # the last marked answer wins
    ("\\boxed{6} then #### 5", Decimal(5), True),
    ("The answer is 42.", Decimal(42), False),  # last number, no format credit
    ("#### and \\boxed{x} but 9", Decimal(9), False),  # marks without a number do not count
    ("I do not know", None, False),
    ("", None, False),
])
def test_extract_answer(text, value, formatted):
    assert extract_answer(text) == (value, formatted)


def test_grade_right_and_wrong_answers():
    assert grade("3 * 6 = 18\n#### 32", Decimal(32)) == (1 + FORMAT_BONUS, {"correct": 1.0, "format": 1.0, "answered": 1.0})
    assert grade("it is 32", Decimal(32))[0] == 1.0
    assert grade("#### 31", Decimal(32))[0] == pytest.approx(FORMAT_BONUS)
    assert grade("31", Decimal(32))[0] == 0.0
    assert grade("#### 29.250", Decimal("29.25"))[0] == pytest.approx(1 + FORMAT_BONUS)
    assert grade("\\boxed{\\$18,000}", Decimal(18000))[0] == pytest.approx(1 + FORMAT_BONUS)
    assert grade("####", Decimal(1)) == (0.0, {"correct": 0.0, "format": 0.0, "answered": 0.0})
    assert grade("\x00\ufffd<|end|>" * 50, Decimal(1))[0] == 0.0  # garbage never raises


def test_sample_file_is_consistent():
    problems = load_problems(SAMPLE_PATH)
    assert len(problems) == 30
    answers = {p.answer for p in problems}
    assert {Decimal(32), Decimal(-7), Decimal("29.25"), Decimal(18000), Decimal("7.5")} <= answers
    for p in problems:  # the reference solution earns the full reward
        assert grade(p.solution, p.answer)[0] == pytest.approx(1 + FORMAT_BONUS), p.question


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("bad_line, message", [
    # broken JSON is found by its line (blank lines count); a readable row by its row number
    ("{not json", "line 3 is not valid JSON"),
    ('["a list"]', "line 3 is a JSON list, not an object"),
    ('{"question": "q?"}', "row 2 \\(1-based\\): missing 'answer'"),
    ('{"question": "", "answer": "#### 1"}', "row 2 \\(1-based\\): empty 'question'"),
    ('{"question": "q?", "answer": "no final line"}', "row 2 \\(1-based\\): .*####"),
])
def test_malformed_line_names_its_line(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"})
    path.write_text(f"{good}\n\n{bad_line}\n")
    with pytest.raises(ValueError, match=message) as info:
        load_problems(path)
    assert str(info.value).startswith(f"{path}: ")


def test_dataset_batches(tokenizer):
    ds = GSM8KDataset(tokenizer, SAMPLE_PATH, groups_per_batch=4, group_size=3)
    assert len(ds) == 7
    batch = ds.get_batch(0)
    assert len(batch) == 4 and all(b.group_size == 3 for b in batch)
    assert [b.problem for b in ds.get_batch(7)] == [b.problem for b in batch]  # wraps around
    shuffled = {b.problem.question for i in range(len(ds)) for b in ds.get_batch(i)}
    assert len(shuffled) == 28
    with pytest.raises(ValueError, match="fewer than groups_per_batch"):
        GSM8KDataset(tokenizer, SAMPLE_PATH, groups_per_batch=31)


async def test_group_rollout_rewards_and_tokens(tokenizer):
    ds = GSM8KDataset(tokenizer, SAMPLE_PATH, groups_per_batch=1, group_size=4, seed=None)
    builder = ds.get_batch(0)[0]
    assert builder.problem.answer == 32
    replies = ["3 * 6 = 18 and 14 + 18 = 32\n#### 32", "\\boxed{32}", "maybe 31", "32"]
    sampler = ScriptedSampler(tokenizer, replies, version=5)
    group = await do_group(builder, lambda: sampler, SamplingParams(max_tokens=64))
    assert not group.failed, group.error
    prompt, stop = await (await builder.make_envs())[0].initial_observation()
    assert stop == [tokenizer.eos_token_id]
    prompt = prompt.to_ints()
    assert tokenizer.decode(prompt).startswith("<|user|>Mia has 14 stickers")
    rewards = {}
    for t in group.trajectories:
        action = t.tokens[len(prompt):]
        assert t.tokens[: len(prompt)] == prompt
        assert t.action_mask == [0] * len(prompt) + [1] * len(action)
        assert t.sampling_logprobs[len(prompt):] == [-0.01 * (i + 1) for i in range(len(action))]
        assert t.policy_versions == [-1] * len(prompt) + [5] * len(action)
        rewards[tokenizer.decode(action, skip_special_tokens=True)] = t.reward
    assert rewards == pytest.approx({replies[0]: 1.1, replies[1]: 1.1, replies[2]: 0.0, replies[3]: 1.0})
    assert sum(t.advantage for t in group.trajectories) == pytest.approx(0.0)
