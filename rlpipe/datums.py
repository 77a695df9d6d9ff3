"""Token sequences and trajectories -> Datums, the one place where inputs get shifted; and a
batch of trajectory groups as it is trained: datums (token-in/token-out, with advantages
normalised per action token), mini-batches of whole groups, their merged metrics, and the
batch's own figures (rewards, staleness, env metrics). The reference loop (rlpipe/loop.py),
the pipeline's learner and the recipes all use these."""

from __future__ import annotations

from collections import Counter

import numpy as np

from rlpipe.metrics import mean_of
from rlpipe.types import AdamParams, Datum, ModelInput, Trajectory, TrajectoryGroup


def datum_from_tokens_weights(tokens: list[int], weights: list[float] | np.ndarray) -> Datum:
    """A cross-entropy Datum: predict tokens[1:] from tokens[:-1]; weights[i] is the
    weight of predicting tokens[i] (so weights[0], the first token, is never trained)."""
    weights = np.asarray(weights, dtype=np.float32)
    if len(tokens) < 2 or len(weights) != len(tokens):
        raise ValueError(f"need >= 2 tokens and one weight per token, got {len(tokens)} tokens, {len(weights)} weights")
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], dtype=np.int64), "weights": weights[1:]},
    )


def supervised_datum(prompt: list[int], completion: list[int]) -> Datum:
    """Train on the completion only."""
    return datum_from_tokens_weights(prompt + completion, [0.0] * len(prompt) + [1.0] * len(completion))

TRUNCATED = ("length", "context_limit")
"""Trajectory.stop_reason of an episode cut short by a length limit (rlpipe.rollouts): the
sampler hit max_tokens, or the context had no room left for another turn."""
OVERLONG = ("keep", "drop", "zero_advantage")


def is_truncated(t: Trajectory) -> bool:
    return t.stop_reason in TRUNCATED


def group_datums(groups: list[TrajectoryGroup], overlong: str = "keep", kl_weights: bool = False) -> list[Datum]:
    """One Datum per trajectory, trained on exactly the sampled tokens. Advantages are spread
    over action tokens and divided by the batch's action-token count: the summed loss is then
    a per-token mean, so the step size does not grow with response length or batch size.

    overlong (learner.overlong) says what truncated trajectories become: "keep" as they are,
    "drop" nothing (left out of the datums and of the action-token count; no trajectory left
    gives no datum), "zero_advantage" datums with advantage 0 (still counted).
    kl_weights: also give each datum the input "kl_weights" = action mask / the same count, so
    that a KL penalty (loss config kl_coef) is a per-token mean as well."""
    if overlong not in OVERLONG:
        raise ValueError(f"unknown overlong mode {overlong!r}; choose one of {OVERLONG}")
    trajectories = [t for g in groups for t in g.trajectories if not (overlong == "drop" and is_truncated(t))]
    n_action = max(1, sum(sum(t.action_mask[1:]) for t in trajectories))
    data = []
    for t in trajectories:
        mask = np.asarray(t.action_mask[1:], dtype=np.float32)
        advantage = 0.0 if overlong == "zero_advantage" and is_truncated(t) else t.advantage
        inputs = {
            "target_tokens": np.asarray(t.tokens[1:], dtype=np.int64),
            "logprobs": np.asarray(t.sampling_logprobs[1:], dtype=np.float32),
            "advantages": mask * np.float32(advantage / n_action),
            "weights": mask,
        }
        if kl_weights:
            inputs["kl_weights"] = mask * np.float32(1.0 / n_action)
        data.append(Datum(model_input=ModelInput.from_ints(t.tokens[:-1]), loss_fn_inputs=inputs))
    return data


