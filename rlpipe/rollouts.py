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
from typing import Awaitable, Callable, Protocol

import msgspec
import numpy as np

from rlpipe.env import Env, EnvGroupBuilder, group_rewards
from rlpipe.sampling.errors import EngineDeadError
from rlpipe.types import ModelInput, SampledSequence, SampleResponse, SamplingParams, Trajectory, TrajectoryGroup


class Sampler(Protocol):
    """What an episode samples its actions from: anything with SamplingClient's sample_async
    (a SamplingClient, the explorer's GroupClient, a scripted stand-in in a test)."""

    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams) -> SampleResponse: ...


class EpisodeError(RuntimeError):
    pass


async def do_episode(
    env: Env,
    get_sampler: Callable[[], Sampler],
    sampling_params: SamplingParams,
    max_turns: int = 16,
    max_context: int | None = None,
    start: tuple[Awaitable, Awaitable[SampledSequence] | None] | None = None,
) -> Trajectory:
    """Run one episode. get_sampler is called every turn, so a multi-turn episode picks up
    a new policy version between turns (each token records its own version).
    start: (the env's initial_observation() already under way, its first sampled turn or
    None), when do_group has started them (one request for the whole group, see there)."""
    observation, stop = await (start[0] if start else env.initial_observation())
    tokens = observation.to_ints()
    if not tokens:
        raise EpisodeError(f"{type(env).__name__}.initial_observation returned no tokens")
    mask, logprobs, versions = [0] * len(tokens), [0.0] * len(tokens), [-1] * len(tokens)
    reward, metrics, stop_reason = 0.0, {}, "max_turns"
    for turn in range(max_turns):
        params = turn_params(sampling_params, stop, len(tokens), max_context)
        if params is None:
            stop_reason = "context_limit"
            break
        if turn == 0 and start is not None and start[1] is not None:
            seq = await start[1]
        else:
            response = await get_sampler().sample_async(ModelInput.from_ints(tokens), 1, params)
            seq = response.sequences[0]
        if seq.logprobs is None or len(seq.logprobs) != len(seq.tokens):
            raise EpisodeError("the sampler returned no per-token logprobs")
        tokens += seq.tokens
        mask += [1] * len(seq.tokens)
        logprobs += seq.logprobs
        if seq.policy_versions is not None and len(seq.policy_versions) != len(seq.tokens):
            raise EpisodeError("the sampler returned per-token versions that do not match its tokens")
        versions += seq.token_versions()
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


def turn_params(sampling_params: SamplingParams, stop, context: int, max_context: int | None) -> SamplingParams | None:
    """A turn's sampling params after `context` tokens; None when the context is full."""
    params = msgspec.structs.replace(sampling_params, stop=stop or None)
    if max_context is not None:
        room = max_context - context
        if room < 1:
            return None
        params = msgspec.structs.replace(params, max_tokens=min(params.max_tokens or room, room))
    return params


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
    the failed group is returned with the error so that it is counted, never lost.
    Except a sampler whose engine died (EngineDeadError, raised): that is not the group's
    failure, and the caller can start the engine again and roll the builder out again.
    A cancelled or timed-out episode cancels its sampler request, which the engine aborts."""
    group_id = uuid.uuid4().hex
    started = time.time()
    shared = None
    try:
        envs = list(await asyncio.wait_for(builder.make_envs(), episode_timeout_s))
        if not envs:
            raise EpisodeError(f"{type(builder).__name__}.make_envs returned no envs")
        observations = [asyncio.ensure_future(env.initial_observation()) for env in envs]
        shared = await _shared_first_turn(observations, get_sampler, sampling_params, max_context)
        trajectories = await _all_or_nothing([
            asyncio.wait_for(do_episode(env, get_sampler, sampling_params, max_turns, max_context,
                                        start=(observation, _nth(shared, i) if shared else None)), episode_timeout_s)
            for i, (env, observation) in enumerate(zip(envs, observations))
        ])
        extra = await asyncio.wait_for(group_rewards(builder, trajectories), episode_timeout_s)
    except (asyncio.CancelledError, EngineDeadError):
        raise  # a dead sampling engine is not the group's failure: the caller restarts it and retries
    except asyncio.TimeoutError:
        return failed_group(group_id, explorer_id, started, f"timeout: an episode of {type(builder).__name__} "
                            f"took longer than {episode_timeout_s:.0f} s")
    except Exception as err:  # a user's env may raise anything; it is reported, not hidden
        where = traceback.extract_tb(err.__traceback__)[-1]
        return failed_group(group_id, explorer_id, started,
                            f"{type(err).__name__}: {err} (at {where.filename}:{where.lineno})")
    finally:
        if shared is not None and not shared.done():
            shared.cancel()  # the group failed or was cancelled: abort the request
    rewards = [t.reward + e for t, e in zip(trajectories, extra)]
    advantages = center_advantages(rewards, scale_by_std)
    trajectories = [
        msgspec.structs.replace(t, reward=r, advantage=a) for t, r, a in zip(trajectories, rewards, advantages)
    ]
    return TrajectoryGroup(group_id=group_id, trajectories=trajectories, explorer_id=explorer_id, created_at=started)


async def _shared_first_turn(observations: list[asyncio.Future], get_sampler, sampling_params: SamplingParams,
                             max_context: int | None) -> asyncio.Future | None:
    """When every env of a group starts from the same observation (a GRPO group: one prompt,
    many samples), their first turns go out as ONE request with num_samples = the group size:
    the same independent draws, one request's overhead instead of one per env (on the demo,
    per-request work was a fifth of the explorer's CPU). Only observations that are ready at
    once count: an env whose first observation waits on another (a game's second player)
    keeps its own turn, so nothing waits on anything new. Returns the request's task, or
    None to sample env by env."""
    await asyncio.sleep(0)  # let each initial_observation run until it finishes or waits
    if len(observations) < 2 or not all(o.done() and o.exception() is None for o in observations):
        return None
    (observation, stop) = observations[0].result()
    tokens = observation.to_ints()
    if not tokens or any(o.result()[0].to_ints() != tokens or o.result()[1] != stop for o in observations[1:]):
        return None
    params = turn_params(sampling_params, stop, len(tokens), max_context)
    if params is None:
        return None
    return asyncio.ensure_future(get_sampler().sample_async(observation, len(observations), params))


async def _nth(request: asyncio.Future, i: int) -> SampledSequence:
    # shield: an episode that is cancelled must not cancel its siblings' request (do_group does)
    response = await asyncio.shield(request)
    return response.sequences[i]


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
