"""Evaluators against the real local sampler and TrainingClient on the tiny model."""

import asyncio

import numpy as np
import pytest
from transformers import AutoTokenizer

from envs.arithmetic import grade, make_problems
from rlpipe import ServiceClient
from rlpipe.evaluators import nll_eval, nll_eval_async, run_sampling_eval, sampling_eval
from rlpipe.renderers import ChatTemplateRenderer, conversation_to_datum
from rlpipe.sampling import create_sampling_client
from rlpipe.types import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=1.0, seed=0)


@pytest.fixture(scope="module")
def renderer(tiny_model_path):
    return ChatTemplateRenderer(AutoTokenizer.from_pretrained(tiny_model_path))


@pytest.fixture(scope="module")
def sampler(tiny_model_path):
    return create_sampling_client(tiny_model_path, backend="local")


def items_with(renderer, grader_for):
    problems = make_problems(6, difficulty=1, seed=3)
    return [(renderer.build_generation_prompt([{"role": "user", "content": p.question}]), grader_for(p))
            for p in problems]


def content(renderer):
    return lambda tokens: renderer.parse_response(tokens)[0]["content"]


def test_sampling_eval_known_answers(renderer, sampler):
    everything = items_with(renderer, lambda p: lambda text: True)
    nothing = items_with(renderer, lambda p: lambda text: False)
    kw = dict(decode=content(renderer), num_samples=2)
    assert run_sampling_eval(sampler, everything, PARAMS, **kw) == {"eval/accuracy": 1.0, "eval/n": 12.0}
    assert run_sampling_eval(sampler, nothing, PARAMS, **kw) == {"eval/accuracy": 0.0, "eval/n": 12.0}


def test_sampling_eval_arithmetic_grader(renderer, sampler):
    seen = []

    def grader_for(p):
        def grader(text):
            seen.append(text)
            return grade(text, p.answer)[1]["correct"] == 1.0
        return grader

    metrics = asyncio.run(sampling_eval(sampler, items_with(renderer, grader_for), PARAMS,
                                        decode=content(renderer), num_samples=3, prefix="test/"))
    assert 0.0 <= metrics["test/accuracy"] <= 1.0 and metrics["test/n"] == 18.0
    assert len(seen) == 18 and all("<|end|>" not in text for text in seen)  # graders see parsed text
    with pytest.raises(ValueError, match="at least one"):
        run_sampling_eval(sampler, [], PARAMS, decode=content(renderer))


def test_nll_eval_matches_forward_logprobs(renderer, tiny_model_path, tmp_path):
    client = ServiceClient(tmp_path).create_lora_training_client(tiny_model_path, rank=4, seed=0)
    chats = [[{"role": "user", "content": p.question}, {"role": "assistant", "content": p.solution()}]
             for p in make_problems(5, seed=1)]
    data = [conversation_to_datum(renderer, c, "last_assistant") for c in chats]
    out = client.forward(data, "cross_entropy").result()
    logprobs = [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]
    weights = [d.loss_fn_inputs["weights"].to_numpy() for d in data]
    expected = -sum((lp * w).sum() for lp, w in zip(logprobs, weights)) / sum(w.sum() for w in weights)

    metrics = nll_eval(client, data)
    assert metrics["eval/tokens"] == sum(w.sum() for w in weights)
    assert metrics["eval/nll"] == pytest.approx(expected, rel=1e-5)
    assert asyncio.run(nll_eval_async(client, data))["eval/nll"] == pytest.approx(expected, rel=1e-5)
    # only the answers count: the prompt tokens have weight 0 and were left out
    assert metrics["eval/tokens"] < sum(len(lp) for lp in logprobs)
    assert np.isfinite(metrics["eval/nll"]) and metrics["eval/nll"] > 0
    client.close()
