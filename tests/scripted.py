"""Test helpers: scripted rollouts for env tests, and loading the example recipes.

The sampler stand-ins in the env tests are fakes on purpose: the sampler is not under test
there (the envs and the token accounting are)."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_recipe(name: str):
    """The main() of examples/<name>.py (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def fake_logprobs(n: int) -> list[float]:
    """The made-up logprobs a scripted sampler returns for n tokens."""
    return [-0.5 - 0.01 * i for i in range(n)]


class Recorder:
    """Wraps an env and keeps what it returned, to rebuild the expected token history."""

    def __init__(self, env):
        self.env, self.prompt, self.actions, self.observations = env, [], [], []

    async def initial_observation(self):
        observation, stop = await self.env.initial_observation()
        self.prompt = observation.to_ints()
        return observation, stop

    async def step(self, action):
        result = await self.env.step(action)
        self.actions.append(list(action))
        if not result.episode_done:
            self.observations.append(result.next_observation.to_ints())
        return result

    def check_history(self, trajectory, version):
        """The history is exactly prompt + action + observation + action + ...: observation
        tokens have mask 0, action tokens mask 1 with their sampling logprobs and version."""
        segments = [(self.prompt, False)]
        for i, action in enumerate(self.actions):
            segments.append((action, True))
            if i < len(self.observations):
                segments.append((self.observations[i], False))
        assert trajectory.tokens == [t for seg, _ in segments for t in seg]
        assert trajectory.action_mask == [int(is_action) for seg, is_action in segments for _ in seg]
        assert trajectory.policy_versions == [version if is_action else -1 for seg, is_action in segments for _ in seg]
        assert trajectory.sampling_logprobs == pytest.approx(
            [lp for seg, is_action in segments for lp in (fake_logprobs(len(seg)) if is_action else [0.0] * len(seg))])
