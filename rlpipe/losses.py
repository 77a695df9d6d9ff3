"""Token-level training losses in Tinker's vocabulary.

Every loss is a SUM over tokens, never a mean: the caller concatenates many datums into
one T, and a mean here would silently reweight datums by their length. Normalisation is
the caller's job, through `weights` and `advantages`.

Notation: lp = learner logprobs (carry the gradient), sampling_lp = the sampler's recorded
logprobs (`inputs["logprobs"]`), r = exp(lp - sampling_lp), A = advantages.

    cross_entropy        -sum w * lp            (any real w, negative too)
    importance_sampling  -sum w * r * A
    ppo                  -sum w * min(r * A, clip(r, lo, hi) * A)
    cispo                -sum w * sg(clip(r, lo, hi)) * lp * A
    dro                  -sum w * (lp * A - beta/2 * (lp - sampling_lp)^2)
    stable_reinforce     -sum w * sg(min(r, ratio_cap)) * lp * A  +  kl_coeff * sum w * k3(sampling_lp - lp)

stable_reinforce is Tinker 0.38's name; Tinker publishes no formula for it (its docs say only:
a REINFORCE variant that stays stable off-policy, trained on what the sampler recorded for each
sequence, config key `kl_coeff`). rlpipe's version is the one above: REINFORCE whose detached
importance weight is truncated at ratio_cap (default 2, so a token the learner now likes far
more than the sampler did cannot dominate the step; below 1 it is not clipped, as in TIS), plus
an optional k3 pull of the learner towards the sampler's own logprobs (kl_coeff, default 0),
a trust region around the behaviour policy that needs no reference model. `rlpipe serve` fills
sampling_lp from what it recorded at sampling time (record_stability_info), not from the client.

The RL losses take an optional `weights` (default ones) and two optional corrections:
truncated IS (`tis_cap` = C multiplies each term by the detached min(r, C) / r) and masked
IS (`mis_low`, `mis_high` zero the weight of tokens whose r lies outside [a, b]).

They also take an optional KL penalty against a reference model (TRL GRPO's beta, verl's
kl_loss with the low-variance "k3" estimator): with `ref_logprobs` = ref and config `kl_coef`,

    loss += kl_coef * sum over counted tokens of kw * k3,   k3 = exp(ref - lp) - (ref - lp) - 1

where kw is the optional input `kl_weights` (default: `weights`). k3 is never negative, is 0
where lp == ref, and its gradient 1 - exp(ref - lp) pulls lp towards ref. The KL term ignores
the IS corrections (it compares the learner with the reference, not with the sampler). A
caller that folds its normalisation into `advantages` (rlpipe's learner divides them by the
batch's action-token count) passes the same normalisation in `kl_weights`, so both terms are
per-token means. `kl_ref:mean` reports k3 over the counted tokens whenever ref_logprobs is given.

Diagnostics cover the "counted" tokens, those with weight > 0, including tokens that MIS
masks (the point is to watch the sampler/learner mismatch, masked or not). With no counted
token the ratio statistics report 1.0 (the on-policy value) and every mean reports 0.0.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor


Inputs = dict[str, Tensor]
Config = dict[str, float]


class LossSpec(NamedTuple):
    # fn(logprobs_T, inputs, config) -> per-token loss before weights and corrections.
    fn: Callable[[Tensor, Inputs, Config], Tensor]
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...]
    config_keys: tuple[str, ...]


def cross_entropy_loss(logprobs_T: Tensor, inputs: Inputs, config: Config) -> Tensor:
    return -logprobs_T


def importance_sampling_loss(logprobs_T: Tensor, inputs: Inputs, config: Config) -> Tensor:
    ratio_T = torch.exp(logprobs_T - inputs["logprobs"])
    return -ratio_T * inputs["advantages"]


def ppo_loss(logprobs_T: Tensor, inputs: Inputs, config: Config) -> Tensor:
    advantages_T = inputs["advantages"]
    ratio_T = torch.exp(logprobs_T - inputs["logprobs"])
    clipped_T = ratio_T.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio_T * advantages_T, clipped_T * advantages_T)


def cispo_loss(logprobs_T: Tensor, inputs: Inputs, config: Config) -> Tensor:
    # Clipping only the detached coefficient keeps every token's gradient alive (unlike PPO,
    # which drops clipped tokens entirely) while bounding how far one token can push.
    ratio_T = torch.exp(logprobs_T.detach() - inputs["logprobs"])
    coef_T = ratio_T.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -coef_T * logprobs_T * inputs["advantages"]


def dro_loss(logprobs_T: Tensor, inputs: Inputs, config: Config) -> Tensor:
    log_ratio_T = logprobs_T - inputs["logprobs"]
    return -(logprobs_T * inputs["advantages"] - 0.5 * config["beta"] * log_ratio_T.square())


def stable_reinforce_loss(logprobs_T: Tensor, inputs: Inputs, config: Config) -> Tensor:
    sampling_T = inputs["logprobs"]
    # sg(min(r, C)) in log space: r == inf gives C, never inf * 0.
    coef_T = (logprobs_T.detach() - sampling_T).clamp(max=math.log(config["ratio_cap"])).exp()
    terms_T = -coef_T * logprobs_T * inputs["advantages"]
    if config["kl_coeff"] > 0:
        terms_T = terms_T + config["kl_coeff"] * _k3(sampling_T - logprobs_T)
    return terms_T


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_RL_OPTIONAL = ("weights", "ref_logprobs", "kl_weights")
_CORRECTIONS = ("tis_cap", "mis_low", "mis_high", "kl_coef")  # every RL loss takes these (all off when absent)
_CLIP = ("clip_low_threshold", "clip_high_threshold")

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy_loss, ("target_tokens", "weights"), (), ()),
    "importance_sampling": LossSpec(importance_sampling_loss, _RL_INPUTS, _RL_OPTIONAL, _CORRECTIONS),
    "ppo": LossSpec(ppo_loss, _RL_INPUTS, _RL_OPTIONAL, _CLIP + _CORRECTIONS),
    "cispo": LossSpec(cispo_loss, _RL_INPUTS, _RL_OPTIONAL, _CLIP + _CORRECTIONS),
    "dro": LossSpec(dro_loss, _RL_INPUTS, _RL_OPTIONAL, ("beta",) + _CORRECTIONS),
    # ratio_cap is its own truncation, so tis_cap (the same thing again) is not taken.
    "stable_reinforce": LossSpec(stable_reinforce_loss, _RL_INPUTS, _RL_OPTIONAL,
                                 ("ratio_cap", "kl_coeff", "mis_low", "mis_high", "kl_coef")),
}

# beta = 0.05 is a mild pull towards the sampler; corrections and kl_coef have no default
# (absent = off).
DEFAULTS: dict[str, float] = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, "beta": 0.05,
                              "ratio_cap": 2.0, "kl_coeff": 0.0}


def _validated_inputs(name: str, spec: LossSpec, logprobs_T: Tensor, inputs: Inputs) -> Inputs:
    if not isinstance(logprobs_T, Tensor) or logprobs_T.dim() != 1 or not logprobs_T.is_floating_point():
        raise ValueError(f"{name}: logprobs_T must be a 1-D float tensor")
    for key in spec.required_inputs:
        if key not in inputs:
            raise ValueError(f"{name}: missing required input {key!r}")
    allowed = spec.required_inputs + spec.optional_inputs
    for key in inputs:
        if key not in allowed:
            raise ValueError(f"{name}: unexpected input {key!r}; accepted inputs are {list(allowed)}")
    T = logprobs_T.shape[0]
    out: Inputs = {}
    for key, value in inputs.items():
        if not isinstance(value, Tensor) or value.dim() != 1:
            raise ValueError(f"{name}: input {key!r} must be a 1-D tensor")
        if value.shape[0] != T:
            length = value.shape[0]
            raise ValueError(f"{name}: input {key!r} has length {length}, logprobs_T has length {T}")
        if key == "target_tokens":
            continue  # carried for the Tinker schema; the math never reads it
        value = value.to(device=logprobs_T.device, dtype=logprobs_T.dtype)
        if torch.isnan(value).any():
            raise ValueError(f"{name}: {key} contains NaN")
        if torch.isinf(value).any():
            raise ValueError(f"{name}: {key} contains inf")
        out[key] = value
    # Negative weights would be contributing tokens that the RL diagnostics (weight > 0) skip.
    # Cross-entropy takes any weight: Tinker's forward_backward_custom sends -dLoss/dlogprobs.
    for key in ("weights", "kl_weights"):
        if key in out and name != "cross_entropy" and (out[key] < 0).any():
            raise ValueError(f"{name}: {key} contains negative values")
    return out


def _validated_config(name: str, spec: LossSpec, config: dict | None) -> Config:
    config = dict(config or {})
    for key, value in config.items():
        if key not in spec.config_keys:
            accepted = list(spec.config_keys)
            raise ValueError(f"{name}: unknown config key {key!r}; accepted keys are {accepted}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name}: config {key!r} must be a number, got {value!r}")
    cfg = {k: v for k, v in DEFAULTS.items() if k in spec.config_keys}
    cfg |= {k: float(v) for k, v in config.items()}
    if "clip_low_threshold" in cfg:
        lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        if lo < 0 or lo >= hi:
            msg = f"need 0 <= clip_low_threshold < clip_high_threshold, got {lo}, {hi}"
            raise ValueError(f"{name}: {msg}")
    if "beta" in cfg and not 0 < cfg["beta"] < math.inf:
        raise ValueError(f"{name}: beta must be a finite number > 0, got {cfg['beta']}")
    if "ratio_cap" in cfg and not 0 < cfg["ratio_cap"] < math.inf:
        raise ValueError(f"{name}: ratio_cap must be a finite number > 0, got {cfg['ratio_cap']}")
    if "kl_coeff" in cfg and not 0 <= cfg["kl_coeff"] < math.inf:
        raise ValueError(f"{name}: kl_coeff must be a finite number >= 0, got {cfg['kl_coeff']}")
    if "kl_coef" in cfg and not 0 <= cfg["kl_coef"] < math.inf:
        raise ValueError(f"{name}: kl_coef must be a finite number >= 0, got {cfg['kl_coef']}")
    if "tis_cap" in cfg and not 0 < cfg["tis_cap"] < math.inf:
        raise ValueError(f"{name}: tis_cap must be a finite number > 0, got {cfg['tis_cap']}")
    if "mis_low" in cfg or "mis_high" in cfg:
        a, b = cfg.setdefault("mis_low", 0.0), cfg.setdefault("mis_high", math.inf)
        if a < 0 or a >= b:
            raise ValueError(f"{name}: need 0 <= mis_low < mis_high, got {a}, {b}")
    return cfg


def check_inputs(loss_fn: str, inputs: dict[str, Tensor], config: dict | None = None) -> None:
    """Raise the ValueError compute_loss would, without computing anything (so a caller that
    splits a batch can refuse bad input before any micro-batch has moved a gradient)."""
    spec = LOSSES.get(loss_fn)
    if spec is None:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; known losses are {sorted(LOSSES)}")
    n = next(iter(inputs.values())).shape[0] if inputs else 0
    _check_kl(loss_fn, _validated_inputs(loss_fn, spec, torch.zeros(n), inputs), _validated_config(loss_fn, spec, config))


def _check_kl(name: str, inputs: Inputs, cfg: Config) -> None:
    if cfg.get("kl_coef", 0.0) > 0 and "ref_logprobs" not in inputs:
        raise ValueError(f"{name}: kl_coef > 0 needs the input 'ref_logprobs' (the reference model's logprobs of "
                         "the target tokens); rlpipe's TrainingClient computes them itself when they are absent")


def compute_loss(
    loss_fn: str, logprobs_T: Tensor, inputs: dict[str, Tensor], config: dict | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Summed loss (differentiable through logprobs_T) and its metrics as python floats."""
    spec = LOSSES.get(loss_fn)
    if spec is None:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; known losses are {sorted(LOSSES)}")
    inputs_T = _validated_inputs(loss_fn, spec, logprobs_T, inputs)
    cfg = _validated_config(loss_fn, spec, config)
    _check_kl(loss_fn, inputs_T, cfg)
    weights_T = inputs_T.get("weights", torch.ones_like(logprobs_T))
    counted_T = weights_T > 0

    if loss_fn == "cross_entropy":
        # where(), not a product, so a -inf logprob on a weight-0 token cannot turn into NaN.
        loss = torch.where(weights_T != 0, weights_T * spec.fn(logprobs_T, inputs_T, cfg), 0.0).sum()
        return loss, {"loss:sum": loss.item()}

    log_ratio_T = logprobs_T.detach() - inputs_T["logprobs"]
    ratio_T = log_ratio_T.exp()
    active_T = counted_T
    if "mis_low" in cfg:
        masked_T = counted_T & ((ratio_T < cfg["mis_low"]) | (ratio_T > cfg["mis_high"]))
        active_T = counted_T & ~masked_T
    # Inactive tokens are computed at r == 1: an overflowing exp(lp - sampling_lp) on an
    # observation token would otherwise leak NaN through its zero weight into the gradient.
    inputs_T["logprobs"] = torch.where(active_T, inputs_T["logprobs"], logprobs_T.detach())
    terms_T = spec.fn(logprobs_T, inputs_T, cfg)
    if "tis_cap" in cfg:
        # min(r, C) / r in log space, so r == inf gives 0 instead of inf / inf.
        terms_T = terms_T * (math.log(cfg["tis_cap"]) - log_ratio_T).clamp(max=0.0).exp()
    loss = torch.where(active_T, weights_T * terms_T, 0.0).sum()
    kl_metrics = {}
    if "ref_logprobs" in inputs_T:
        # Uncounted tokens are computed at lp == ref (k3 = 0), for the same reason as above.
        ref_T = torch.where(counted_T, inputs_T["ref_logprobs"], logprobs_T.detach())
        k3_T = _k3(ref_T - logprobs_T)
        if cfg.get("kl_coef", 0.0) > 0:
            kl_weights_T = inputs_T.get("kl_weights", weights_T)
            loss = loss + cfg["kl_coef"] * torch.where(counted_T, kl_weights_T * k3_T, 0.0).sum()
        k3_N = k3_T.detach()[counted_T]
        kl_metrics["kl_ref:mean"] = k3_N.double().mean().item() if k3_N.numel() else 0.0

    metrics = {"loss:sum": loss.item()} | _ratio_metrics(ratio_T[counted_T], log_ratio_T[counted_T], cfg) | kl_metrics
    if "mis_low" in cfg:
        metrics["mis_masked:sum"] = float(masked_T.sum().item())
    return loss, metrics


