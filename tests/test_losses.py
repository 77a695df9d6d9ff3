"""rlpipe.losses against an independent per-token reference written over python floats.

The reference derives each token's value and d(loss)/d(lp) by hand, so it shares no code
with the module: a sign or clipping-branch mistake in either shows up as a mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlpipe.losses import DEFAULTS, LOSSES, compute_loss

RL_LOSSES = ["importance_sampling", "ppo", "cispo", "dro"]
DIAG_KEYS = {
    "loss:sum",
    "ratio:mean",
    "ratio:min",
    "ratio:max",
    "clip_frac:mean",
    "kl_sampler_learner:mean",
    "kl_k1:mean",
    "tokens:sum",
}


# --------------------------------------------------------------------------- reference


def reference(loss_fn, lp, inputs, config=None):
    """(value, grad per token, metrics) from a plain loop; the derivatives are by hand."""
    cfg = dict(config or {})
    lo = cfg.get("clip_low_threshold", 0.8)
    hi = cfg.get("clip_high_threshold", 1.2)
    beta = cfg.get("beta", 0.05)
    cap = cfg.get("tis_cap")
    mis = "mis_low" in cfg or "mis_high" in cfg
    a, b = cfg.get("mis_low", 0.0), cfg.get("mis_high", math.inf)
    T = len(lp)
    w_all = [float(x) for x in inputs["weights"]] if "weights" in inputs else [1.0] * T
    value, grad = 0.0, [0.0] * T
    ratios, log_ratios, clipped, truncated, masked = [], [], 0, 0, 0
    for t in range(T):
        w, x = w_all[t], float(lp[t])
        if loss_fn == "cross_entropy":
            value += -w * x
            grad[t] = -w
            continue
        s, A = float(inputs["logprobs"][t]), float(inputs["advantages"][t])
        if w <= 0:
            continue
        r = math.exp(x - s)
        ratios.append(r)
        log_ratios.append(x - s)
        clipped += loss_fn in ("ppo", "cispo") and (r < lo or r > hi)
        truncated += cap is not None and r > cap
        if mis and not (a <= r <= b):
            masked += 1
            continue
        if loss_fn == "importance_sampling":
            v, g = -r * A, -r * A  # d r / d lp = r
        elif loss_fn == "ppo":
            c = min(max(r, lo), hi)
            v = -min(r * A, c * A)
            # The unclipped branch is the min when A >= 0 and r <= hi, or A < 0 and r >= lo;
            # at the boundary both branches agree and the clamp still passes the gradient.
            unclipped = (A >= 0 and r <= hi) or (A < 0 and r >= lo)
            g = -r * A if unclipped else 0.0
        elif loss_fn == "cispo":
            c = min(max(r, lo), hi)
            v, g = -c * x * A, -c * A
        elif loss_fn == "dro":
            v = -(x * A - 0.5 * beta * (x - s) ** 2)
            g = -(A - beta * (x - s))
        if cap is not None:
            coef = min(r, cap) / r
            v, g = v * coef, g * coef
        value += w * v
        grad[t] = w * g
    metrics = {"loss:sum": value}
    if loss_fn == "cross_entropy":
        return value, grad, metrics
    n = len(ratios)
    metrics["tokens:sum"] = float(n)
    metrics["ratio:mean"] = sum(ratios) / n if n else 1.0
    metrics["ratio:min"] = min(ratios) if n else 1.0
    metrics["ratio:max"] = max(ratios) if n else 1.0
    metrics["clip_frac:mean"] = clipped / n if n else 0.0
    metrics["kl_sampler_learner:mean"] = sum(r - 1 - math.log(r) for r in ratios) / n if n else 0.0
    metrics["kl_k1:mean"] = sum(-lr for lr in log_ratios) / n if n else 0.0
    if cap is not None:
        metrics["tis_truncated_frac:mean"] = truncated / n if n else 0.0
    if mis:
        metrics["mis_masked:sum"] = float(masked)
    return value, grad, metrics


def run(loss_fn, lp, inputs, config=None):
    lp = lp.detach().clone().requires_grad_(True)
    loss, metrics = compute_loss(loss_fn, lp, inputs, config)
    loss.backward()
    return loss, lp.grad, metrics


def check_against_reference(loss_fn, lp, inputs, config=None):
    loss, grad, metrics = run(loss_fn, lp, inputs, config)
    ref_value, ref_grad, ref_metrics = reference(loss_fn, lp, inputs, config)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(ref_value, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert set(metrics) == set(ref_metrics)
    for key, expected in ref_metrics.items():
        assert metrics[key] == pytest.approx(expected, rel=1e-12, abs=1e-12), key
        assert isinstance(metrics[key], float), key
    return loss, grad, metrics


def random_batch(T=24, with_weights=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sampling = -torch.rand(T, generator=gen, dtype=torch.float64) * 3
    lp = sampling + torch.randn(T, generator=gen, dtype=torch.float64) * 0.4  # ratios ~ 0.4..2.5
    inputs = {
        "target_tokens": torch.randint(0, 100, (T,), generator=gen),
        "logprobs": sampling,
        "advantages": torch.randn(T, generator=gen, dtype=torch.float64),
    }
    if with_weights:
        weights = torch.rand(T, generator=gen, dtype=torch.float64) * 2
        weights[::4] = 0.0
        inputs["weights"] = weights
    return lp, inputs


# --------------------------------------------------------------------------- values and gradients


CONFIGS = {
    "importance_sampling": [{}, {"tis_cap": 1.3}, {"mis_low": 0.7, "mis_high": 1.5}, {"tis_cap": 1.1, "mis_high": 2.0}],
    "ppo": [{}, {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}, {"tis_cap": 1.3, "mis_low": 0.6}],
    "cispo": [{}, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, {"tis_cap": 1.2, "mis_high": 1.8}],
    "dro": [{}, {"beta": 0.7}, {"beta": 0.3, "tis_cap": 1.5, "mis_low": 0.5, "mis_high": 1.6}],
}
CASES = [(name, cfg) for name, cfgs in CONFIGS.items() for cfg in cfgs]


@pytest.mark.parametrize("loss_fn,config", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("with_weights", [True, False])
def test_rl_loss_matches_reference(loss_fn, config, with_weights):
    torch.manual_seed(0)
    for seed in range(3):
        lp, inputs = random_batch(with_weights=with_weights, seed=seed)
        check_against_reference(loss_fn, lp, inputs, config)


def test_cross_entropy_matches_reference():
    torch.manual_seed(0)
    lp = -torch.rand(10, dtype=torch.float64) * 4
    weights = torch.rand(10, dtype=torch.float64)
    weights[:3] = 0.0
    inputs = {"target_tokens": torch.arange(10), "weights": weights}
    loss, grad, metrics = check_against_reference("cross_entropy", lp, inputs)
    assert set(metrics) == {"loss:sum"}
    torch.testing.assert_close(grad, -weights)


def edge_batch(lo, hi):
    """Ratios exactly at, just inside and just outside both bounds, for A > 0, A < 0 and A = 0."""
    eps = 1e-6
    ratios = [lo - eps, lo, lo + eps, 1.0, hi - eps, hi, hi + eps, 0.1, 10.0]
    advs = [1.3, -0.7, 0.0]
    # sampling_lp = 0 so lp - sampling_lp is exactly log r, and exp() lands exactly on the bound
    # (checked here, since "exactly at" is otherwise at the mercy of one ulp).
    lp = torch.tensor([math.log(r) for r in ratios for _ in advs], dtype=torch.float64)
    for bound in (lo, hi):
        assert math.exp(math.log(bound)) == torch.exp(torch.tensor(math.log(bound), dtype=torch.float64)).item() == bound
    inputs = {
        "target_tokens": torch.zeros(len(lp), dtype=torch.int64),
        "logprobs": torch.zeros(len(lp), dtype=torch.float64),
        "advantages": torch.tensor(advs * len(ratios), dtype=torch.float64),
    }
    return lp, inputs


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo"])
@pytest.mark.parametrize("lo,hi", [(0.8, 1.2), (0.5, 2.0), (0.25, 4.0)])
def test_clip_edges(loss_fn, lo, hi):
    lp, inputs = edge_batch(lo, hi)
    config = {"clip_low_threshold": lo, "clip_high_threshold": hi}
    _, _, metrics = check_against_reference(loss_fn, lp, inputs, config)
    assert metrics["clip_frac:mean"] == pytest.approx(4 / 9)  # lo - eps, hi + eps, 0.1, 10: strictly outside


def test_ppo_edge_gradients_by_hand():
    lo, hi = 0.5, 2.0
    lp = torch.tensor([math.log(r) for r in (2.0, 2.0 + 1e-6, 0.5, 0.5 - 1e-6, 2.0 + 1e-6, 0.5 - 1e-6)], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    inputs = {"target_tokens": torch.zeros(6, dtype=torch.int64), "logprobs": torch.zeros(6, dtype=torch.float64), "advantages": adv}
    _, grad, _ = run("ppo", lp, inputs, {"clip_low_threshold": lo, "clip_high_threshold": hi})
    # at the bound: gradient flows; past it in the direction the advantage pushes: none;
    # past it against the advantage (PPO's pessimistic min): the gradient flows again.
    expected = [-2.0, 0.0, 0.5, 0.0, (2.0 + 1e-6), -(0.5 - 1e-6)]
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("loss_fn", RL_LOSSES)
def test_zero_advantages(loss_fn):
    lp, inputs = random_batch(with_weights=False, seed=3)
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    loss, grad, _ = check_against_reference(loss_fn, lp, inputs)
    if loss_fn == "dro":  # only the proximal term is left: beta/2 * sum (lp - sampling_lp)^2
        torch.testing.assert_close(grad, DEFAULTS["beta"] * (lp - inputs["logprobs"]))
    else:
        assert loss.item() == 0.0
        assert torch.all(grad == 0)


# --------------------------------------------------------------------------- corrections


def ratio_batch(ratios, advantages, weights=None):
    n = len(ratios)
    inputs = {
        "target_tokens": torch.zeros(n, dtype=torch.int64),
        "logprobs": torch.full((n,), -1.0, dtype=torch.float64),
        "advantages": torch.tensor(advantages, dtype=torch.float64),
    }
    if weights is not None:
        inputs["weights"] = torch.tensor(weights, dtype=torch.float64)
    lp = torch.tensor([math.log(r) - 1.0 for r in ratios], dtype=torch.float64)
    return lp, inputs


def test_truncated_importance_sampling():
    ratios, advs = [0.5, 1.0, 1.9, 2.5, 4.0], [1.0, -2.0, 0.5, 1.5, -1.0]
    lp, inputs = ratio_batch(ratios, advs)
    loss, grad, metrics = check_against_reference("importance_sampling", lp, inputs, {"tis_cap": 2.0})
    capped = [min(r, 2.0) for r in ratios]
    assert loss.item() == pytest.approx(-sum(c * a for c, a in zip(capped, advs)))
    torch.testing.assert_close(grad, torch.tensor([-c * a for c, a in zip(capped, advs)], dtype=torch.float64))
    assert metrics["tis_truncated_frac:mean"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("loss_fn", RL_LOSSES)
def test_masked_importance_sampling(loss_fn):
    ratios, advs = [0.2, 0.5, 1.0, 1.9, 2.5, 4.0], [1.0, -2.0, 0.5, 1.5, -1.0, 2.0]
    lp, inputs = ratio_batch(ratios, advs, weights=[1, 1, 1, 1, 1, 0])
    clip = {"clip_low_threshold": 0.1, "clip_high_threshold": 10.0} if loss_fn in ("ppo", "cispo") else {}
    config = {"mis_low": 0.4, "mis_high": 2.0} | clip
    _, grad, metrics = check_against_reference(loss_fn, lp, inputs, config)
    assert metrics["mis_masked:sum"] == 2.0  # 0.2 and 2.5; 4.0 has weight 0 and is not counted
    assert metrics["tokens:sum"] == 5.0
    assert grad[0] == 0 and grad[4] == 0 and grad[5] == 0
    assert torch.all(grad[1:4] != 0)  # unclipped survivors keep their gradient
    # either bound alone
    assert check_against_reference(loss_fn, lp, inputs, {"mis_low": 0.4} | clip)[2]["mis_masked:sum"] == 1.0
    assert check_against_reference(loss_fn, lp, inputs, {"mis_high": 2.0} | clip)[2]["mis_masked:sum"] == 1.0


def test_corrections_absent_means_no_correction_metrics():
    lp, inputs = random_batch()
    _, metrics = compute_loss("ppo", lp, inputs)
    assert set(metrics) == DIAG_KEYS
    _, metrics = compute_loss("ppo", lp, inputs, {"tis_cap": 2.0, "mis_high": 3.0})
    assert set(metrics) == DIAG_KEYS | {"tis_truncated_frac:mean", "mis_masked:sum"}


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("loss_fn", RL_LOSSES)
def test_zero_weight_tokens_are_invisible(loss_fn):
    lp, inputs = random_batch(T=12, with_weights=False, seed=5)
    keep = torch.tensor([i % 3 != 0 for i in range(12)])
    # Observation tokens with absurd sampler logprobs: r overflows to inf if ever computed.
    full = dict(inputs, weights=keep.double())
    full["logprobs"] = torch.where(keep, inputs["logprobs"], torch.tensor(-1e4, dtype=torch.float64))
    full["advantages"] = torch.where(keep, inputs["advantages"], torch.tensor(1e6, dtype=torch.float64))
    sub = {k: v[keep] for k, v in inputs.items()}
    config = {"tis_cap": 1.5, "mis_low": 0.5}
    loss, grad, metrics = run(loss_fn, lp, full, config)
    sub_loss, sub_grad, sub_metrics = run(loss_fn, lp[keep], sub, config)
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))
    assert loss.item() == pytest.approx(sub_loss.item(), rel=1e-12)
    torch.testing.assert_close(grad[keep], sub_grad)
    assert torch.all(grad[~keep] == 0)
    assert metrics == pytest.approx(sub_metrics, rel=1e-12)
    assert metrics["tokens:sum"] == 8.0


@pytest.mark.parametrize("loss_fn", RL_LOSSES + ["cross_entropy"])
def test_weights_scale_each_token(loss_fn):
    lp, inputs = random_batch(T=8, with_weights=False, seed=7)
    if loss_fn == "cross_entropy":
        inputs = {"target_tokens": inputs["target_tokens"], "weights": torch.ones(8, dtype=torch.float64)}
    _, grad_one, _ = run(loss_fn, lp, dict(inputs, weights=torch.ones(8, dtype=torch.float64)))
    scale = torch.arange(1, 9, dtype=torch.float64) / 4
    _, grad_scaled, _ = run(loss_fn, lp, dict(inputs, weights=scale))
    torch.testing.assert_close(grad_scaled, grad_one * scale)


@pytest.mark.parametrize("loss_fn", RL_LOSSES)
@pytest.mark.parametrize("T", [0, 5])
def test_no_counted_tokens_gives_finite_metrics(loss_fn, T):
    lp, inputs = random_batch(T=T, with_weights=False)
    inputs["weights"] = torch.zeros(T, dtype=torch.float64)
    loss, grad, metrics = check_against_reference(loss_fn, lp, inputs, {"tis_cap": 2.0, "mis_low": 0.1})
    assert loss.item() == 0.0 and torch.all(grad == 0)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["ratio:mean"] == metrics["ratio:min"] == metrics["ratio:max"] == 1.0
    assert metrics["tokens:sum"] == 0.0 and metrics["kl_sampler_learner:mean"] == 0.0


def test_empty_cross_entropy():
    lp = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    loss, metrics = compute_loss("cross_entropy", lp, {"target_tokens": torch.zeros(0, dtype=torch.int64), "weights": torch.zeros(0)})
    loss.backward()
    assert loss.item() == 0.0 and metrics == {"loss:sum": 0.0}


# --------------------------------------------------------------------------- diagnostics


@pytest.mark.parametrize("loss_fn", RL_LOSSES)
def test_kl_is_zero_on_policy_and_positive_off_policy(loss_fn):
    lp, inputs = random_batch(with_weights=False, seed=11)
    on_policy = dict(inputs, logprobs=lp.clone())
    _, metrics = compute_loss(loss_fn, lp, on_policy)
    assert metrics["kl_sampler_learner:mean"] == pytest.approx(0.0, abs=1e-15)
    assert metrics["kl_k1:mean"] == pytest.approx(0.0, abs=1e-15)
    assert metrics["ratio:mean"] == metrics["ratio:min"] == metrics["ratio:max"] == 1.0
    assert metrics["clip_frac:mean"] == 0.0
    _, metrics = compute_loss(loss_fn, lp, inputs)
    assert metrics["kl_sampler_learner:mean"] > 1e-3


def test_clip_frac_is_zero_for_unclipped_losses():
    lp, inputs = ratio_batch([0.1, 5.0], [1.0, 1.0])
    for loss_fn in ("importance_sampling", "dro"):
        assert compute_loss(loss_fn, lp, inputs)[1]["clip_frac:mean"] == 0.0
    assert compute_loss("ppo", lp, inputs)[1]["clip_frac:mean"] == 1.0


def test_dtype_follows_logprobs_and_inputs_untouched():
    lp, inputs = random_batch(T=6, seed=2)
    before = {k: v.clone() for k, v in inputs.items()}
    loss, _ = compute_loss("ppo", lp.float().requires_grad_(), inputs)
    assert loss.dtype == torch.float32
    for k, v in inputs.items():
        assert torch.equal(v, before[k])


def test_loss_table():
    assert set(LOSSES) == {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "stable_reinforce"}
    assert LOSSES["cross_entropy"].required_inputs == ("target_tokens", "weights")
    for name in RL_LOSSES:
        spec = LOSSES[name]
        assert spec.required_inputs == ("target_tokens", "logprobs", "advantages")
        assert spec.optional_inputs == ("weights", "ref_logprobs", "kl_weights")
        assert {"tis_cap", "mis_low", "mis_high", "kl_coef"} <= set(spec.config_keys)
    assert DEFAULTS == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, "beta": 0.05,
                        "ratio_cap": 2.0, "kl_coeff": 0.0}
    spec = LOSSES["stable_reinforce"]
    assert spec.required_inputs == ("target_tokens", "logprobs", "advantages")
    assert set(spec.config_keys) == {"ratio_cap", "kl_coeff", "mis_low", "mis_high", "kl_coef"}


# --------------------------------------------------------------------------- stable_reinforce


def test_stable_reinforce_by_hand():
    """r = [2, 0.5, 1], ratio_cap 1.5 -> coefficients [1.5, 0.5, (1)]; the third token has weight 0.
    loss = -1.5*1*ln(.5) - 0.5*(-2)*ln(.25) + 0.1*(k3(ln .5) + k3(ln 2))
         = 1.03972 - 1.38629 + 0.1*(0.19315 + 0.30685) = -0.29657
    d/dlp = -coef*A + kl_coeff*(1 - exp(sampling_lp - lp)) = [-1.5 + 0.05, 1.0 - 0.1, 0]."""
    lp = torch.log(torch.tensor([0.5, 0.25, 0.8], dtype=torch.float64)).requires_grad_()
    inputs = {
        "target_tokens": torch.zeros(3, dtype=torch.int64),
        "logprobs": torch.log(torch.tensor([0.25, 0.5, 0.8], dtype=torch.float64)),
        "advantages": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
        "weights": torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64),
    }
    loss, metrics = compute_loss("stable_reinforce", lp, inputs, {"ratio_cap": 1.5, "kl_coeff": 0.1})
    loss.backward()
    assert loss.item() == pytest.approx(-0.296574, abs=1e-5)
    torch.testing.assert_close(lp.grad, torch.tensor([-1.45, 0.9, 0.0], dtype=torch.float64))
    assert metrics["ratio_capped_frac:mean"] == pytest.approx(0.5)  # of the two counted tokens
    assert metrics["ratio:max"] == pytest.approx(2.0) and metrics["ratio:min"] == pytest.approx(0.5)
    assert metrics["tokens:sum"] == 2.0


def test_stable_reinforce_defaults_are_truncated_reinforce():
    """kl_coeff 0, ratio_cap 2: on policy it is plain REINFORCE (gradient -A), and a token
    with r = 5 pushes with 2, not 5."""
    lp, inputs = ratio_batch([1.0, 5.0], [1.0, 1.0])
    lp.requires_grad_()
    loss, metrics = compute_loss("stable_reinforce", lp, inputs)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-1.0, -2.0], dtype=torch.float64))
    assert metrics["ratio_capped_frac:mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="kl_coeff"):
        compute_loss("stable_reinforce", lp, inputs, {"kl_coeff": -1.0})
    with pytest.raises(ValueError, match="unknown config key 'tis_cap'"):
        compute_loss("stable_reinforce", lp, inputs, {"tis_cap": 2.0})


# --------------------------------------------------------------------------- bad input


def bad_input_cases():
    lp, good = random_batch(T=4, with_weights=False)
    nan = good["advantages"].clone()
    nan[1] = float("nan")
    inf = good["logprobs"].clone()
    inf[2] = -float("inf")
    yield "unknown", good, None, r"unknown loss_fn 'unknown'.*cispo.*cross_entropy.*dro.*importance_sampling.*ppo"
    yield "ppo", {k: v for k, v in good.items() if k != "advantages"}, None, r"ppo: missing required input 'advantages'"
    yield "cross_entropy", {"target_tokens": good["target_tokens"]}, None, r"missing required input 'weights'"
    yield "ppo", dict(good, values=good["advantages"]), None, r"unexpected input 'values'"
    yield "cross_entropy", dict(good, weights=torch.ones(4)), None, r"unexpected input 'logprobs'"
    yield "ppo", dict(good, advantages=torch.zeros(3)), None, r"'advantages' has length 3, logprobs_T has length 4"
    yield "ppo", dict(good, target_tokens=torch.zeros(5, dtype=torch.int64)), None, r"'target_tokens' has length 5"
    yield "ppo", dict(good, advantages=nan), None, r"advantages contains NaN"
    yield "importance_sampling", dict(good, logprobs=inf), None, r"logprobs contains inf"
    yield "dro", dict(good, weights=torch.tensor([1.0, float("inf"), 1.0, 1.0])), None, r"weights contains inf"
    yield "ppo", dict(good, weights=torch.tensor([1.0, -1.0, 1.0, 1.0])), None, r"weights contains negative"
    yield "ppo", dict(good, advantages=torch.zeros(4, 1)), None, r"'advantages' must be a 1-D tensor"
    yield "ppo", dict(good, advantages=[0.0] * 4), None, r"'advantages' must be a 1-D tensor"
    yield "ppo", good, {"beta": 0.1}, r"ppo: unknown config key 'beta'"
    yield "dro", good, {"clip_low_threshold": 0.1}, r"dro: unknown config key 'clip_low_threshold'"
    yield "importance_sampling", good, {"clip_high_threshold": 2.0}, r"importance_sampling: unknown config key 'clip_high_threshold'"
    yield "ppo", good, {"clip_low_threshold": 1.2}, r"clip_low_threshold < clip_high_threshold"
    yield "cispo", good, {"clip_low_threshold": 1.5, "clip_high_threshold": 1.4}, r"clip_low_threshold < clip_high_threshold"
    yield "ppo", good, {"clip_low_threshold": -0.1}, r"0 <= clip_low_threshold"
    yield "ppo", good, {"tis_cap": 0.0}, r"tis_cap must be .* > 0"
    yield "importance_sampling", good, {"tis_cap": -1.0}, r"tis_cap must be .* > 0"
    yield "dro", good, {"beta": 0.0}, r"beta must be .* > 0"
    yield "dro", good, {"beta": -0.5}, r"beta must be .* > 0"
    yield "ppo", good, {"mis_low": 2.0, "mis_high": 1.0}, r"mis_low < mis_high"
    yield "ppo", good, {"mis_low": -0.1}, r"0 <= mis_low"
    yield "ppo", good, {"mis_high": 0.0}, r"mis_low < mis_high"
    yield "ppo", good, {"tis_cap": "2"}, r"config 'tis_cap' must be a number"
    yield "ppo", good, {"tis_cap": True}, r"config 'tis_cap' must be a number"
    yield "dro", good, {"beta": float("nan")}, r"config 'beta' must be a number"


BAD = list(bad_input_cases())


@pytest.mark.parametrize("loss_fn,inputs,config,match", BAD, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD)])
def test_bad_input_raises(loss_fn, inputs, config, match):
    lp, _ = random_batch(T=4, with_weights=False)
    with pytest.raises(ValueError, match=match):
        compute_loss(loss_fn, lp, inputs, config)


@pytest.mark.parametrize("lp", [torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.int64)])
def test_bad_logprobs_raise(lp):
    _, inputs = random_batch(T=4, with_weights=False)
    with pytest.raises(ValueError, match=r"logprobs_T must be a 1-D float tensor"):
        compute_loss("ppo", lp, inputs)


def test_cross_entropy_takes_negative_weights_as_tinker_custom_losses_send_them():
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    w = torch.tensor([0.5, -2.0, 0.0])
    loss, metrics = compute_loss("cross_entropy", lp, {"target_tokens": torch.tensor([1, 2, 3]), "weights": w})
    assert loss.item() == pytest.approx(-(0.5 * -1.0 + -2.0 * -2.0)) == metrics["loss:sum"]
    loss.backward()
    assert torch.equal(lp.grad, -w)