def split_groups(groups: list[TrajectoryGroup], k: int) -> list[list[TrajectoryGroup]]:
    """The batch as k mini-batches of whole groups (a group's advantages are relative to one
    another), in order, their sizes differing by at most one group."""
    if not 1 <= k <= len(groups):
        raise ValueError(f"cannot split {len(groups)} groups into {k} mini-batches of whole groups")
    sizes = [len(groups) // k + (i < len(groups) % k) for i in range(k)]
    ends = np.cumsum(sizes).tolist()
    return [groups[end - size : end] for size, end in zip(sizes, ends)]


def merge_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """One record from the mini-batches' metrics, by the aggregate each Tinker-style name ends
    with: ":sum" adds up (but "loss:sum", a per-token mean of each mini-batch, is averaged), ":min"
    and ":max" take the extreme, ":mean" is the mean over all the
    mini-batches' counted tokens (weighted by their "tokens:sum"; equal weights without it)."""
    out: dict[str, float] = {}
    tokens = [r.get("tokens:sum", 1.0) for r in records]
    for key in dict.fromkeys(k for r in records for k in r):
        present = [(r[key], n) for r, n in zip(records, tokens) if key in r]
        values = [v for v, _ in present]
        if key == "loss:sum":  # each mini-batch's loss is already a per-token mean: their mean is the batch's
            out[key] = float(np.mean(values))
        elif key.endswith(":sum"):
            out[key] = float(sum(values))
        elif key.endswith(":min"):
            out[key] = float(min(values))
        elif key.endswith(":max"):
            out[key] = float(max(values))
        elif key.endswith(":mean"):
            total = sum(n for _, n in present)
            out[key] = float(sum(v * n for v, n in present) / total) if total else float(np.mean(values))
        else:
            out[key] = values[-1]
    return out


def submit_minibatches(client, minibatches: list[list[Datum]], loss_fn: str, loss_config: dict, adam: AdamParams) -> list:
    """forward_backward + optim_step on each non-empty mini-batch in turn, so each one is scored
    by the policy the ones before it moved (PPO-style). All calls are issued at once (the
    client runs them in order); minibatch_metrics waits for them."""
    return [(client.forward_backward(data, loss_fn, loss_config), client.optim_step(adam)) for data in minibatches if data]


def minibatch_metrics(calls: list) -> dict[str, float]:
    """The merged metrics of submit_minibatches' calls and "optim/updates", the optimizer steps
    taken (0 when nothing was left to train)."""
    record = merge_metrics([fb.result().metrics for fb, _ in calls])
    record.update(merge_metrics([opt.result().metrics for _, opt in calls]))
    record["optim/updates"] = float(len(calls))
    return record


def batch_metrics(groups: list[TrajectoryGroup], step: int) -> dict[str, float]:
    trajectories = [t for g in groups for t in g.trajectories]
    rewards = np.array([t.reward for t in trajectories])
    staleness = Counter(step - min(v for v in t.policy_versions if v >= 0) for t in trajectories)
    # Per-token lag (docs/pipeline.md, "Staleness"): the buffer bounds each group's token-weighted
    # mean lag (its floor: group_max <= max_staleness); mean is over every action token of the
    # batch, max (above) is the oldest token's.
    lag_sum = lag_count = 0
    group_lags = []
    for g in groups:
        acted = [v for t in g.trajectories for v, m in zip(t.policy_versions, t.action_mask) if m and v >= 0]
        if acted:
            lag_sum += step * len(acted) - sum(acted)
            lag_count += len(acted)
            group_lags.append(step - sum(acted) // len(acted))
    out = {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
        "groups": len(groups), "trajectories": len(trajectories),
        "tokens/sampled": float(sum(sum(t.action_mask) for t in trajectories)),
        "tokens/trained": float(sum(len(t.tokens) - 1 for t in trajectories)),
        **{f"staleness/{k}": float(n) for k, n in sorted(staleness.items())},
        "staleness/max": float(max(staleness)),
        "staleness/mean": lag_sum / lag_count if lag_count else 0.0,
        "staleness/group_max": float(max(group_lags, default=0)),
    }
    keys = {k for t in trajectories for k in t.metrics}
    out.update({f"env/{k}": mean_of(t.metrics.get(k) for t in trajectories) for k in sorted(keys)})
    stats = [g.explorer_stats for g in groups if g.explorer_stats]
    if stats:
        out.update({f"explorer/{k}": v for k, v in stats[-1].items()})
    return out
