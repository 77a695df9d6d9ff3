"""Long-tail counting: "Count from a to b." answered with "a a+1 ... b" in one assistant turn.

The workload of benchmarks/bench_async.py: answers whose length has the heavy tail of
reasoning RL. How many numbers a problem asks for is drawn from a discrete Pareto law
(n = floor(n_min * U^(-1/alpha)), capped at max_count): with the defaults half the answers
are a handful of tokens, one in ten is over 50, and a few reach max_count numbers (about 300
tokens with the embedded model's one-token digits). A synchronous step waits for its longest
sample; this is the shape where overlapping sampling with training pays.

The embedded model counts after its pre-training corpus and a short SFT warm-up
(`answer_datums`), but loses its place or stops early or late on long answers, so the reward
gives partial credit: the share of the expected numbers it gets right in order, divided by the
longer of the answer and the response (running on past b costs as much as stopping short).
Exact answers score 1 ("correct"). reasoning-gym is not installed in the project's venv, and
its prompts alone would run to hundreds of tokens for the 2-layer, 384-token-vocabulary model.
RL on this task can collapse to short answers (3 numbers fit most problems): at learning rate
1e-3 it did within 60 steps; bench_async.py uses 3e-4.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlpipe.env import StepResult, problem_prompt, reference_datum
from rlpipe.renderers import get_renderer
from rlpipe.types import ModelInput



@dataclass(frozen=True)
class Problem:
    """Count from `start` for `count` numbers; an rlpipe.env.Problem (reference_datum uses it)."""

    start: int
    count: int

    @property
    def question(self) -> str:
        return f"Count from {self.start} to {self.start + self.count - 1}."

    @property
    def answer(self) -> list[str]:
        return [str(self.start + i) for i in range(self.count)]

    def reference_answer(self) -> str:
        return " ".join(self.answer)

    def check_answer(self, response: str) -> bool:
        return response.split() == self.answer

    def check_format(self, response: str) -> bool:
        words = response.split()
        return bool(words) and all(w.isdigit() for w in words)

    def score(self, response: str) -> float:
        """Numbers right in order from the first, over the longer of the answer and the response."""
        given, answer = response.split(), self.answer
        right = 0
        for g, a in zip(given, answer):
            if g != a:
                break
            right += 1
        return right / max(len(answer), len(given))


def heavy_tail_counts(n: int, rng: random.Random, n_min: int = 2, alpha: float = 1.0, max_count: int = 100) -> list[int]:
    """n answer lengths (numbers to count) from a discrete Pareto law, capped at max_count."""
    if n_min < 1 or alpha <= 0 or max_count < n_min:
        raise ValueError(f"need n_min >= 1, alpha > 0 and max_count >= n_min, got {n_min}, {alpha}, {max_count}")
    return [min(max_count, int(n_min * (1.0 - rng.random()) ** (-1.0 / alpha))) for _ in range(n)]


def make_problems(n: int, seed: int = 0, n_min: int = 2, alpha: float = 1.0, max_count: int = 100,
                  max_start: int = 1) -> list[Problem]:
    """max_start > 1 draws starts from 1..max_start: the model must then copy the first number
    too, which the embedded model does badly (its rewards are then mostly 0)."""
    rng = random.Random(seed)
    counts = heavy_tail_counts(n, rng, n_min, alpha, max_count)
    return [Problem(rng.randint(1, max_start), c) for c in counts]


class CountEnv:
    """One counting answer; reward = Problem.score (partial credit), metrics correct, format,
    score, numbers (how many the response gave) and expected (how many the answer has)."""

    def __init__(self, problem: Problem, renderer, prompt: ModelInput):
        self.problem, self.renderer, self.prompt = problem, renderer, prompt

    async def initial_observation(self):
        return self.prompt, list(self.renderer.stop_sequences)

    async def step(self, action: list[int]) -> StepResult:
        text = self.renderer.tokenizer.decode(action, skip_special_tokens=True)
        score = self.problem.score(text)
        metrics = {"correct": float(self.problem.check_answer(text)), "format": float(self.problem.check_format(text)),
                   "score": score, "numbers": float(len(text.split())), "expected": float(self.problem.count)}
        return StepResult(reward=score, episode_done=True, metrics=metrics)


@dataclass
class CountGroupBuilder:
    problem: Problem
    renderer: object
    group_size: int

    async def make_envs(self) -> list[CountEnv]:
        prompt = problem_prompt(self.renderer, self.problem)  # once per group
        return [CountEnv(self.problem, self.renderer, prompt) for _ in range(self.group_size)]


class LongTailDataset:
    """groups_per_batch counting problems per batch, each rolled out group_size times; the
    answer lengths follow heavy_tail_counts(n_min, alpha, max_count)."""

    def __init__(self, tokenizer, groups_per_batch: int = 4, group_size: int = 8, n_problems: int = 10_000,
                 seed: int = 0, n_min: int = 2, alpha: float = 1.0, max_count: int = 100, max_start: int = 1):
        self.renderer = get_renderer(tokenizer)
        self.groups_per_batch, self.group_size = groups_per_batch, group_size
        self.problems = make_problems(n_problems, seed, n_min, alpha, max_count, max_start)

    def __len__(self) -> int:
        return len(self.problems) // self.groups_per_batch

    def get_batch(self, index: int) -> list[CountGroupBuilder]:
        start = (index % len(self)) * self.groups_per_batch
        return [CountGroupBuilder(p, self.renderer, self.group_size)
                for p in self.problems[start : start + self.groups_per_batch]]


def answer_datums(tokenizer, n: int = 2000, seed: int = 123, n_min: int = 2, alpha: float = 0.6, max_count: int = 100,
                  max_start: int = 1):
    """Right answers as cross-entropy Datums: the SFT warm-up's data. The default alpha is
    heavier-tailed than the RL dataset's, so long counts are seen often enough to be learnt."""
    renderer = get_renderer(tokenizer)
    return [reference_datum(renderer, p) for p in make_problems(n, seed, n_min, alpha, max_count, max_start)]


def eval_items(tokenizer, n: int = 100, seed: int = 999, **law):
    """Held-out (prompt, grader) pairs for rlpipe.evaluators.sampling_eval (exact answers)."""
    renderer = get_renderer(tokenizer)
    return [(problem_prompt(renderer, p), p.check_answer) for p in make_problems(n, seed, **law)]
