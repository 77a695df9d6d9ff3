"""In-flight weight updates without an engine: the config refuses the mode where the sampler
cannot do it, the local engine refuses it itself, the engine options carry it, and vLLM's
weight-version spans become one version per token, which an episode keeps."""

import asyncio

import pytest

from rlpipe.env import StepResult
from rlpipe.pipeline.config import load
from rlpipe.pipeline.explorer_engine import engine_options
from rlpipe.rollouts import do_episode
from rlpipe.sampling import SamplingError
from rlpipe.sampling.inflight import token_versions
from rlpipe.types import ModelInput, SampledSequence, SampleResponse


def config(tmp_path, **overrides):
    path = tmp_path / "run.toml"
    path.write_text('name = "inflight"\n')
    return load(path, overrides)


def test_config_refuses_inflight_without_vllm(tmp_path):
    assert config(tmp_path).explorer.weight_updates == "between_requests"
    ok = config(tmp_path, **{"explorer.weight_updates": "inflight", "explorer.sampler": "vllm"})
    assert engine_options(ok, "vllm")["weight_updates"] == "inflight"
    assert "weight_updates" not in engine_options(config(tmp_path), "vllm")  # the engines' default
    with pytest.raises(ValueError, match='"inflight" needs the vLLM sampler; explorer.sampler is local'):
        config(tmp_path, **{"explorer.weight_updates": "inflight", "explorer.sampler": "local"})
    tinker = config(tmp_path, **{"explorer.weight_updates": "inflight", "explorer.sampler": "tinker",  # served:
                                 "learner.backend": "tinker", "tinker_base_url": "http://127.0.0.1:1"})  # its clients
    assert tinker.explorer.weight_updates == "inflight"  # take each save at their next request (docs/tinker.md)
    with pytest.raises(ValueError, match="weight_updates"):
        config(tmp_path, **{"explorer.weight_updates": "mid_token"})


def test_local_engine_refuses_inflight(tiny_model_path):
    from rlpipe.sampling.local_backend import LocalEngine

    with pytest.raises(ValueError, match='"inflight" needs the vLLM sampler: the local sampler finishes every request'):
        LocalEngine(tiny_model_path, weight_updates="inflight")
    with pytest.raises(ValueError, match="weight_updates must be one of"):
        LocalEngine(tiny_model_path, weight_updates="sometimes")


class Span:  # shaped like vllm.outputs.WeightVersionSpan
    def __init__(self, version, start, end):
        self.version, self.start, self.end = version, start, end


def test_weight_version_spans_become_per_token_versions():
    assert token_versions([Span("3", 0, 2), Span("4", 2, 5)], 5) == [3, 3, 4, 4, 4]
    assert token_versions([Span("3", 0, 6)], 4) == [3] * 4  # stop-string surplus trimmed after labelling
    assert token_versions(None, 3) is None
    assert token_versions([Span("default", 0, 3)], 3) is None  # not a version of ours: the request's own
    with pytest.raises(SamplingError, match="labelled 2 of 3 tokens"):
        token_versions([Span("3", 0, 2)], 3)


class OneTurn:  # an Env that takes one action
    async def initial_observation(self):
        return ModelInput.from_ints([5, 6]), None

    async def step(self, action):
        return StepResult(reward=1.0, episode_done=True, next_observation=ModelInput.empty())


class FakeSampler:  # test fake: returns one sequence an in-flight update reached after 2 tokens
    def __init__(self, versions):
        self.versions = versions

    async def sample_async(self, prompt, num_samples, params):
        seq = SampledSequence(stop_reason="length", tokens=[7, 8, 9], logprobs=[-1.0, -2.0, -3.0],
                              policy_version=self.versions[0], policy_versions=self.versions)
        return SampleResponse(sequences=[seq])


def test_episode_keeps_each_tokens_version():
    from rlpipe.types import SamplingParams

    trajectory = asyncio.run(do_episode(OneTurn(), lambda: FakeSampler([4, 4, 5]), SamplingParams(max_tokens=3), max_turns=1))
    assert trajectory.policy_versions == [-1, -1, 4, 4, 5]
    with pytest.raises(Exception, match="per-token versions"):
        asyncio.run(do_episode(OneTurn(), lambda: FakeSampler([4, 5]), SamplingParams(max_tokens=3), max_turns=1))
    assert SampledSequence(stop_reason="stop", tokens=[1, 2], policy_version=6).token_versions() == [6, 6]
