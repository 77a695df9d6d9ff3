"""Arithmetic: "What is a + b?" answered in one assistant turn.

Reward = 1 for the right final number, plus a small format term (0.1) for answering in the
"a + b = c" form the SFT warm-up teaches. Problems are generated, so any number of
held-out problems exists; `difficulty` widens the operand range and the operators.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlpipe.types import ModelInput
from rlpipe.env import StepResult

DIFFICULTY = {1: (9, "+"), 2: (20, "+-"), 3: (99, "+-"), 4: (99, "+-*")}
FORMAT_BONUS = 0.1
ANSWER_FORM = re.compile(r"^\s*-?\d+\s*[-+*]\s*-?\d+\s*=\s*(-?\d+)\s*$")
LAST_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
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


def make_problems(n: int, difficulty: int = 2, seed: int = 0) -> list[Problem]:
    if difficulty not in DIFFICULTY:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY)}, got {difficulty}")
    high, ops = DIFFICULTY[difficulty]
    rng = random.Random(seed)
    return [Problem(rng.randint(0, high), rng.choice(ops), rng.randint(0, high)) for _ in range(n)]


def grade(text: str, answer: int) -> tuple[float, dict[str, float]]:
    """(reward, metrics) for a decoded answer."""
    form = ANSWER_FORM.match(text)
    numbers = LAST_NUMBER.findall(text)
    given = int(form.group(1)) if form else (int(numbers[-1]) if numbers else None)
    correct = float(given == answer)
    formatted = float(form is not None)
    return correct + FORMAT_BONUS * formatted, {"correct": correct, "format": formatted}


def prompt_tokens(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class ArithmeticEnv:
    def __init__(self, problem: Problem, tokenizer, prompt: list[int] | None = None):
        """prompt: the problem's prompt tokens, if the caller has them (a group renders it once)."""
        self.problem = problem
        self.tokenizer = tokenizer
        self.prompt = prompt if prompt is not None else prompt_tokens(tokenizer, problem.question)

    async def initial_observation(self):
        return ModelInput.from_ints(self.prompt), [self.tokenizer.eos_token_id]

    async def step(self, action: list[int]) -> StepResult:
        text = self.tokenizer.decode(action, skip_special_tokens=True)
        reward, metrics = grade(text, self.problem.answer)
        return StepResult(reward=reward, episode_done=True, metrics=metrics)


@dataclass
class ArithmeticGroupBuilder:
    problem: Problem
    tokenizer: object
    group_size: int

    async def make_envs(self):
        prompt = prompt_tokens(self.tokenizer, self.problem.question)  # one chat-template render per group
        return [ArithmeticEnv(self.problem, self.tokenizer, prompt) for _ in range(self.group_size)]


class ArithmeticDataset:
    """groups_per_batch problems per batch, each rolled out group_size times."""

    def __init__(self, tokenizer, groups_per_batch: int = 8, group_size: int = 8, difficulty: int = 2,
                 n_problems: int = 10_000, seed: int = 0):
        self.tokenizer = tokenizer
        self.groups_per_batch = groups_per_batch
        self.group_size = group_size
        self.problems = make_problems(n_problems, difficulty, seed)

    def __len__(self) -> int:
        return len(self.problems) // self.groups_per_batch

    def get_batch(self, index: int) -> list[ArithmeticGroupBuilder]:
        start = (index % len(self)) * self.groups_per_batch
        return [ArithmeticGroupBuilder(p, self.tokenizer, self.group_size)
                for p in self.problems[start : start + self.groups_per_batch]]


def eval_items(tokenizer, n: int = 200, difficulty: int = 2, seed: int = 999):
    """Held-out (prompt, grader) pairs for rlpipe.evaluators.sampling_eval; the seed is one
    the training datasets do not use."""
    items = []
    for p in make_problems(n, difficulty, seed):
        grader = lambda text, answer=p.answer: grade(text, answer)[1]["correct"] == 1.0  # noqa: E731
        items.append((ModelInput.from_ints(prompt_tokens(tokenizer, p.question)), grader))
    return items


def answer_datums(tokenizer, n: int = 200, difficulty: int = 2, seed: int = 999):
    """Right answers in the expected form as cross-entropy Datums (loss on the answer and its
    end of turn only): SFT warm-up data, or with a held-out seed the data of
    rlpipe.evaluators.nll_eval (dataset.nll_eval_factory = "envs.arithmetic:answer_datums")."""
    from rlpipe.datums import supervised_datum

    eos = [tokenizer.eos_token_id]
    return [supervised_datum(prompt_tokens(tokenizer, p.question),
                             tokenizer(p.solution(), add_special_tokens=False)["input_ids"] + eos)
            for p in make_problems(n, difficulty, seed)]
