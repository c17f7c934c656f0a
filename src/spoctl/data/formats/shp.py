"""`shp`: stanfordnlp/SHP (and SHP-2), two human comments to one post:

    {"history": "post", "human_ref_A": "comment A", "human_ref_B": "comment B", "labels": 1, "score_A": 52, ...}

`labels` is 1 when A is preferred and 0 when B is (the data set's card); so chosen = human_ref_A when labels is 1.
Mapping SHP onto PKU's `better_response_id` instead would invert every pair (there 1 means the second response):
state the polarity with `--columns better_response_id=labels:reverse` if you map it that way.
"""

from __future__ import annotations

from typing import Any

from ..records import Record
from .fields import DimPairs, TextPair, required, text, user, with_system

SHP_KEYS = ("history", "human_ref_A", "human_ref_B", "labels")


def adapt_shp(records: list[Record], dim: str, opts: Any) -> dict[str, DimPairs]:
    flip = "labels" in getattr(opts, "reverse", frozenset())
    out = DimPairs()
    for where, rec in records:
        prompt = with_system(rec, where, [user(text(required(rec, "history", where), where, "history", "prompt"))])
        a = text(required(rec, "human_ref_A", where), where, "human_ref_A")
        b = text(required(rec, "human_ref_B", where), where, "human_ref_B")
        label = required(rec, "labels", where)
        if isinstance(label, bool) or label not in (0, 1):
            raise where.error(f"expected 0 or 1 (1: human_ref_A is preferred), got {label!r}", field="labels")
        a_wins = (label == 1) != flip
        out.pairs.append(TextPair(prompt, a if a_wins else b, b if a_wins else a, where))
    return {dim: out}
