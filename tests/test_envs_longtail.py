"""The long-tail counting task (envs/longtail.py): its grading, its length law, its datasets."""

import asyncio
import random

import pytest

from envs.longtail import CountEnv, LongTailDataset, Problem, answer_datums, heavy_tail_counts, make_problems


def test_score_gives_partial_credit_for_the_right_prefix_and_penalises_running_on():
    p = Problem(1, 5)
    assert p.question == "Count from 1 to 5." and p.reference_answer() == "1 2 3 4 5"
    assert p.score("1 2 3 4 5") == 1.0 and p.check_answer(" 1 2 3 4 5 ")
    assert p.score("1 2 3") == pytest.approx(3 / 5)  # stopped early
    assert p.score("1 2 3 4 5 6 7 8 9 10") == pytest.approx(5 / 10)  # ran on past the end
    assert p.score("1 2 4 5 6") == pytest.approx(2 / 5)  # lost its place
    assert p.score("2 3") == 0.0 and p.score("") == 0.0
    assert p.check_format("1 2 x") is False and p.check_format("") is False and p.check_format("7 8")


def test_lengths_are_heavy_tailed_and_capped():
    counts = heavy_tail_counts(20_000, random.Random(0), n_min=2, alpha=1.0, max_count=100)
    counts.sort()
    assert min(counts) >= 2 and max(counts) == 100
    assert counts[len(counts) // 2] <= 5  # half the answers are a handful of numbers
    assert 0.05 < sum(c >= 20 for c in counts) / len(counts) < 0.15  # P(n >= 20) = 2/20 under the law
    with pytest.raises(ValueError):
        heavy_tail_counts(1, random.Random(0), alpha=0)


def test_dataset_env_and_sft_data(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    dataset = LongTailDataset(tok, groups_per_batch=3, group_size=2, n_problems=30, seed=1)
    batch = dataset.get_batch(0)
    assert len(batch) == 3 and [b.problem for b in batch] == make_problems(30, seed=1)[:3]
    assert dataset.get_batch(len(dataset))[0].problem == batch[0].problem  # wraps around
    envs = asyncio.run(batch[0].make_envs())
    assert len(envs) == 2
    prompt, stop = asyncio.run(envs[0].initial_observation())
    assert batch[0].problem.question in tok.decode(prompt.to_ints()) and stop
    answer = tok(batch[0].problem.reference_answer(), add_special_tokens=False)["input_ids"]
    result = asyncio.run(envs[0].step(answer + stop[:1]))
    assert result.reward == 1.0 and result.episode_done and result.metrics["correct"] == 1.0
    assert asyncio.run(CountEnv(Problem(1, 4), dataset.renderer, prompt).step(tok("1 2", add_special_tokens=False)["input_ids"])).reward == 0.5
    data = answer_datums(tok, n=50, max_count=100)
    lengths = [sum(w > 0 for w in d.loss_fn_inputs["weights"].tolist()) for d in data]
    assert max(lengths) > 60 and min(lengths) < 10  # SFT sees short and long answers
