"""Closed-form unit tests of src/spoctl/losses.py (notation and derivations: docs/method.md)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from spoctl import losses as L

D = torch.float64


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=D)


def plain_dpo(beta, pc, pr, rc, rr):
    """DPO written as TRL 0.x's `dpo_loss` writes it, independently of losses.py: logits and the sigmoid loss.

    (TRL 1.x groups the margin as (pc - rc) - (pr - rr): the same number up to float rounding.)"""
    pi_logratios = pc - pr
    ref_logratios = rc - rr
    logits = beta * (pi_logratios - ref_logratios)
    return logits, -F.logsigmoid(logits)


def rand_logps(g: torch.Generator, n_models: int, b: int = 16):
    """Summed completion log-probs of n_models models on the same b pairs (negative, tens of nats)."""
    chosen = [-torch.rand(b, generator=g, dtype=D) * 50 for _ in range(n_models)]
    rejected = [-torch.rand(b, generator=g, dtype=D) * 50 for _ in range(n_models)]
    return chosen, rejected


# --- margins and offsets -----------------------------------------------------------------------------------


def test_log_ratio_margin_hand_values():
    # (p_w - q_w) - (p_l - q_l) = (-1 - -2) - (-3 - -1) = 1 - (-2) = 3
    assert torch.equal(L.log_ratio_margin(t(-1.0), t(-3.0), t(-2.0), t(-1.0)), t(3.0))
    assert torch.equal(L.log_ratio_margin(t(-5.0, 0.0), t(-5.0, 0.0), t(-5.0, 0.0), t(-5.0, 0.0)), t(0.0, 0.0))


def test_implicit_reward_margins_hand_values():
    # pi_0, pi_1, pi_2 on one pair; Delta(pi_1, pi_0) = 1, Delta(pi_2, pi_1) = 2.
    chosen = [t(-4.0), t(-3.0), t(-1.0)]
    rejected = [t(-4.0), t(-4.0), t(-4.0)]
    m = L.implicit_reward_margins([0.5, 0.25], [[], [0.8]], chosen, rejected)
    assert len(m) == 2
    assert torch.allclose(m[0], t(0.5 * 1.0))  # Delta r_1 = beta_1 * Delta(pi_1, pi_0)
    assert torch.allclose(m[1], t(0.25 * 2.0 - 0.8 * 0.5))  # beta_2 Delta(pi_2, pi_1) - lambda_1^(2) Delta r_1
    assert L.implicit_reward_margins([], [], chosen[:1], rejected[:1]) == []
    with pytest.raises(ValueError):
        L.implicit_reward_margins([0.5], [[0.3]], chosen[:2], rejected[:2])  # stage 1 has no lambdas


def test_spo_offset_all_hand_values():
    assert torch.allclose(L.spo_offset_all([0.7, 0.2], [t(1.0, -2.0), t(3.0, 5.0)]), t(0.7 + 0.6, -1.4 + 1.0))
    zero = L.spo_offset_all([], [], like=t(1.0, 2.0))
    assert torch.equal(zero, t(0.0, 0.0))
    assert float(L.spo_offset_all([], [])) == 0.0


def test_spo_offset_previous_hand_values_and_exact_zero():
    # alpha * beta_{n-1} * Delta(pi_{n-1}, pi_{n-2}) = 0.5 * 0.2 * 3
    assert torch.allclose(L.spo_offset_previous(0.5, 0.2, t(-1.0), t(-3.0), t(-2.0), t(-1.0)), t(0.3))
    nan = t(float("nan"), 1.0)
    zero = L.spo_offset_previous(0.0, 0.2, nan, nan, nan, nan)
    assert torch.equal(zero, t(0.0, 0.0)) and zero.dtype == D


def test_previous_mode_weights():
    assert L.previous_mode_weights(0.7, 1) == []
    assert L.previous_mode_weights(0.7, 2) == [0.7]
    assert L.previous_mode_weights(0.5, 4) == [0.125, 0.25, 0.5]  # lambda_i^(n) = alpha^(n-i)
    # per-stage alphas: lambda^(3) = a_3 * (lambda^(2) ++ [1]) = 0.5 * [0.3, 1]
    assert L.previous_mode_weights([0.0, 0.3, 0.5], 3) == pytest.approx([0.15, 0.5])


def test_spo_logits_hand_values():
    h = L.spo_logits(0.5, t(-1.0), t(-3.0), t(-2.0), t(-1.0), offset=t(0.25))
    assert torch.allclose(h, t(0.5 * 3.0 - 0.25))
    # the offset is a constant: no gradient reaches it
    off = t(0.25).requires_grad_()
    pc = t(-1.0).requires_grad_()
    L.spo_logits(0.5, pc, t(-3.0), t(-2.0), t(-1.0), offset=off).sum().backward()
    assert off.grad is None and torch.allclose(pc.grad, t(0.5))


# --- DPO equivalences (§7) ---------------------------------------------------------------------------------


def test_alpha_zero_is_dpo_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    (p, c, cc), (pr, r, rr) = rand_logps(g, 3, b=64)  # policy, pi_{n-1}, pi_{n-2}
    off = L.spo_offset_previous(0.0, 0.37, c, r, cc, rr)
    h = L.spo_logits(0.1, p, pr, c, r, off)
    logits, loss = plain_dpo(0.1, p, pr, c, r)
    assert torch.equal(h, logits)
    assert torch.equal(L.preference_loss(h, 0.1), loss)
    # also in float32, the dtype an engine may use
    p32, pr32, c32, r32 = (x.float() for x in (p, pr, c, r))
    h32 = L.spo_logits(0.1, p32, pr32, c32, r32, L.spo_offset_previous(0.0, 0.37, c32, r32, c32, r32))
    assert h32.dtype == torch.float32 and torch.equal(h32, plain_dpo(0.1, p32, pr32, c32, r32)[0])


def test_stage_one_is_dpo_against_pi0():
    g = torch.Generator().manual_seed(1)
    (p, p0), (pr, r0) = rand_logps(g, 2)
    margins = L.implicit_reward_margins([], [], [p0], [r0])  # no earlier stage
    off = L.spo_offset_all([], margins, like=p)
    h = L.spo_logits(0.3, p, pr, p0, r0, off)
    logits, loss = plain_dpo(0.3, p, pr, p0, r0)
    assert torch.equal(h, logits) and torch.equal(L.preference_loss(h, 0.3), loss)
    # the broadcasting 0-d zero gives the same bits
    assert torch.equal(L.spo_logits(0.3, p, pr, p0, r0, L.spo_offset_all([], [])), logits)
    assert torch.equal(L.spo_logits(0.3, p, pr, p0, r0, None), logits)


@pytest.mark.parametrize("n_stages", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_previous_mode_equals_all_mode_under_proportional_weights(n_stages, seed):
    """For every stage n <= N: alpha beta_{n-1} Delta(pi_{n-1}, pi_{n-2}) == sum_i lambda_i^(n) Delta r_i."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = rand_logps(g, n_stages)  # pi_0 .. pi_{N-1}: the models stage N sees
    betas = (0.05 + torch.rand(n_stages, generator=g, dtype=D)).tolist()
    alpha = float(0.1 + 0.9 * torch.rand((), generator=g, dtype=D))
    weights = [L.previous_mode_weights(alpha, j + 1) for j in range(n_stages)]
    for n in range(2, n_stages + 1):
        margins = L.implicit_reward_margins(betas[: n - 1], weights[: n - 1], chosen[:n], rejected[:n])
        all_mode = L.spo_offset_all(weights[n - 1], margins)
        previous = L.spo_offset_previous(alpha, betas[n - 2], chosen[n - 1], rejected[n - 1],
                                         chosen[n - 2], rejected[n - 2])
        assert torch.allclose(all_mode, previous, rtol=1e-12, atol=1e-10)
        assert previous.abs().max() > 1e-3  # not trivially zero
    # per-stage alphas collapse the same way
    alphas = (0.2 + 0.8 * torch.rand(n_stages, generator=g, dtype=D)).tolist()
    weights = [L.previous_mode_weights(alphas, j + 1) for j in range(n_stages)]
    n = n_stages
    margins = L.implicit_reward_margins(betas[: n - 1], weights[: n - 1], chosen[:n], rejected[:n])
    previous = L.spo_offset_previous(alphas[n - 1], betas[n - 2], chosen[n - 1], rejected[n - 1],
                                     chosen[n - 2], rejected[n - 2])
    assert torch.allclose(L.spo_offset_all(weights[n - 1], margins), previous, rtol=1e-12, atol=1e-10)


