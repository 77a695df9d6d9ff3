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
                max_tokens: int, backend: str = "auto", policy_version: int = 0) -> dict[str, float]:
    """Greedy accuracy of base_model + the PEFT adapter at `adapter` on (prompt, grader) items,
    graded on the decoded text: what the learner runs every eval_every steps, and what the
    demo and recipes report before and after RL."""
    from rlpipe.sampling import create_sampling_client

    sampler = create_sampling_client(base_model, model_path=adapter, backend=None if backend == "auto" else backend,
                                     policy_version=policy_version)
    return run_sampling_eval(sampler, items, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                             decode=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))
