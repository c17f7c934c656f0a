"""`--keep`'s controller converges to the constrained optimum (issue 20; docs/method.md §6.3).

A tabular stage 2 whose constrained optimum is known exactly: 4 prompts x 6 responses, two conflicting rewards
(R_2 = -0.8 R_1 + noise), beta 0.5, a softmax policy table as the parameters, the *exact* expected losses over every
ordered pair weighted by its Bradley-Terry probability (float64). pi_1 is stage 1's closed-form optimum. Stage 2
minimises its DPO loss against pi_1 subject to the kept constraint v(pi) = mean Delta(pi, pi_0) over dimension 1's
pairs >= H = threshold(v(pi_1), FRACTION). The problem is convex in the logits (every margin is linear in them), so
the optimum is the Lagrangian's minimiser at the multiplier found by bisection.

The loop is the engine's: the stage loss from `losses.spo_logits` / `losses.preference_loss`, the constraint term
`losses.keep_constraint_loss` times the multiplier, Adam at a constant learning rate, and every K steps the bound,
violation and PI step of `engine.dual` with time from `engine.keep.lr_clock` -- the functions `keep.Keeper` calls.
"""

from __future__ import annotations

import pytest
import torch

from spoctl import losses
from spoctl.config import AlignConfig
from spoctl.engine import dual
from spoctl.engine.keep import lr_clock

D = torch.float64
X, Y, BETA, STEPS, LR = 4, 6, 0.5, 3000, 0.02