# --- losses ------------------------------------------------------------------------------------------------


def test_sigmoid_loss_is_minus_log_sigmoid():
    h = t(-3.0, 0.0, 0.5, 4.0)
    expected = t(*[-math.log(1 / (1 + math.exp(-x))) for x in (-3.0, 0.0, 0.5, 4.0)])
    assert torch.allclose(L.preference_loss(h, 0.1), expected)
    assert torch.allclose(L.preference_loss(t(0.0), 0.1), t(math.log(2)))


def test_label_smoothing_formula():
    eps, h = 0.1, t(-1.0, 2.0)
    sig = torch.sigmoid(h)
    expected = -(1 - eps) * torch.log(sig) - eps * torch.log(1 - sig)
    assert torch.allclose(L.preference_loss(h, 0.1, label_smoothing=eps), expected)
    # conservative DPO's minimum sits at sigmoid(h) = 1 - eps, not at h = +inf
    h_star = t(math.log((1 - eps) / eps)).requires_grad_()
    L.preference_loss(h_star, 0.1, label_smoothing=eps).sum().backward()
    assert abs(float(h_star.grad)) < 1e-12
    # the smoothing's range, and that only sigmoid takes it, are the configuration's to check:
    # tests/test_configs.py::test_loss_type_and_smoothing_are_checked_by_the_configuration


