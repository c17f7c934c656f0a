"""`pku-saferlhf`: PKU-SafeRLHF rows label the same two responses twice, so one file gives two dimensions:
`helpful` (chosen = response_<better_response_id>) and `harmless` (chosen = response_<safer_response_id>).

A file with only one of the two label columns (e.g. a two-response data set mapped with --columns) gives only that
dimension. `--columns better_response_id=COLUMN:reverse` states a label whose 1 means response_0 (SHP's `labels`).
"""

from __future__ import annotations

from typing import Any

from ..records import Record
from .fields import DimPairs, TextPair, required, text, user, with_system

PKU_KEYS = ("response_0", "response_1", "better_response_id", "safer_response_id")
# Which label column becomes which dimension.
PKU_DIMS = {"helpful": "better_response_id", "harmless": "safer_response_id"}


def adapt_pku(records: list[Record], dim: str, opts: Any) -> dict[str, DimPairs]:
    first = records[0][1]
    labels = {d: key for d, key in PKU_DIMS.items() if key in first} or PKU_DIMS
    reverse = getattr(opts, "reverse", frozenset())
    out = {d: DimPairs() for d in labels}
    for where, rec in records:
        prompt = with_system(rec, where, [user(text(required(rec, "prompt", where), where, "prompt", "prompt"))])
        responses = [text(required(rec, f"response_{i}", where), where, f"response_{i}") for i in (0, 1)]
        for d, key in labels.items():
            best = required(rec, key, where)
            if isinstance(best, bool) or not isinstance(best, int) or best not in (0, 1):
                raise where.error(f"expected 0 or 1, got {best!r}", field=key)
            if key in reverse:
                best = 1 - best
            out[d].pairs.append(TextPair(prompt, responses[best], responses[1 - best], where))
    return out
