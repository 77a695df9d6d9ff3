"""Arithmetic: "What is a + b?" answered in one assistant turn.

Reward = 1 for the right final number, plus a small format term (0.1) for answering in the
"a + b = c" form the SFT warm-up teaches. Problems are generated, so any number of
held-out problems exists; `difficulty` widens the operand range and the operators.
Each problem is a rlpipe.env.ProblemEnv (one assistant turn, prompt rendered by the renderer).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlpipe.env import ProblemGroupBuilder, problem_prompt, reference_datum
from rlpipe.renderers import get_renderer

DIFFICULTY = {1: (9, "+"), 2: (20, "+-"), 3: (99, "+-"), 4: (99, "+-*")}
FORMAT_BONUS = 0.1
ANSWER_FORM = re.compile(r"^\s*-?\d+\s*[-+*]\s*-?\d+\s*=\s*(-?\d+)\s*$")
LAST_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    """An arithmetic question; the rlpipe.env.Problem a ProblemEnv asks and grades."""

    a: int
    op: str
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    def solution(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.answer}"

    def check_answer(self, response: str) -> bool:
        return read_answer(response)[0] == self.answer

    def check_format(self, response: str) -> bool:
        return read_answer(response)[1]

    def reference_answer(self) -> str:
        return self.solution()


def make_problems(n: int, difficulty: int = 2, seed: int = 0) -> list[Problem]:
    if difficulty not in DIFFICULTY:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY)}, got {difficulty}")
    high, ops = DIFFICULTY[difficulty]
    rng = random.Random(seed)
    return [Problem(rng.randint(0, high), rng.choice(ops), rng.randint(0, high)) for _ in range(n)]


def read_answer(text: str) -> tuple[int | None, bool]:
    """(the number a decoded answer gives, whether it is in the "a + b = c" form): the result
    of the form if it is one, else the last number in the text."""
    form = ANSWER_FORM.match(text)
    numbers = LAST_NUMBER.findall(text)
    return (int(form.group(1)) if form else (int(numbers[-1]) if numbers else None)), form is not None


def grade(text: str, answer: int) -> tuple[float, dict[str, float]]:
    """(reward, metrics) for a decoded answer, as the env gives them; for graders that hold
    the answer alone (evaluators, benchmarks)."""
    given, formatted = read_answer(text)
    correct = float(given == answer)
    return correct + FORMAT_BONUS * float(formatted), {"correct": correct, "format": float(formatted)}


class ArithmeticDataset:
    """groups_per_batch problems per batch, each rolled out group_size times."""

    def __init__(self, tokenizer, groups_per_batch: int = 8, group_size: int = 8, difficulty: int = 2,
                 n_problems: int = 10_000, seed: int = 0):
        self.renderer = get_renderer(tokenizer)
        self.groups_per_batch = groups_per_batch
        self.group_size = group_size
        self.problems = make_problems(n_problems, difficulty, seed)

    def __len__(self) -> int:
        return len(self.problems) // self.groups_per_batch

    def get_batch(self, index: int) -> list[ProblemGroupBuilder]:
        start = (index % len(self)) * self.groups_per_batch
        return [ProblemGroupBuilder(p, self.renderer, self.group_size, FORMAT_BONUS)
                for p in self.problems[start : start + self.groups_per_batch]]


def eval_items(tokenizer, n: int = 200, difficulty: int = 2, seed: int = 999):
    """Held-out (prompt, grader) pairs for rlpipe.evaluators.sampling_eval; the seed is one
    the training datasets do not use."""
    renderer = get_renderer(tokenizer)
    return [(problem_prompt(renderer, p), p.check_answer) for p in make_problems(n, difficulty, seed)]


def answer_datums(tokenizer, n: int = 200, difficulty: int = 2, seed: int = 999):
    """Right answers in the expected form as cross-entropy Datums (loss on the answer and its
    end of turn only): SFT warm-up data, or with a held-out seed the data of
    rlpipe.evaluators.nll_eval (dataset.nll_eval_factory = "envs.arithmetic:answer_datums")."""
    renderer = get_renderer(tokenizer)
    return [reference_datum(renderer, p) for p in make_problems(n, difficulty, seed)]
