"""The CI gate: bounds on each dimension's score, checked on the evaluation's result.

The score checked, per dimension and stage k = 1..K:
  - with a judge:    the judged win rate of stage k's model against the base model;
  - without a judge: the scorecard's accuracy of log(pi_k / pi_0) on the dimension's eval pairs.

  fail_under DIM=V       the last stage's score must be >= V
  max_regression DIM=V   the last stage's score may be at most V below the best stage's score on DIM
                         (a later stage undoing an earlier one is exactly what this catches)
  keep (gate.keep=true)  the run's own `--keep DIM=FRACTION` constraints: after every stage n that kept DIM, DIM's
                         score must be at least FRACTION of its score after DIM's own stage (the bound align
                         enforced on its constraint split's margin, read here on the gate's score)

Both bounds lie in [0, 1] (config.check_gate_bound). A gate on a run whose last stage did not finish fails: "the
last stage" would silently be an earlier one, and a CI job that gates a crashed run must not pass. With
`allow_incomplete` the completed stages are gated, and the result says so.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError


def keep_constraints(stages: list[dict[str, Any]]) -> list[tuple[int, str, int, float]]:
    """(stage n, kept dimension, its own stage, FRACTION) of every constraint the run's stages kept, from their
    manifest entries (`keep_fractions`, written by align)."""
    own = {st["dim"]: st["index"] for st in stages}
    return [(st["index"], dim, own[dim], float(f)) for st in stages for dim, f in (st.get("keep_fractions") or {}).items()]


def incomplete_check(unfinished: list[dict[str, Any]], k_done: int, allow: bool) -> dict[str, Any]:
    """The check that the run finished. `unfinished`: manifest entries of the stages that were not evaluated."""
    first = unfinished[0]
    what = ", ".join(f"stage {st['index']} ({st['dim']}) is {st.get('status', 'pending')}" for st in unfinished)
    message = (f"the run is not finished ({what}): the gate would check stage {k_done} instead of the run's last"
               f" stage; finish it (spoctl align ... --resume), or pass --allow-incomplete to gate the completed"
               f" stages")
    return {"kind": "complete", "dim": None, "bound": None, "value": None, "passed": allow,
            "missing_stage": first["index"], "message": message}


def check(scores: dict[str, list[float]], fail_under: dict[str, float], max_regression: dict[str, float],
          score_name: str, *, keep: list[tuple[int, str, int, float]] | None = None,
          unfinished: list[dict[str, Any]] | None = None, allow_incomplete: bool = False) -> dict[str, Any]:
    """`scores[dim]` = the score of stages 1..K; `keep`: the run's constraints (`keep_constraints`), checked when
    gate.keep is set. Returns {score, checks, passed, reason}; reason is one line."""
    for name, bounds in (("--fail-under", fail_under), ("--max-regression", max_regression)):
        for dim in bounds:
            if dim not in scores:
                raise UsageError(f"{name} {dim}=...: '{dim}' was not evaluated (evaluated: {', '.join(scores)})")
    checks: list[dict[str, Any]] = []
    if unfinished and (fail_under or max_regression or keep):
        k_done = len(next(iter(scores.values()), []))
        checks.append(incomplete_check(unfinished, k_done, allow_incomplete))
    for dim, bound in fail_under.items():
        last = scores[dim][-1]
        checks.append({"kind": "fail_under", "dim": dim, "bound": bound, "value": last, "passed": last >= bound,
                       "message": f"{dim}: {score_name} {last:.4f} of the last stage is below {bound:g}"})
    for dim, bound in max_regression.items():
        best, last = max(scores[dim]), scores[dim][-1]
        drop = best - last
        best_stage = scores[dim].index(best) + 1
        checks.append({"kind": "max_regression", "dim": dim, "bound": bound, "value": drop, "passed": drop <= bound,
                       "message": f"{dim}: {score_name} fell {drop:.4f} below its best (stage {best_stage}:"
                                  f" {best:.4f}) to {last:.4f}, more than {bound:g}"})
    from ..engine.keep import threshold

    for n, dim, own, fraction in keep or []:
        if dim not in scores or n > len(scores[dim]):  # not evaluated, or stage n not finished
            continue
        value, bound = scores[dim][n - 1], threshold(scores[dim][own - 1], fraction)
        checks.append({"kind": "keep", "dim": dim, "stage": n, "bound": bound, "value": value, "passed": value >= bound,
                       "message": f"{dim}: {score_name} {value:.4f} after stage {n} is below its keep bound {bound:.4f}"
                                  f" ({fraction:g} x {scores[dim][own - 1]:.4f} after stage {own})"})
    failed = [c for c in checks if not c["passed"]]
    return {"score": score_name, "checks": checks, "passed": not failed,
            "incomplete_allowed": bool(unfinished) and allow_incomplete and bool(checks),
            "reason": "; ".join(c["message"] for c in failed) or None}
