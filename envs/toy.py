"""A toy env that any model, even an untrained one, gets a graded reward on: the share of
digit characters in a short answer. Rewards vary from the first step, so it exercises the
pipeline (and shows learning within a few steps) without any warm-up. Used by the pipeline
tests and benchmarks; not a task anyone wants to solve."""

from __future__ import annotations

from dataclasses import dataclass

from rlpipe.env import StepResult
from rlpipe.renderers import get_renderer
from rlpipe.types import ModelInput


def digit_share(text: str) -> float:
    text = text.strip()
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


def render(renderer, prompt: str) -> ModelInput:
    return renderer.build_generation_prompt([{"role": "user", "content": prompt}])


class DigitsEnv:
    def __init__(self, tokenizer, prompt: str, rendered: ModelInput | None = None):
        """rendered: the prompt's tokens, if the caller has them (a group renders it once)."""
        self.tokenizer = tokenizer
        self.renderer = get_renderer(tokenizer)
        self.prompt = prompt
        self.rendered = rendered if rendered is not None else render(self.renderer, prompt)

    async def initial_observation(self):
        return self.rendered, list(self.renderer.stop_sequences)

    async def step(self, action: list[int]) -> StepResult:
        share = digit_share(self.tokenizer.decode(action, skip_special_tokens=True))
        return StepResult(reward=share, episode_done=True, metrics={"digit_share": share})


@dataclass
class DigitsGroupBuilder:
    tokenizer: object
    prompt: str
    group_size: int

    async def make_envs(self):
        rendered = render(get_renderer(self.tokenizer), self.prompt)
        return [DigitsEnv(self.tokenizer, self.prompt, rendered) for _ in range(self.group_size)]


class DigitsDataset:
    PROMPTS = ["Say a number.", "What is the answer?", "Count for me.", "Give me digits."]

    def __init__(self, tokenizer, groups_per_batch: int = 4, group_size: int = 8):
        self.tokenizer = tokenizer
        self.groups_per_batch = groups_per_batch
        self.group_size = group_size

    def __len__(self) -> int:
        return 1_000_000

    def get_batch(self, index: int) -> list[DigitsGroupBuilder]:
        return [DigitsGroupBuilder(self.tokenizer, self.PROMPTS[(index + i) % len(self.PROMPTS)], self.group_size)
                for i in range(self.groups_per_batch)]
