"""§7 closed-form check of the SPO loss on a tabular problem (docs/method.md §7).

A policy is a [prompts x responses] table of log-probs (log-softmax of learnable logits). Stage n minimises the
*exact expected* SPO loss: every ordered pair (y, y') of a prompt, weighted by the Bradley-Terry probability
sigma(R_n(y) - R_n(y')) that a labeller prefers y on dimension n. No sampling, float64, LBFGS to convergence.
The minimiser must be the closed form of §3,

    pi_n* = pi_{n-1} * exp((R_n + sum_{i<n} lambda_i^(n) R_i) / beta_n) / Z,

because the loss depends on the logits only through h = beta_n Delta(pi_theta, pi_{n-1}) - offset and the expected
logistic loss of each pair is minimised exactly at h = R_n(y) - R_n(y'). That holds iff the offset equals
sum lambda Delta R_i, i.e. iff the implicit rewards built by losses.py from the trained models are right. A wrong
sign or a wrong model in the offset moves the minimiser, so those negative controls must fail the check.
"""

from __future__ import annotations

import functools

import pytest
import torch

from spoctl import losses as L

D = torch.float64
N_PROMPTS, N_RESP = 3, 5
BETAS = [0.4, 0.5, 0.3]  # beta_1, beta_2, beta_3
LAM = 0.7  # alpha in previous mode; lambda_1^(2) in all mode
KL_OK = 1e-10  # converged trained-vs-closed-form KL is ~1e-15 or below
KL_BAD = 1e-2  # what a broken offset must exceed

# All ordered pairs (x, y_w=y, y_l=y') with y != y', flattened to B pairs like a real batch.
_x, _w, _l = zip(*[(x, a, b) for x in range(N_PROMPTS) for a in range(N_RESP) for b in range(N_RESP) if a != b])
PX, PW, PL = (torch.tensor(v) for v in (_x, _w, _l))


@functools.cache
def problem():
    g = torch.Generator().manual_seed(1234)
    logp0 = torch.log_softmax(torch.randn(N_PROMPTS, N_RESP, generator=g, dtype=D), dim=-1)
    rewards = [torch.randn(N_PROMPTS, N_RESP, generator=g, dtype=D) for _ in range(3)]  # R_1, R_2, R_3
    return logp0, rewards


