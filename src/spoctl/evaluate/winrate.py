"""Win/tie/loss counts and win rates with a 95% Wilson score interval.

win rate = (wins + ties / 2) / n. The interval is the Wilson score interval for a binomial proportion at that
rate and n (ties counted as half a win, the usual convention in pairwise LLM evaluation; it makes the interval
slightly conservative when there are many ties). Wilson rather than the normal approximation because it stays
inside [0, 1] and behaves at small n and rates near 0 or 1.
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(verdicts: Sequence[float]) -> dict[str, float | int]:
    """Verdicts are scores of the stage's response against the base's (1 win, 0.5 tie, 0 loss; averages of
    two-order judges land in between and count as the side they lean to)."""
    wins = sum(1 for v in verdicts if v > 0.5)
    losses_ = sum(1 for v in verdicts if v < 0.5)
    ties = len(verdicts) - wins - losses_
    n = len(verdicts)
    rate = (wins + ties / 2) / n if n else float("nan")
    lo, hi = wilson_interval(rate, n) if n else (float("nan"), float("nan"))
    return {"wins": wins, "ties": ties, "losses": losses_, "n": n, "win_rate": rate, "ci_low": lo, "ci_high": hi}


def agreement(verdicts: Sequence[float]) -> float:
    """Agreement with people on (chosen, rejected) matchups: the mean verdict for the chosen response."""
    return sum(verdicts) / len(verdicts) if verdicts else float("nan")
