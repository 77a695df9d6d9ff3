"""Try an Env without the pipeline: roll out one group against a sampler and show it.

    from rlpipe.pipeline.debug import debug_group
    trajectories = debug_group(builder)            # the embedded tiny model, local sampler

Each episode is printed as the learner would see it: the env's tokens (prompt, observations)
and the model's tokens, decoded without skipping special tokens, then its reward, advantage
and metrics. The rollout is the pipeline's own (rlpipe.rollouts.do_episode, the group rewards
of rlpipe.env, centred advantages), but an exception in the env reaches the caller with its
traceback instead of becoming a failed group.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import TextIO

import msgspec

from rlpipe.env import EnvGroupBuilder, group_rewards
from rlpipe.rollouts import Sampler, center_advantages, do_episode
from rlpipe.types import SamplingParams, Trajectory, TrajectoryGroup

__all__ = ["debug_group", "debug_group_async", "format_trajectory"]


def debug_group(builder: EnvGroupBuilder, model: str | None = None, **options) -> list[Trajectory]:
    """Roll out one group of `builder` and return its trajectories (reward = the episode's
    summed step rewards plus compute_group_rewards, if the builder has it; advantage = the
    reward minus the group's mean, as the pipeline computes it). With show, each episode's
    transcript, reward and metrics are printed, then whether the pipeline would train on the
    group. For a plain script; inside a running event loop (a notebook) use debug_group_async.

    model: a local Hugging Face model directory; None = the embedded tiny model.
    sampler: "local" (the torch sampler, starts in a second), "vllm" (the engine the pipeline
      uses where vLLM is installed; its start takes 25-45 s on a small CPU), "auto" (vLLM where
      installed), or a client with sample_async, e.g. a SamplingClient from
      TrainingClient.save_weights_and_get_sampling_client() (its base model is then `model`).
    adapter: a PEFT adapter directory to sample with, e.g. a run's checkpoint
      runs/<name>/learner/state/step-000015/adapter; None = the base model.
    max_tokens, temperature, max_turns: as explorer.max_tokens, temperature, max_turns.
    engine_options: passed to the engine when it starts (rlpipe.sampling.start_engine).
    The options and their defaults are debug_group_async's.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("debug_group was called inside a running event loop: use `await debug_group_async(...)`")
    return asyncio.run(debug_group_async(builder, model, **options))


async def debug_group_async(
    builder: EnvGroupBuilder,
    model: str | None = None,
    *,
    sampler: str | Sampler = "local",
    adapter: str | None = None,
    max_tokens: int = 32,
    temperature: float = 1.0,
    max_turns: int = 8,
    timeout_s: float = 300.0,
    scale_by_std: bool = False,
    show: bool = True,
    file: TextIO | None = None,
    **engine_options,
) -> list[Trajectory]:
    """debug_group, awaited (see there for the options)."""
    if model is None:
        model = getattr(sampler, "base_model", None) if not isinstance(sampler, str) else None
    if model is None:
        from rlpipe.testing.embedded import default_model_path

        model = str(default_model_path())
    engine = None
    if isinstance(sampler, str):
        from rlpipe.sampling import resolve_backend

        backend = resolve_backend(sampler)
        if adapter is not None and backend == "vllm":
            from rlpipe.sampling.vllm_args import lora_rank_for
            from rlpipe.training.checkpoint import adapter_rank

            engine_options.setdefault("max_lora_rank", lora_rank_for(adapter_rank(Path(adapter))))
        engine, client = await asyncio.to_thread(_start_client, str(model), backend, adapter, engine_options)
    else:
        if adapter is not None:
            raise ValueError("adapter= goes with a sampler name; a sampling client already has its weights")
        client = sampler
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        trajectories = await asyncio.wait_for(_roll_out(builder, client, params, max_turns, scale_by_std), timeout_s)
    finally:
        if engine is not None:
            engine.shutdown()
    if show:
        _show(trajectories, str(model), getattr(getattr(client, "engine", None), "vocab_size", None),
              file or sys.stdout)
    return trajectories


async def _roll_out(builder: EnvGroupBuilder, client: Sampler, params: SamplingParams, max_turns: int,
                    scale_by_std: bool) -> list[Trajectory]:
    # What rollouts.do_group does, minus its error capture: an env's exception is raised here.
    envs = list(await builder.make_envs())
    if not envs:
        raise ValueError(f"{type(builder).__name__}.make_envs returned no envs")
    trajectories = await asyncio.gather(*(do_episode(env, lambda: client, params, max_turns) for env in envs))
    extra = await group_rewards(builder, list(trajectories))
    rewards = [t.reward + e for t, e in zip(trajectories, extra)]
    advantages = center_advantages(rewards, scale_by_std)
    return [msgspec.structs.replace(t, reward=r, advantage=a) for t, r, a in zip(trajectories, rewards, advantages)]


def _start_client(model: str, backend: str, adapter: str | None, options: dict):
    from rlpipe.sampling import SamplingClient, start_engine

    engine = start_engine(model, backend, **options)
    try:
        loaded = engine.load_adapter(str(adapter), 0) if adapter is not None else None
    except BaseException:
        engine.shutdown()
        raise
    return engine, SamplingClient(engine, loaded, 0)


def format_trajectory(trajectory: Trajectory, tokenizer) -> str:
    """An episode as text: one line per run of env tokens ("env  |") or model tokens
    ("model|"), decoded with special tokens shown; continuation lines are indented."""
    lines, start = [], 0
    tokens, mask = trajectory.tokens, trajectory.action_mask
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or mask[i] != mask[start]:
            text = tokenizer.decode(tokens[start:i], skip_special_tokens=False)
            label = "model|" if mask[start] else "env  |"
            lines.append(f"  {label} " + text.replace("\n", "\n" + " " * 9))
            start = i
    return "\n".join(lines)


def _show(trajectories: list[Trajectory], model: str, vocab_size: int | None, out: TextIO) -> None:
    from transformers import AutoTokenizer

    from rlpipe.pipeline.validation import drop_reason

    tokenizer = AutoTokenizer.from_pretrained(model)
    for i, t in enumerate(trajectories):
        metrics = "  ".join(f"{k}={v:g}" for k, v in t.metrics.items())
        print(f"--- episode {i}: reward {t.reward:.3f}  advantage {t.advantage:+.3f}  stop {t.stop_reason}", file=out)
        print(format_trajectory(t, tokenizer), file=out)
        print(f"  metrics: {metrics}", file=out)
    rewards = [t.reward for t in trajectories]
    print(f"group: {len(rewards)} episodes, rewards {' '.join(f'{r:.3f}' for r in rewards)}, "
          f"mean {sum(rewards) / len(rewards):.3f}", file=out)
    if vocab_size is None:
        from rlpipe.pipeline.config import vocab_size as read_vocab_size

        vocab_size = read_vocab_size(model)
    group = TrajectoryGroup(group_id=uuid.uuid4().hex, trajectories=trajectories)
    reason, detail = drop_reason(group, vocab_size, drop_no_signal=True)
    if reason is None:
        print("the pipeline would train on this group", file=out)
    elif reason == "no_signal":
        print("every reward is the same: the buffer drops such a group (no_signal: its advantages are all 0) "
              "unless buffer.drop_constant_reward_groups = false", file=out)
    else:
        print(f"the buffer would drop this group ({reason}): {detail}", file=out)
    out.flush()