def on_pairs(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A table's summed completion log-probs of (chosen, rejected) on every pair."""
    return logp[PX, PW], logp[PX, PL]


def train_stage(logp_ref: torch.Tensor, beta: float, reward: torch.Tensor, offset: torch.Tensor | None):
    """Minimise the expected SPO loss of one stage, starting from the reference; returns the trained table."""
    bt = torch.sigmoid(reward[PX, PW] - reward[PX, PL])  # P(y_w preferred) under Bradley-Terry
    ref_c, ref_r = on_pairs(logp_ref)
    logits = logp_ref.clone().requires_grad_()
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=500, history_size=50, tolerance_grad=1e-13,
                            tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        pol_c, pol_r = on_pairs(torch.log_softmax(logits, dim=-1))
        h = L.spo_logits(beta, pol_c, pol_r, ref_c, ref_r, offset)
        loss = (bt * L.preference_loss(h, beta)).sum()
        loss.backward()
        return loss

    for _ in range(5):  # LBFGS may stop early on a line-search step; restarting is cheap
        opt.step(closure)
    return torch.log_softmax(logits.detach(), dim=-1)


def closed_form(logp_ref: torch.Tensor, beta: float, reward: torch.Tensor, earlier: list[tuple[float, torch.Tensor]]):
    """log of pi_{n-1} exp((R_n + sum lambda_i R_i) / beta_n) / Z."""
    total = reward + sum(lam * r for lam, r in earlier)
    return torch.log_softmax(logp_ref + total / beta, dim=-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Worst prompt's KL(p || q)."""
    return float((logp.exp() * (logp - logq)).sum(-1).max())


# Trained models shared by the tests: pi_1 (stage 1) and pi_2 (stage 2, lambda_1^(2) = LAM via previous mode).
@functools.cache
def pi1():
    logp0, (r1, _, _) = problem()
    return train_stage(logp0, BETAS[0], r1, None)


@functools.cache
def pi2():
    logp0, (_, r2, _) = problem()
    offset = L.spo_offset_previous(LAM, BETAS[0], *on_pairs(pi1()), *on_pairs(logp0))
    return train_stage(pi1(), BETAS[1], r2, offset)


def test_problem_is_not_degenerate():
    """The earlier-dimension term really moves the optimum, so the negative controls can fail."""
    logp0, (r1, r2, _) = problem()
    assert kl(closed_form(pi1(), BETAS[1], r2, [(LAM, r1)]), closed_form(pi1(), BETAS[1], r2, [])) > 5 * KL_BAD


def test_stage1_converges_to_closed_form():
    logp0, (r1, _, _) = problem()
    assert kl(pi1(), closed_form(logp0, BETAS[0], r1, [])) < KL_OK


def test_implicit_rewards_recover_true_rewards():
    """§4: r_1 = beta_1 log(pi_1/pi_0) and r_2 = beta_2 log(pi_2/pi_1) - lambda r_1 equal R_1, R_2 up to c(x)."""
    logp0, (r1, r2, _) = problem()
    m1, m2 = L.implicit_reward_margins(BETAS[:2], [[], [LAM]], [on_pairs(m)[0] for m in (logp0, pi1(), pi2())],
                                       [on_pairs(m)[1] for m in (logp0, pi1(), pi2())])
    assert torch.allclose(m1, r1[PX, PW] - r1[PX, PL], atol=1e-6)
    assert torch.allclose(m2, r2[PX, PW] - r2[PX, PL], atol=1e-6)


def stage2_offset(mode: str):
    logp0, _ = problem()
    if mode == "previous":
        return L.spo_offset_previous(LAM, BETAS[0], *on_pairs(pi1()), *on_pairs(logp0))
    (c0, r0), (c1, r1_) = on_pairs(logp0), on_pairs(pi1())
    return L.spo_offset_all([LAM], L.implicit_reward_margins(BETAS[:1], [[]], [c0, c1], [r0, r1_]))


@pytest.mark.parametrize("mode", ["previous", "all"])
def test_stage2_converges_to_closed_form(mode):
    logp0, (r1, r2, _) = problem()
    trained = train_stage(pi1(), BETAS[1], r2, stage2_offset(mode))
    assert kl(trained, closed_form(pi1(), BETAS[1], r2, [(LAM, r1)])) < KL_OK
    # the same target written with the implicit reward r_1 = beta_1 log(pi_1/pi_0) instead of the true R_1
    implicit_r1 = BETAS[0] * (pi1() - logp0)
    assert kl(trained, closed_form(pi1(), BETAS[1], r2, [(LAM, implicit_r1)])) < KL_OK


def stage3_offset(mode: str, lam3: list[float], weights2: tuple[float, ...] | list[float] = (LAM,)):
    """Offset of stage 3 given lambda^(3); weights2 is what stage 2 is *claimed* to have used (all mode)."""
    logp0, _ = problem()
    models = [logp0, pi1(), pi2()]
    if mode == "previous":
        return L.spo_offset_previous(LAM, BETAS[1], *on_pairs(pi2()), *on_pairs(pi1()))
    chosen, rejected = zip(*(on_pairs(m) for m in models))
    margins = L.implicit_reward_margins(BETAS[:2], [[], list(weights2)], list(chosen), list(rejected))
    return L.spo_offset_all(lam3, margins)


@pytest.mark.parametrize("mode,lam3", [
    ("previous", L.previous_mode_weights(LAM, 3)),  # [LAM^2, LAM]
    ("all", L.previous_mode_weights(LAM, 3)),
    ("all", [0.3, 0.9]),  # free weights, not proportional to stage 2's
], ids=["previous", "all-proportional", "all-free-weights"])
def test_stage3_converges_to_closed_form(mode, lam3):
    _, (r1, r2, r3) = problem()
    trained = train_stage(pi2(), BETAS[2], r3, stage3_offset(mode, lam3))
    assert kl(trained, closed_form(pi2(), BETAS[2], r3, [(lam3[0], r1), (lam3[1], r2)])) < KL_OK


def _control(name: str):
    """(stage, trained-with-a-broken-offset, correct closed form) for a negative control."""
    logp0, (r1, r2, r3) = problem()
    if name.startswith("stage2"):
        offset = {
            "stage2-flipped-sign": lambda: -stage2_offset("previous"),
            "stage2-delta-pi1-pi1": lambda: L.spo_offset_previous(LAM, BETAS[0], *on_pairs(pi1()), *on_pairs(pi1())),
            "stage2-reversed": lambda: L.spo_offset_previous(LAM, BETAS[0], *on_pairs(logp0), *on_pairs(pi1())),
            "stage2-reference-pi0": lambda: stage2_offset("previous"),
        }[name]()
        # the last control keeps the right offset but uses the base model as the reference of h (the LoRA
        # "reference silently the bare base" bug class): its optimum is relative to pi_0, not pi_1
        ref = logp0 if name == "stage2-reference-pi0" else pi1()
        return train_stage(ref, BETAS[1], r2, offset), closed_form(pi1(), BETAS[1], r2, [(LAM, r1)])
    lam3 = L.previous_mode_weights(LAM, 3)
    offset = {
        "stage3-flipped-sign": lambda: -stage3_offset("previous", lam3),
        "stage3-pi0-for-pi1": lambda: L.spo_offset_previous(LAM, BETAS[1], *on_pairs(pi2()), *on_pairs(logp0)),
        "stage3-pi1-for-pi2": lambda: L.spo_offset_previous(LAM, BETAS[1], *on_pairs(pi1()), *on_pairs(logp0)),
        "stage3-beta3-for-beta2": lambda: L.spo_offset_previous(LAM, BETAS[2], *on_pairs(pi2()), *on_pairs(pi1())),
        # all mode fed the wrong record of stage 2's weights: r_2 is not separated from r_1
        "stage3-wrong-recorded-weights": lambda: stage3_offset("all", lam3, weights2=[0.0]),
    }[name]()
    return train_stage(pi2(), BETAS[2], r3, offset), closed_form(pi2(), BETAS[2], r3, [(lam3[0], r1), (lam3[1], r2)])


@pytest.mark.parametrize("name", [
    "stage2-flipped-sign", "stage2-delta-pi1-pi1", "stage2-reversed", "stage2-reference-pi0",
    "stage3-flipped-sign", "stage3-pi0-for-pi1", "stage3-pi1-for-pi2", "stage3-beta3-for-beta2",
    "stage3-wrong-recorded-weights",
])
def test_negative_control_fails_kl_check(name):
    trained, target = _control(name)
    assert kl(trained, target) > KL_BAD
