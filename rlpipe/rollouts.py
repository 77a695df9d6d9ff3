"""One episode, one group: the core loop between a sampler and envs.

The token history is built only by appending: observation tokens from the env and action
tokens exactly as sampled, each action token with its sampling logprob and the policy
version that produced it. The learner later trains on exactly these tokens.
"""

from __future__ import annotations

import asyncio
import time
import traceback
import uuid
from typing import Callable, Protocol

import msgspec
import numpy as np

from rlpipe.env import Env, EnvGroupBuilder, group_rewards
from rlpipe.types import ModelInput, SampleResponse, SamplingParams, Trajectory, TrajectoryGroup


class Sampler(Protocol):
    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams) -> SampleResponse: ...


class EpisodeError(RuntimeError):
    pass


async def do_episode(
    env: Env,
    get_sampler: Callable[[], Sampler],
    sampling_params: SamplingParams,
    max_turns: int = 16,
    max_context: int | None = None,
) -> Trajectory:
    """Run one episode. get_sampler is called every turn, so a multi-turn episode picks up
    a new policy version between turns (each token records its own version)."""
    observation, stop = await env.initial_observation()
    tokens = observation.to_ints()
    if not tokens:
        raise EpisodeError(f"{type(env).__name__}.initial_observation returned no tokens")
    mask, logprobs, versions = [0] * len(tokens), [0.0] * len(tokens), [-1] * len(tokens)
    reward, metrics, stop_reason = 0.0, {}, "max_turns"
    for turn in range(max_turns):
        params = msgspec.structs.replace(sampling_params, stop=stop or None)
        if max_context is not None:
            room = max_context - len(tokens)
            if room < 1:
                stop_reason = "context_limit"
                break
            params = msgspec.structs.replace(params, max_tokens=min(params.max_tokens or room, room))
        response = await get_sampler().sample_async(ModelInput.from_ints(tokens), 1, params)
        seq = response.sequences[0]
        if seq.logprobs is None or len(seq.logprobs) != len(seq.tokens):
            raise EpisodeError("the sampler returned no per-token logprobs")
        tokens += seq.tokens
        mask += [1] * len(seq.tokens)
        logprobs += seq.logprobs
        versions += [seq.policy_version] * len(seq.tokens)
        result = await env.step(list(seq.tokens))
        reward += float(result.reward)
        metrics.update(result.metrics)
        if result.episode_done:
            stop_reason = seq.stop_reason
            break
        appended = result.next_observation.to_ints()
        tokens += appended
        mask += [0] * len(appended)
        logprobs += [0.0] * len(appended)
        versions += [-1] * len(appended)
        stop = result.next_stop_condition
    metrics = {**metrics, "turns": float(turn + 1), "action_tokens": float(sum(mask))}
    return Trajectory(
        tokens=tokens, action_mask=mask, sampling_logprobs=logprobs, policy_versions=versions,
        reward=reward, stop_reason=stop_reason, metrics=metrics,
    )


def center_advantages(rewards: list[float], scale_by_std: bool = False, eps: float = 1e-6) -> list[float]:
    """Group-centred advantages (the group mean is the baseline), optionally divided by std."""
    r = np.asarray(rewards, dtype=np.float64)
    adv = r - r.mean()
    if scale_by_std:
        adv = adv / (r.std() + eps)
    return adv.tolist()


async def do_group(
    builder: EnvGroupBuilder,
    get_sampler: Callable[[], Sampler],
    sampling_params: SamplingParams,
    *,
    episode_timeout_s: float = 300.0,
    scale_by_std: bool = False,
    max_turns: int = 16,
    max_context: int | None = None,
    explorer_id: str = "",
) -> TrajectoryGroup:
    """Run every env of the group concurrently. Any failure (exception or timeout, in the
    env or the sampler) fails the whole group, because its advantages need every member;
    the failed group is returned with the error so that it is counted, never lost."""
    group_id = uuid.uuid4().hex
    started = time.time()
    try:
        envs = list(await asyncio.wait_for(builder.make_envs(), episode_timeout_s))
        if not envs:
            raise EpisodeError(f"{type(builder).__name__}.make_envs returned no envs")
        trajectories = await _all_or_nothing([
            asyncio.wait_for(do_episode(env, get_sampler, sampling_params, max_turns, max_context), episode_timeout_s)
            for env in envs
        ])
        extra = await asyncio.wait_for(group_rewards(builder, trajectories), episode_timeout_s)
    except asyncio.CancelledError:
        raise
    except asyncio.TimeoutError:
        return failed_group(group_id, explorer_id, started, f"timeout: an episode of {type(builder).__name__} "
                            f"took longer than {episode_timeout_s:.0f} s")
    except Exception as err:  # a user's env may raise anything; it is reported, not hidden
        where = traceback.extract_tb(err.__traceback__)[-1]
        return failed_group(group_id, explorer_id, started,
                            f"{type(err).__name__}: {err} (at {where.filename}:{where.lineno})")
    rewards = [t.reward + e for t, e in zip(trajectories, extra)]
    advantages = center_advantages(rewards, scale_by_std)
    trajectories = [
        msgspec.structs.replace(t, reward=r, advantage=a) for t, r, a in zip(trajectories, rewards, advantages)
    ]
    return TrajectoryGroup(group_id=group_id, trajectories=trajectories, explorer_id=explorer_id, created_at=started)


async def _all_or_nothing(coros) -> list:
    """Like gather, but the first failure cancels the rest (a game whose other player died
    should not wait out its timeout)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


def failed_group(group_id: str, explorer_id: str, started: float, error: str) -> TrajectoryGroup:
    return TrajectoryGroup(group_id=group_id, trajectories=[], explorer_id=explorer_id,
                           failed=True, error=error[:2000], created_at=started)