def test_hinge_loss():
    assert torch.equal(L.preference_loss(t(-1.0, 0.0, 0.25, 1.0, 3.0), 0.1, "hinge"), t(2.0, 1.0, 0.75, 0.0, 0.0))


def test_ipo_loss():
    beta = 0.5
    # (h/beta - 1/(2 beta))^2 : h = 1 -> (2 - 1)^2 = 1 ; h = 0.5 -> (1 - 1)^2 = 0 ; h = -0.5 -> (-1 - 1)^2 = 4
    assert torch.allclose(L.preference_loss(t(1.0, 0.5, -0.5), beta, "ipo"), t(1.0, 0.0, 4.0))
    # without an offset it is TRL's (Delta - 1/(2 beta))^2 on the raw log-ratio margin
    pc, pr, rc, rr = t(-1.0), t(-3.0), t(-2.0), t(-1.0)
    delta = (pc - pr) - (rc - rr)
    assert torch.allclose(L.preference_loss(L.spo_logits(beta, pc, pr, rc, rr), beta, "ipo"),
                          (delta - 1 / (2 * beta)) ** 2)


def test_loss_registry_is_the_one_list():
    assert L.LOSS_TYPES == tuple(L.LOSSES) == ("sigmoid", "ipo", "hinge")
    from spoctl.config import DEFAULT_LOSS, LossConfig

    assert DEFAULT_LOSS in L.LOSSES and LossConfig().type == DEFAULT_LOSS  # the one name config checks without torch
    # The option's description (config stays free of torch, so it cannot read the registry) names every loss.
    described = LossConfig.model_fields["type"].description
    assert all(re.search(rf"\b{name}\b", described) for name in L.LOSSES), described
    h = t(-2.0, -0.25, 0.0, 0.5, 3.0)
    for name, spec in L.LOSSES.items():
        assert spec.description.strip() and "\n" not in spec.description
        # preference_loss is a dispatch, nothing more: the registered function gives the same bits
        assert torch.equal(L.preference_loss(h, 0.3, name), spec.fn(h, 0.3))
    assert [n for n, s in L.LOSSES.items() if s.takes_label_smoothing] == ["sigmoid"]
    smoothed = L.LOSSES["sigmoid"].fn(h, 0.3, label_smoothing=0.2)
    assert torch.equal(L.preference_loss(h, 0.3, "sigmoid", 0.2), smoothed)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_gradient_raises_chosen_lowers_rejected(loss_type):
    pc, pr = t(-2.0, -5.0).requires_grad_(), t(-3.0, -4.0).requires_grad_()
    h = L.spo_logits(0.5, pc, pr, t(-2.5, -4.0), t(-2.5, -4.0), offset=t(0.1, -0.2))
    L.preference_loss(h, 0.5, loss_type).sum().backward()
    # gradient descent moves log pi(y_w) up and log pi(y_l) down
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_offset_reweights_pairs_as_section5_says():
    """Same DPO margin: a pair agreeing with earlier dims (offset > 0) gets a larger gradient than a conflicting one."""
    pc = t(-2.0, -2.0).requires_grad_()
    h = L.spo_logits(0.5, pc, t(-3.0, -3.0), t(-2.5, -2.5), t(-2.5, -2.5), offset=t(1.0, -1.0))
    L.preference_loss(h, 0.5).sum().backward()
    assert pc.grad[0].abs() > pc.grad[1].abs()
    # the weight is sigmoid(-h): beta * sigmoid(-(0.5 - 1)) versus beta * sigmoid(-(0.5 + 1))
    assert torch.allclose(-pc.grad, 0.5 * torch.sigmoid(t(0.5, -1.5)))


