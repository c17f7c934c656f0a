"""The CI gate: bounds on each dimension's score, checked on the evaluation's result.

The score checked, per dimension and stage k = 1..K:
  - with a judge:    the judged win rate of stage k's model against the base model;
  - without a judge: the scorecard's accuracy of log(pi_k / pi_0) on the dimension's eval pairs.

  fail_under DIM=V       the last stage's score must be >= V
  max_regression DIM=V   the last stage's score may be at most V below the best stage's score on DIM
                         (a later stage undoing an earlier one is exactly what this catches)
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError


def check(scores: dict[str, list[float]], fail_under: dict[str, float], max_regression: dict[str, float],
          score_name: str) -> dict[str, Any]:
    """`scores[dim]` = the score of stages 1..K. Returns {score, checks, passed, reason}; reason is one line."""
    for name, bounds in (("--fail-under", fail_under), ("--max-regression", max_regression)):
        for dim in bounds:
            if dim not in scores:
                raise UsageError(f"{name} {dim}=...: '{dim}' was not evaluated (evaluated: {', '.join(scores)})")
    checks: list[dict[str, Any]] = []
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
    failed = [c for c in checks if not c["passed"]]
    return {"score": score_name, "checks": checks, "passed": not failed,
            "reason": "; ".join(c["message"] for c in failed) or None}
