"""Evaluators: numbers on held-out data, as metric dicts the learner logs every eval_every steps.

    items = [(renderer.build_generation_prompt([{"role": "user", "content": p.question}]),
              lambda text, p=p: grade(text, p.answer)[1]["correct"] == 1.0) for p in problems]
    metrics = await sampling_eval(sampling_client, items, SamplingParams(max_tokens=16, temperature=0.0),
                                  decode=lambda tokens: renderer.parse_response(tokens)[0]["content"])
    metrics |= nll_eval(training_client, held_out_datums)

Both are plain functions of their inputs: no state, no registry, nothing to subclass.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

from rlpipe.types import Datum, ModelInput, SamplingParams

Grader = Callable[[str], bool]
EvalItem = tuple[ModelInput, Grader]


async def sampling_eval(
    sampling_client,
    items: Sequence[EvalItem],
    sampling_params: SamplingParams,
    *,
    decode: Callable[[list[int]], str],
    num_samples: int = 1,
    prefix: str = "eval/",
) -> dict[str, float]:
    """Accuracy on held-out problems: each prompt is sampled num_samples times, decode turns
    a sampled token list into text (e.g. the renderer's parsed content) and the item's grader
    says whether it is right. All requests go out at once, so the sampler can batch them.

    Returns {prefix+"accuracy": correct / graded, prefix+"n": graded samples}."""
    if not items:
        raise ValueError("sampling_eval needs at least one (prompt, grader) item")
    responses = await asyncio.gather(
        *(sampling_client.sample_async(prompt, num_samples, sampling_params) for prompt, _ in items)
    )
    graded = [bool(grader(decode(seq.tokens))) for (_, grader), r in zip(items, responses) for seq in r.sequences]
    return {f"{prefix}accuracy": sum(graded) / len(graded), f"{prefix}n": float(len(graded))}


def run_sampling_eval(sampling_client, items: Sequence[EvalItem], sampling_params: SamplingParams,
                      **kwargs) -> dict[str, float]:
    """sampling_eval for synchronous code (it must not be called from a running event loop)."""
    return asyncio.run(sampling_eval(sampling_client, items, sampling_params, **kwargs))


def _nll_metrics(data: Sequence[Datum], loss_sum: float, prefix: str) -> dict[str, float]:
    tokens = float(sum(d.loss_fn_inputs["weights"].to_numpy().sum() for d in data))
    if tokens <= 0:
        raise ValueError("the held-out data has no token with weight > 0: nothing to measure")
    return {f"{prefix}nll": loss_sum / tokens, f"{prefix}tokens": tokens}


def nll_eval(training_client, data: Sequence[Datum], *, prefix: str = "eval/") -> dict[str, float]:
    """Per-token NLL of held-out cross-entropy Datums under the training client's current
    weights: the weighted sum of -logprob over the weighted token count (no gradient).

    Returns {prefix+"nll": NLL per weighted token, prefix+"tokens": that token count}."""
    out = training_client.forward(list(data), "cross_entropy").result()
    return _nll_metrics(data, out.metrics["loss:sum"], prefix)


async def nll_eval_async(training_client, data: Sequence[Datum], *, prefix: str = "eval/") -> dict[str, float]:
    """nll_eval for async code: waits on the forward call without blocking the event loop."""
    out = await training_client.forward(list(data), "cross_entropy")
    return _nll_metrics(data, out.metrics["loss:sum"], prefix)



def greedy_eval(base_model: str, adapter: str | None, items: Sequence[EvalItem], tokenizer, *,
                max_tokens: int, backend: str = "auto", policy_version: int = 0, **engine_options) -> dict[str, float]:
    """Greedy accuracy of base_model + the PEFT adapter at `adapter` on (prompt, grader) items,
    graded on the decoded text: what the learner runs every eval_every steps, and what the
    demo and recipes report before and after RL. engine_options go to the sampling engine
    when it starts (e.g. device="cpu" for the local backend)."""
    from rlpipe.sampling import create_sampling_client

    sampler = create_sampling_client(base_model, model_path=adapter, backend=None if backend == "auto" else backend,
                                     policy_version=policy_version, **engine_options)
    return run_sampling_eval(sampler, items, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                             decode=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))


async def rollout_eval(sampling_client, builders: Sequence, sampling_params: SamplingParams, *,
                       max_turns: int = 16, max_context: int | None = None, episode_timeout_s: float = 3600.0,
                       prefix: str = "eval/") -> dict[str, float]:
    """Mean reward and mean env metrics over full episodes: every builder's group is run with
    the sampler, as the explorer would (multi-turn envs, games, compute_group_rewards), but
    nothing is trained. For tasks whose score is not one graded answer: tool use, self-play.

    Every episode starts at once and waits behind the others in the sampler, so the timeout
    only guards against a hang: a tight one on a loaded machine would fail the slow (long,
    well-formed) episodes and leave the quick failures to be averaged.

    Returns {prefix+"reward": mean episode reward, prefix+<metric>: mean of each env metric,
    prefix+"episodes": episodes measured, prefix+"failed_groups": groups that failed}."""
    from rlpipe.rollouts import do_group

    if not builders:
        raise ValueError("rollout_eval needs at least one group builder")
    groups = await asyncio.gather(*(
        do_group(b, lambda: sampling_client, sampling_params, max_turns=max_turns, max_context=max_context,
                 episode_timeout_s=episode_timeout_s) for b in builders))
    trajectories = [t for g in groups if not g.failed for t in g.trajectories]
    out = {f"{prefix}episodes": float(len(trajectories)), f"{prefix}failed_groups": float(sum(g.failed for g in groups))}
    if not trajectories:
        errors = "; ".join(g.error for g in groups if g.failed)[:500]
        raise RuntimeError(f"rollout_eval: every group failed ({errors})")
    out[f"{prefix}reward"] = sum(t.reward for t in trajectories) / len(trajectories)
    for key in sorted({k for t in trajectories for k in t.metrics}):
        values = [t.metrics[key] for t in trajectories if key in t.metrics]
        out[f"{prefix}{key}"] = sum(values) / len(values)
    return out


def run_rollout_eval(base_model: str, adapter: str | None, builders: Sequence, sampling_params: SamplingParams, *,
                     backend: str = "auto", **kwargs) -> dict[str, float]:
    """rollout_eval of base_model + the PEFT adapter at `adapter` (None: the base), from
    synchronous code: what the tool-use and self-play recipes report before and after RL."""
    from rlpipe.sampling import create_sampling_client

    sampler = create_sampling_client(base_model, model_path=adapter, backend=None if backend == "auto" else backend)
    return asyncio.run(rollout_eval(sampler, builders, sampling_params, **kwargs))
