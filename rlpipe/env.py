"""The user-facing RL contract: Env, StepResult, EnvGroupBuilder, dataset.

Few abstractions, cookbook-style. An Env is used for one episode. Everything is
token-in/token-out: the policy sees token ids, the env receives the sampled token ids, and
what the env says next is appended to the token history as it is, never re-tokenized.

These are Protocols: an env is any object with these methods, no base class to inherit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from rlpipe.types import ModelInput, Trajectory

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