def test_sft_loss():
    assert torch.allclose(L.sft_loss(t(-6.0, -3.0, 0.0), torch.tensor([3, 2, 0])), t(2.0, 1.5, 0.0))


def test_inputs_are_not_modified():
    g = torch.Generator().manual_seed(3)
    (a, b, c), (d, e, f) = rand_logps(g, 3)
    before = [x.clone() for x in (a, b, c, d, e, f)]
    L.implicit_reward_margins([0.3, 0.2], [[], [0.5]], [a, b, c], [d, e, f])
    off = L.spo_offset_previous(0.5, 0.3, b, e, a, d)
    h = L.spo_logits(0.2, c, f, b, e, off)
    for kind in L.LOSS_TYPES:
        L.preference_loss(h, 0.2, kind)
    L.reward_metrics(0.2, c, f, b, e, off)
    assert all(torch.equal(x, y) for x, y in zip((a, b, c, d, e, f), before))


# --- metrics -----------------------------------------------------------------------------------------------


def test_reward_metrics_hand_values():
    beta = 0.5
    pc, pr = t(-1.0, -2.0), t(-3.0, -1.0)
    rc, rr = t(-2.0, -2.0), t(-2.0, -2.0)
    off = t(0.25, -0.75)
    m = L.reward_metrics(beta, pc, pr, rc, rr, off)
    # chosen rewards 0.5*[1, 0] ; rejected 0.5*[-1, 1] ; margins [1, -0.5] ; h = margins - off = [0.75, 0.25]
    assert m == pytest.approx({
        "rewards/chosen": 0.25, "rewards/rejected": 0.0, "rewards/accuracies": 0.5, "rewards/margins": 0.25,
        "logps/chosen": -1.5, "logps/rejected": -2.0, "spo/offset": -0.25, "spo/margin_accuracy": 1.0,
    })
    assert all(isinstance(v, float) for v in m.values())
    assert "spo/offset" not in L.reward_metrics(beta, pc, pr, rc, rr)


def test_reward_metric_sums_combine_like_one_batch():
    """Summing two half-batches' sums (what an all-reduce does) gives the full batch's means."""
    g = torch.Generator().manual_seed(4)
    (pc, rc, off), (pr, rr, _) = rand_logps(g, 3, b=10)
    off = off / 50
    full = L.reward_metrics(0.1, pc, pr, rc, rr, off)
    s1 = L.reward_metric_sums(0.1, pc[:3], pr[:3], rc[:3], rr[:3], off[:3])
    s2 = L.reward_metric_sums(0.1, pc[3:], pr[3:], rc[3:], rr[3:], off[3:])
    assert float(s1["count"]) == 3 and float(s2["count"]) == 7
    combined = L.metrics_from_sums({k: s1[k] + s2[k] for k in s1})
    assert combined == pytest.approx(full, rel=1e-12)
    # a 0-d stage-1 offset counts once per pair
    assert L.reward_metrics(0.1, pc, pr, rc, rr, L.spo_offset_all([], []))["spo/offset"] == 0.0


def test_reward_metric_sums_dtype_for_low_precision_inputs():
    x = torch.tensor([-1.0, -2.0], dtype=torch.bfloat16)
    sums = L.reward_metric_sums(0.1, x, x - 1, x, x)
    assert {v.dtype for v in sums.values()} == {torch.float32}


def test_the_configuration_describes_every_registered_loss():
    """The config stays free of torch, so `loss.type`'s description names the losses in words; this keeps the two
    in step (the configuration checks the name against LOSSES itself)."""
    from spoctl.config import LossConfig

    description = LossConfig.model_fields["type"].description
    assert all(name in description for name in L.LOSSES), description
