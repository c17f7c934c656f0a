"""The one rule that turns scored answers to one prompt (a ranked list, per-aspect ratings) into preference pairs.

For each prompt: the best-scored answer is `chosen` (the first of equals); every other answer is a candidate
`rejected` when its score is at least `min_score_gap` below the best. `pairing` says which candidates become pairs:
`each` (one pair per candidate) or `sampled` (one candidate per prompt, picked by a seeded hash of the prompt, so
the choice does not depend on the file's order). What does not become a pair is counted by reason:

- `score_tie`: scored the same as the chosen answer;
- `below_min_gap`: scored lower, but by less than `min_score_gap`;
- `not_sampled`: a candidate that `sampled` did not pick;
- `unrated`: an answer without a score for this dimension (UltraFeedback's "N/A");
- `too_few_answers`: a prompt with fewer than two rated answers (counted once per prompt).

A score is "higher is better" unless the dimension is named in `reverse` (a rank, or a rating stated as
`--columns NAME=COLUMN:reverse`): the caller passes scores already turned so that higher is better.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

from ..records import Where
from .fields import DimPairs, Message, TextPair

PAIRINGS = ("each", "sampled")


def pair_scored(prompt: list[Message], answers: Sequence[tuple[str, float | None]], where: Where, out: DimPairs,
                opts: Any) -> None:
    """Append the pairs of one prompt's (answer, score) list to `out` by the rule above (scores: higher is better)."""
    gap = float(getattr(opts, "min_score_gap", 1.0))
    pairing = getattr(opts, "pairing", "each")
    rated = [(text, score) for text, score in answers if score is not None]
    if len(rated) < len(answers):
        out.dropped["unrated"] += len(answers) - len(rated)
    if len(rated) < 2:
        out.dropped["too_few_answers"] += 1
        return
    best = max(range(len(rated)), key=lambda i: (rated[i][1], -i))  # the first of equal best scores
    chosen, top = rated[best]
    candidates = []
    for i, (text, score) in enumerate(rated):
        if i == best:
            continue
        diff = top - score  # type: ignore[operator]
        if diff == 0:
            out.dropped["score_tie"] += 1
        elif diff < gap:
            out.dropped["below_min_gap"] += 1
        else:
            candidates.append(text)
    if pairing == "sampled" and len(candidates) > 1:
        pick = _seeded_index(getattr(opts, "seed", 0), prompt, len(candidates))
        out.dropped["not_sampled"] += len(candidates) - 1
        candidates = [candidates[pick]]
    out.pairs.extend(TextPair(prompt, chosen, rejected, where) for rejected in candidates)


def _seeded_index(seed: int, prompt: list[Message], n: int) -> int:
    key = repr((seed, [(m["role"], m["content"]) for m in prompt])).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % n


def rating(value: Any) -> float | None:
    """A score as published: a number, or a numeric string ("4"); None for a missing rating ("N/A", "", null)."""
    if isinstance(value, bool):
        raise ValueError
    if value is None or (isinstance(value, str) and value.strip().upper() in ("", "N/A", "NA")):
        return None
    if not isinstance(value, (int, float, str)):
        raise ValueError
    score = float(value.strip() if isinstance(value, str) else value)
    if not math.isfinite(score):
        raise ValueError
    return score
