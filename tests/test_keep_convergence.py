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
    return logp[..., p["iw"]], logp[..., p["il"]]


# The functions below take logits z of shape [X, Y] or a stack [R, X, Y] of R independent runs: each run's loss is
# summed over its own pairs only, and Adam is elementwise, so a stack trains every run exactly as it would alone
# (up to the order of float sums) in one Python loop instead of R.
def stage_loss(p: dict, z: torch.Tensor) -> torch.Tensor:
    """The expected DPO loss of stage 2 against pi_1 (no offset: sequential DPO), per run."""
    h = losses.spo_logits(BETA, *pairs(p, torch.log_softmax(z, -1)), *pairs(p, p["l1"]))
    return (p["w2"] * losses.preference_loss(h, BETA)).sum((-2, -1))


def constraint_term(p: dict, z: torch.Tensor) -> torch.Tensor:
    """E over dimension 1's pairs of keep_constraint_loss = -beta * v(z), per run."""
    return (p["w1"] * losses.keep_constraint_loss(BETA, *pairs(p, torch.log_softmax(z, -1)),
                                                  *pairs(p, p["l0"]))).sum((-2, -1))


def values(p: dict, z: torch.Tensor) -> torch.Tensor:
    """v(z) per run: the mean margin over dimension 1's pairs."""
    with torch.no_grad():
        return (p["w1"] * losses.log_ratio_margin(*pairs(p, torch.log_softmax(z, -1)), *pairs(p, p["l0"]))).sum((-2, -1))


def value(p: dict, z: torch.Tensor) -> float:
    return float(values(p, z))


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


def run(p: dict, configs: list[tuple[float | None, int]], steps: int = STEPS, tables: bool = False
        ) -> tuple[list[list[tuple[float, float, float]]], list[torch.Tensor]]:
    """The primal-dual loop for R runs at once, one per (fraction, every) in `configs`; fraction None: no constraint
    at all (plain SPO). Returns, per run, (objective, v, mu) for each step of the last fifth, and (when asked) the
    stacked logits after every step."""
    start = p["l1"][:, p["iw"]] - p["l1"][:, p["il"]] - (p["l0"][:, p["iw"]] - p["l0"][:, p["il"]])
    scale = dual.margin_scale(float((p["w1"] * start.abs()).sum()))
    v1 = value(p, p["l1"])
    bounds = [dual.threshold(v1, f) if f is not None else None for f, _ in configs]
    clock = lr_clock(AlignConfig(dims=["a", "b"], scheduler="constant", warmup_ratio=0.0), steps)
    z = p["l1"].expand(len(configs), X, Y).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=LR)
    states, last = [dual.Dual() for _ in configs], [0] * len(configs)
    tail, seen = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = stage_loss(p, z)
        mu = torch.tensor([s.multiplier for s in states], dtype=D)
        if bool((mu > 0).any()):  # as Keeper.replay: nothing runs while every multiplier is 0
            loss = loss + mu * constraint_term(p, z)
        loss.sum().backward()
        opt.step()
        done = step + 1
        if done != steps and any(b is not None and done % every == 0 for b, (_, every) in zip(bounds, configs)):
            v = values(p, z).tolist()
            for r, (bound, (_, every)) in enumerate(zip(bounds, configs)):
                if bound is not None and done % every == 0:
                    e = dual.violation(v[r], bound, scale)
                    states[r], last[r] = dual.dual_step(states[r], e, clock[done] - clock[last[r]]), done
        if done > steps - steps // 5:
            with torch.no_grad():
                tail.append((stage_loss(p, z), values(p, z), [s.multiplier for s in states]))
        if tables:
            seen.append(z.detach().clone())
    traces = [[(float(f[r]), float(v[r]), m[r]) for f, v, m in tail] for r in range(len(configs))]
    return traces, seen


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


FRACTIONS, EVERY = (0.5, 0.9, 1.0), (1, 4, 16)


@pytest.fixture(scope="module")
def traces(tabular):
    """(fraction, every) -> the last fifth of that run: all nine runs trained together in one stacked loop."""
    configs = [(f, k) for f in FRACTIONS for k in EVERY]
    found, _ = run(tabular, configs)
    return dict(zip(configs, found))


def test_the_problem_is_not_degenerate(tabular, optima):
    """Unconstrained, stage 2 violates every bound checked below, and each optimum needs a multiplier > 0."""
    p = tabular
    unconstrained = value(p, lagrangian_minimiser(p, 0.0))
    for fraction in FRACTIONS:
        assert unconstrained < dual.threshold(value(p, p["l1"]), fraction)
        assert optima(fraction)[0] > 0.05


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("every", EVERY)
def test_the_controller_converges_to_the_constrained_optimum(tabular, optima, traces, fraction, every):
    p = tabular
    bound = dual.threshold(value(p, p["l1"]), fraction)
    mu_star, best = optima(fraction)
    tail = traces[(fraction, every)]  # the last fifth of the steps
    assert max(abs(f - best) for f, _, _ in tail) <= 0.01 * best, (every, fraction, best, tail[-1])
    assert max(abs(v - bound) for _, v, _ in tail) <= 0.02 * abs(bound), (every, fraction, bound, tail[-1])
    # ... and it is the constraint's own multiplier (not a multiplier of another problem).
    assert tail[-1][2] == pytest.approx(mu_star, rel=0.05)


def test_a_slack_constraint_is_plain_spo_bit_for_bit(tabular):
    """Run alone (not stacked with a plain run, which would make the equality trivial): a constraint that never
    binds leaves every step's logits exactly as the unconstrained loop's."""
    p = tabular
    bound = dual.threshold(value(p, p["l1"]), 0.01)
    assert value(p, lagrangian_minimiser(p, 0.0)) > bound  # slack at the unconstrained optimum
    (kept,), kept_tables = run(p, [(0.01, 4)], steps=STEPS // 5, tables=True)
    (plain,), plain_tables = run(p, [(None, 4)], steps=STEPS // 5, tables=True)
    assert all(mu == 0.0 for _, _, mu in kept) and len(kept_tables) == STEPS // 5
    assert all(torch.equal(a, b) for a, b in zip(kept_tables, plain_tables))
