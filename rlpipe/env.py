"""The user-facing RL contract: Env, StepResult, EnvGroupBuilder, dataset; and ProblemEnv,
the env of a single-turn question with a checkable answer.

Few abstractions, cookbook-style. An Env is used for one episode. Everything is
token-in/token-out: the policy sees token ids, the env receives the sampled token ids, and
what the env says next is appended to the token history as it is, never re-tokenized.

These are Protocols: an env is any object with these methods, no base class to inherit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from rlpipe.datums import supervised_datum
from rlpipe.renderers import Message, Renderer
from rlpipe.types import Datum, ModelInput, Trajectory

StopCondition = list[str] | list[int]
"""Stop strings or stop token ids for the next policy turn (EOS always stops)."""


@dataclass
class StepResult:
    reward: float
    """Reward for the action just taken; an episode's reward is the sum over its steps."""
    episode_done: bool
    next_observation: ModelInput = field(default_factory=ModelInput.empty)
    """Tokens appended to the history after the action (end of turn, tool output, the next
    assistant header, ...); the next policy turn sees history + action + these tokens."""
    next_stop_condition: StopCondition = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    """Numbers to log for this step; the episode's metrics are the last value of each key."""


@runtime_checkable
class Env(Protocol):
    async def initial_observation(self) -> tuple[ModelInput, StopCondition]:
        """The prompt tokens and the stop condition for the first policy turn."""
        ...

    async def step(self, action: list[int]) -> StepResult:
        """React to the sampled action tokens (the stop token included when one was hit)."""
        ...


@runtime_checkable
class EnvGroupBuilder(Protocol):
    """Makes the envs of one group: rollouts of the same problem whose rewards are compared
    (the advantage baseline), or the players of one game.

    Optionally it also has
        async def compute_group_rewards(self, trajectories: list[Trajectory]) -> list[float]
    returning one extra reward per trajectory, added to the per-step rewards: for pairwise
    preference judging, or zero-sum rewards when the group holds both sides of a game."""

    async def make_envs(self) -> Sequence[Env]: ...


class RLDataset(Protocol):
    """Yields group builders batch by batch; index wraps at the caller's discretion."""

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]: ...

    def __len__(self) -> int: ...


async def group_rewards(builder: EnvGroupBuilder, trajectories: list[Trajectory]) -> list[float]:
    compute = getattr(builder, "compute_group_rewards", None)
    if compute is None:
        return [0.0] * len(trajectories)
    rewards = list(await compute(trajectories))
    if len(rewards) != len(trajectories):
        raise ValueError(
            f"{type(builder).__name__}.compute_group_rewards returned {len(rewards)} rewards "
            f"for {len(trajectories)} trajectories"
        )
    return [float(r) for r in rewards]


# --------------------------------------------------------------------------- single-turn problems


class Problem(Protocol):
    """A question whose answer a program can check: what a ProblemEnv asks and grades.

    Optionally it also has
        def metrics(self, response: str) -> dict[str, float]
    returning more numbers to log for a response (besides "correct" and "format")."""

    question: str

    def check_answer(self, response: str) -> bool:
        """Whether the decoded response gives the right answer."""
        ...

    def check_format(self, response: str) -> bool:
        """Whether the response is in the form the task asks for (earns format_coef)."""
        ...

    def reference_answer(self) -> str:
        """A response that earns the full reward (e.g. the worked solution): SFT data."""
        ...


def problem_prompt(renderer: Renderer, problem: Problem, instruction: str = "",
                   convo_prefix: Sequence[Message] = ()) -> ModelInput:
    """What a ProblemEnv shows the policy: convo_prefix, then the question as a user message
    (the instruction, if any, on a line of its own after it), up to the assistant header."""
    content = f"{problem.question}\n{instruction}" if instruction else problem.question
    return renderer.build_generation_prompt([*convo_prefix, {"role": "user", "content": content}])


def reference_datum(renderer: Renderer, problem: Problem, instruction: str = "",
                    convo_prefix: Sequence[Message] = ()) -> Datum:
    """The reference answer and the end of turn after the problem's prompt, as a cross-entropy
    Datum (loss on the answer only): SFT warm-up data, or held-out data for an NLL eval."""
    stop = renderer.stop_sequences
    if not stop or not all(isinstance(s, int) for s in stop):
        raise ValueError(f"reference_datum needs a renderer whose turns end with a stop token "
                         f"(a chat template), not stop strings {stop!r}")
    answer = renderer.tokenizer(problem.reference_answer(), add_special_tokens=False)["input_ids"]
    return supervised_datum(problem_prompt(renderer, problem, instruction, convo_prefix).to_ints(), answer + stop[:1])


class ProblemEnv:
    """One question answered in one assistant turn, as tinker-cookbook's ProblemEnv, with the
    problem passed in rather than subclassed. Reward = 1 for a correct answer
    + format_coef for the expected form (the cookbook's subtracts format_coef for a bad form
    instead: the same advantages within a group); metrics "correct", "format" and the problem's own."""

    def __init__(self, problem: Problem, renderer: Renderer, format_coef: float = 0.1,
                 prompt: ModelInput | None = None):
        """prompt: the rendered prompt if the caller has it (a group renders it once);
        default problem_prompt(renderer, problem)."""
        self.problem, self.renderer, self.format_coef = problem, renderer, format_coef
        self.prompt = prompt if prompt is not None else problem_prompt(renderer, problem)

    async def initial_observation(self) -> tuple[ModelInput, StopCondition]:
        return self.prompt, list(self.renderer.stop_sequences)

    async def step(self, action: list[int]) -> StepResult:
        # Special tokens (the stop token, a stray role marker) are not part of the answer.
        text = self.renderer.tokenizer.decode(action, skip_special_tokens=True)
        correct, formatted = float(self.problem.check_answer(text)), float(self.problem.check_format(text))
        metrics = {"correct": correct, "format": formatted}
        extra = getattr(self.problem, "metrics", None)
        if extra is not None:
            metrics.update(extra(text))
        return StepResult(reward=correct + self.format_coef * formatted, episode_done=True, metrics=metrics)


@dataclass
class ProblemGroupBuilder:
    """group_size ProblemEnvs of one problem: their rewards are compared with each other."""

    problem: Problem
    renderer: Renderer
    group_size: int
    format_coef: float = 0.1
    instruction: str = ""
    """Added on its own line after the question (how to answer, say)."""
    convo_prefix: list[Message] = field(default_factory=list)
    """Messages before the question (a system prompt, few-shot examples)."""

    async def make_envs(self) -> list[ProblemEnv]:
        prompt = problem_prompt(self.renderer, self.problem, self.instruction, self.convo_prefix)  # once per group
        return [ProblemEnv(self.problem, self.renderer, self.format_coef, prompt) for _ in range(self.group_size)]