def _k3(log_ratio_T: Tensor) -> Tensor:
    """exp(x) - x - 1 for x = log(ref / learner): the low-variance, never negative KL estimator."""
    return torch.exp(log_ratio_T) - log_ratio_T - 1


_TRUNCATED = {"tis_cap": "tis_truncated_frac:mean", "ratio_cap": "ratio_capped_frac:mean"}


def _ratio_metrics(ratio_N: Tensor, log_ratio_N: Tensor, cfg: Config) -> dict[str, float]:
    n = ratio_N.numel()
    metrics = {"tokens:sum": float(n)}
    if n == 0:
        metrics |= {"ratio:mean": 1.0, "ratio:min": 1.0, "ratio:max": 1.0, "clip_frac:mean": 0.0}
        metrics |= {"kl_sampler_learner:mean": 0.0, "kl_k1:mean": 0.0}
        for key in ("tis_cap", "ratio_cap"):
            if key in cfg:
                metrics[_TRUNCATED[key]] = 0.0
        return metrics
    clipped_N = torch.zeros_like(ratio_N, dtype=torch.bool)
    if "clip_low_threshold" in cfg:
        clipped_N = (ratio_N < cfg["clip_low_threshold"]) | (ratio_N > cfg["clip_high_threshold"])
    stats = [
        ratio_N.mean(),
        ratio_N.min(),
        ratio_N.max(),
        clipped_N.double().mean(),
        (ratio_N - 1 - log_ratio_N).mean(),  # k3: unbiased, never negative, low variance
        (-log_ratio_N).mean(),
    ]
    names = ["ratio:mean", "ratio:min", "ratio:max", "clip_frac:mean"]
    names += ["kl_sampler_learner:mean", "kl_k1:mean"]
    for key in ("tis_cap", "ratio_cap"):
        if key in cfg:
            stats.append((ratio_N > cfg[key]).double().mean())
            names.append(_TRUNCATED[key])
    values = torch.stack([s.double() for s in stats]).tolist()  # one device sync, not one per metric
    return metrics | dict(zip(names, values))
