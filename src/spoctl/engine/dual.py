"""The `--keep` controller as pure functions: the bound, the normalised violation and the dual update.

Stage n solves  minimise L_n(theta)  subject to  v(theta) >= H,  where v is the mean implicit-reward margin
Delta(pi_theta, pi_0) on a kept dimension's constraint split (docs/method.md §6.3). Its Lagrangian is

    L_n(theta) - mu * beta_n * (v(theta) - H)

and `engine.keep.Keeper` trains on it: the stage's own loss, plus mu times `losses.keep_constraint_loss` on replayed
pairs of the kept dimension (an unbiased estimate of -beta_n * v's gradient). At a fixed point of the loop below the
constraint is active (or mu = 0 and it is slack) and theta is stationary for the Lagrangian: the KKT conditions of
the constrained problem, so on a convex problem the loop's fixed point *is* the constrained optimum
(tests/test_keep_convergence.py checks that against bisection).

The multiplier is a proportional-integral (PI) function of the normalised violation e = (H - v) / scale:

    I  <- max(0, I + KI * elapsed * e)          elapsed: the share of the stage's learning-rate budget since the
                                                last measurement (sum of the schedule's lr over those steps / its sum
                                                over the stage), so K, the step count and the schedule drop out
    mu  = max(0, I + KP * e)

Why PI and not the integral-only dual ascent it replaces: the weights answer a change of mu with a lag (Adam's
momentum, then the loss landscape), and an integrator on a lagging plant is the textbook oscillator -- the old
controller's multiplier swung between 0 and 1.2 and its constraint was violated at 40% of measurements. The
proportional term is the damping (the same term the augmented Lagrangian / "modified differential method of
multipliers" of Platt and Barr adds): it reacts to the violation now, so the integral only has to find the constant
part of mu. For a first-order plant (v relaxing towards v*(mu) with any time constant and any gain) a PI loop in
continuous time is stable for every positive KP, KI; measuring every K steps adds a zero-order hold of K steps, which
costs phase only when K steps are a large share of the plant's time constant -- hence time is counted in shares of
the stage (a stage is sized so that it learns, i.e. its time constant is a share of it) and KP is small.
"""

from __future__ import annotations

from dataclasses import dataclass

# Gains, fixed (no tuning per run): KP = 0.3 (multiplier per unit of normalised violation, immediately), KI = 60 (per
# unit of normalised violation sustained over the whole stage: a 10% violation held over a twentieth of the stage
# adds 0.3). Chosen on the tabular problem of tests/test_keep_convergence.py, where they converge for K in {1, 4,
# 16}, FRACTION in {0.5, 0.9, 1.0} and a fourfold range of learning rates and a twentyfold range of beta.
KP = 0.3
KI = 60.0


@dataclass(frozen=True)
class Dual:
    """The controller's state: the integral part and the multiplier it gave (both >= 0)."""

    integral: float = 0.0
    multiplier: float = 0.0


def threshold(start: float, fraction: float) -> float:
    """The bound H: the value may lose at most (1 - FRACTION) of its magnitude, H = start - (1 - FRACTION) * |start|.

    For start >= 0 that is FRACTION * start; for a start <= 0 (stage i did not raise the margin) the bound lies the
    same share of |start| below it, so for FRACTION <= 1 it is never above the start, and FRACTION > 1 asks for more
    than the start in either case."""
    return start - (1.0 - fraction) * abs(start)


def violation(value: float, bound: float, scale: float) -> float:
    """(bound - value) / scale: positive when violated, in units of `scale` (the constraint split's mean absolute
    margin at the end of the dimension's own stage, `margin_scale`)."""
    return (bound - value) / scale


def margin_scale(mean_abs_margin: float) -> float:
    """The unit of the violation: the mean |Delta(pi_i, pi_0)| over the constraint split, which is > 0 unless stage i
    left every one of those pairs exactly where pi_0 had it; then 1 nat (there is nothing to be a share of)."""
    return mean_abs_margin if mean_abs_margin > 0 else 1.0


def dual_step(state: Dual, e: float, elapsed: float, kp: float = KP, ki: float = KI) -> Dual:
    """One PI update from the normalised violation `e`, `elapsed` the share of the stage since the last one. A slack
    constraint (e <= 0) with no integral gives multiplier 0 exactly: the stage stays plain SPO, bit for bit."""
    integral = max(0.0, state.integral + ki * elapsed * e)
    return Dual(integral, max(0.0, integral + kp * e))
