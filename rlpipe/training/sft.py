"""Supervised training on random mini-batches: the loop of the SFT recipes, the reward model of
examples/rlhf.py and the pipeline's SFT warm-up.

    metrics = sft_steps(client, data, steps=40, batch_size=32, adam_params=AdamParams(learning_rate=1e-4), seed=0)

Each step issues forward_backward and optim_step back to back (the client runs them in order)
and then waits for both: an error in either, a bad datum say, raises here instead of being
lost in a future nobody reads. `minibatches` and `train_step` are the two halves, for loops
that do something between steps (evaluate, rescale a batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from rlpipe.types import AdamParams, Datum

LossFn = str | Callable
"""A built-in loss name for forward_backward, or a custom loss fn(data, logprobs) -> (loss,
metrics) for forward_backward_custom."""


def minibatches(data: list[Datum], steps: int, batch_size: int, seed: int, group: int = 1) -> Iterator[list[Datum]]:
    """`steps` batches of batch_size items each, drawn without replacement within a batch from
    np.random.default_rng(seed) (a batch larger than the data is the whole data in random
    order). group > 1 keeps each run of `group` consecutive data together (a chosen/rejected
    pair, say): batch_size then counts runs, and a batch holds batch_size * group data."""
    if steps < 0 or batch_size < 1 or group < 1:
        raise ValueError(f"need steps >= 0, batch_size >= 1 and group >= 1, got {steps}, {batch_size} and {group}")
    runs = len(data) // group
    if runs == 0:
        raise ValueError(f"no data to train on: {len(data)} data" + (f" in runs of {group}" if group > 1 else ""))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        picks = rng.choice(runs, min(batch_size, runs), replace=False)
        yield [data[group * i + k] for i in picks for k in range(group)]


def train_step(client, batch: list[Datum], adam_params: AdamParams, loss_fn: LossFn = "cross_entropy",
               loss_fn_config: dict | None = None) -> dict[str, float]:
    """One forward_backward (forward_backward_custom for a callable loss) and one optim_step,
    both awaited (each future's result() has the client's call timeout). Returns the
    forward_backward metrics and the optim_step's ("grad_norm:mean")."""
    if callable(loss_fn):
        fwd_bwd = client.forward_backward_custom(batch, loss_fn)
    else:
        fwd_bwd = client.forward_backward(batch, loss_fn, loss_fn_config)
    optim = client.optim_step(adam_params)
    metrics = dict(fwd_bwd.result().metrics)
    metrics.update(optim.result().metrics or {})  # the Tinker SDK's may be None
    return metrics


def sft_steps(client, data: list[Datum], steps: int, batch_size: int, adam_params: AdamParams, seed: int,
              loss_fn: LossFn = "cross_entropy", group: int = 1) -> list[dict[str, float]]:
    """`steps` train_steps on minibatches(data, steps, batch_size, seed, group); the metrics of each."""
    return [train_step(client, batch, adam_params, loss_fn) for batch in minibatches(data, steps, batch_size, seed, group)]