def problem(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r1 = torch.randn(X, Y, generator=g, dtype=D) * 1.5
    r2 = -0.8 * r1 + 0.8 * torch.randn(X, Y, generator=g, dtype=D)
    l0 = torch.log_softmax(torch.randn(X, Y, generator=g, dtype=D) * 0.5, -1)
    l1 = torch.log_softmax(l0 + r1 / BETA, -1)  # stage 1's optimum (method (3.1))
    iw, il = map(torch.tensor, zip(*[(a, b) for a in range(Y) for b in range(Y) if a != b]))

    def weights(r: torch.Tensor) -> torch.Tensor:  # P(y_w beats y_l), over all ordered pairs: sums to 1
        return torch.sigmoid(r[:, iw] - r[:, il]) / (X * Y * (Y - 1) / 2)

    return {"l0": l0, "l1": l1, "iw": iw, "il": il, "w1": weights(r1), "w2": weights(r2)}


def pairs(p: dict, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logp[:, p["iw"]], logp[:, p["il"]]


def stage_loss(p: dict, z: torch.Tensor) -> torch.Tensor:
    """The expected DPO loss of stage 2 against pi_1 (no offset: sequential DPO)."""
    h = losses.spo_logits(BETA, *pairs(p, torch.log_softmax(z, -1)), *pairs(p, p["l1"]))
    return (p["w2"] * losses.preference_loss(h, BETA)).sum()


def constraint_term(p: dict, z: torch.Tensor) -> torch.Tensor:
    """E over dimension 1's pairs of keep_constraint_loss = -beta * v(z)."""
    return (p["w1"] * losses.keep_constraint_loss(BETA, *pairs(p, torch.log_softmax(z, -1)), *pairs(p, p["l0"]))).sum()


def value(p: dict, z: torch.Tensor) -> float:
    return float((p["w1"] * losses.log_ratio_margin(*pairs(p, torch.log_softmax(z, -1)), *pairs(p, p["l0"]))).sum())


def lagrangian_minimiser(p: dict, mu: float) -> torch.Tensor:
    z = p["l1"].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = stage_loss(p, z) + mu * constraint_term(p, z)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return z.detach()


def optimum(p: dict, bound: float) -> tuple[float, float]:
    """(multiplier, objective) of the constrained optimum: bisection on mu until v(z*(mu)) = bound."""
    lo, hi = 0.0, 1.0
    while value(p, lagrangian_minimiser(p, hi)) < bound:
        hi *= 2
    for _ in range(40):  # hi - lo < 1e-12 relative: far below the tolerances checked
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if value(p, lagrangian_minimiser(p, mid)) < bound else (lo, mid)
    return hi, float(stage_loss(p, lagrangian_minimiser(p, hi)))


def run(p: dict, fraction: float | None, every: int, tables: bool = False) -> tuple[list, list[torch.Tensor]]:
    """The primal-dual loop; fraction None: no constraint at all (plain SPO). Returns (objective, v, mu) for each step
    of the last fifth, and (when asked) the logits after every step."""
    start = p["l1"][:, p["iw"]] - p["l1"][:, p["il"]] - (p["l0"][:, p["iw"]] - p["l0"][:, p["il"]])
    scale = dual.margin_scale(float((p["w1"] * start.abs()).sum()))
    bound = dual.threshold(value(p, p["l1"]), fraction) if fraction is not None else None
    clock = lr_clock(AlignConfig(dims=["a", "b"], scheduler="constant", warmup_ratio=0.0), STEPS)
    z = p["l1"].clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=LR)
    state, last = dual.Dual(), 0
    trace, seen = [], []
    for step in range(STEPS):
        opt.zero_grad()
        loss = stage_loss(p, z)
        if state.multiplier > 0:  # as Keeper.replay: nothing runs while the multiplier is 0
            loss = loss + state.multiplier * constraint_term(p, z)
        loss.backward()
        opt.step()
        done = step + 1
        if bound is not None and done % every == 0 and done != STEPS:
            e = dual.violation(value(p, z), bound, scale)
            state, last = dual.dual_step(state, e, clock[done] - clock[last]), done
        if done > STEPS - STEPS // 5:
            trace.append((float(stage_loss(p, z)), value(p, z), state.multiplier))
        if tables:
            seen.append(z.detach().clone())
    return trace, seen


@pytest.fixture(scope="module")
def tabular():
    return problem()


@pytest.fixture(scope="module")
def optima(tabular):
    """fraction -> (multiplier, objective) of the constrained optimum, computed once per fraction."""
    found: dict[float, tuple[float, float]] = {}

    def get(fraction: float) -> tuple[float, float]:
        if fraction not in found:
            found[fraction] = optimum(tabular, dual.threshold(value(tabular, tabular["l1"]), fraction))
        return found[fraction]

    return get


@pytest.mark.parametrize("fraction", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("every", [1, 4, 16])
def test_the_controller_converges_to_the_constrained_optimum(tabular, optima, fraction, every):
    p = tabular
    bound = dual.threshold(value(p, p["l1"]), fraction)
    mu_star, best = optima(fraction)
    # The problem is not degenerate: unconstrained, stage 2 violates the bound, and the optimum needs mu > 0.
    assert value(p, lagrangian_minimiser(p, 0.0)) < bound and mu_star > 0.05
    trace, _ = run(p, fraction, every)
    tail = trace  # the last fifth of the steps
    assert max(abs(f - best) for f, _, _ in tail) <= 0.01 * best, (every, fraction, best, tail[-1])
    assert max(abs(v - bound) for _, v, _ in tail) <= 0.02 * abs(bound), (every, fraction, bound, tail[-1])
    # ... and it is the constraint's own multiplier (not a multiplier of another problem).
    assert tail[-1][2] == pytest.approx(mu_star, rel=0.05)


def test_a_slack_constraint_is_plain_spo_bit_for_bit(tabular):
    p = tabular
    bound = dual.threshold(value(p, p["l1"]), 0.01)
    assert value(p, lagrangian_minimiser(p, 0.0)) > bound  # slack at the unconstrained optimum
    kept, kept_tables = run(p, 0.01, 4, tables=True)
    plain, plain_tables = run(p, None, 4, tables=True)
    assert all(mu == 0.0 for _, _, mu in kept) and len(kept_tables) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(kept_tables, plain_tables))
