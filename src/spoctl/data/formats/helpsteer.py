"""`helpsteer`: rows of (prompt, response, numeric ratings), HelpSteer2 style. Every rating attribute becomes a
dimension; within a prompt, every two responses whose scores differ by at least `min_score_gap` make a pair."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from ...errors import UsageError
from ..records import Record, Where, json_type_name, key_list, printable
from .fields import DimPairs, Message, TextPair, required, text, user, with_system


def numeric_attributes(record: dict[str, Any]) -> list[str]:
    return [k for k, v in record.items() if k not in ("prompt", "response", "system") and is_number(v)]


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def helpsteer_attributes(first: dict[str, Any], where: Where, wanted: list[str] | None) -> list[str]:
    """The attributes that become dimensions: `wanted` (checked) or every numeric field of the first record."""
    found = numeric_attributes(first)
    if wanted is None:
        if not found:
            raise where.error("no numeric rating fields (e.g. helpfulness, correctness) next to prompt/response")
        return found
    missing = [a for a in wanted if a not in found]
    if missing:
        raise UsageError(
            f"attributes: {key_list(missing)} not found as numeric fields in {where.path}; it has: {key_list(found)}"
        )
    return list(wanted)


def adapt_helpsteer(records: list[Record], dim: str, cfg: Any) -> dict[str, DimPairs]:
    first_where, first = records[0]
    attrs = helpsteer_attributes(first, first_where, getattr(cfg, "attributes", None))
    gap = float(getattr(cfg, "min_score_gap", 1.0))
    reverse = getattr(cfg, "reverse", frozenset())  # attributes where lower is better (--columns NAME=NAME:reverse)
    groups: dict[str, list[tuple[Where, str, dict[str, float]]]] = defaultdict(list)
    prompts: dict[str, list[Message]] = {}
    for where, rec in records:
        prompt_msgs = with_system(rec, where, [user(text(required(rec, "prompt", where), where, "prompt", "prompt"))])
        prompt = json.dumps(prompt_msgs, ensure_ascii=False)
        prompts.setdefault(prompt, prompt_msgs)
        response = text(required(rec, "response", where), where, "response")
        scores = {}
        for a in attrs:
            v = required(rec, a, where)
            if not is_number(v):
                raise where.error(f"expected a numeric rating, got {json_type_name(v)}", field=printable(a))
            scores[a] = -float(v) if a in reverse else float(v)
        groups[prompt].append((where, response, scores))
    out = {a: DimPairs() for a in attrs}
    for prompt, rows in groups.items():
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                (w_i, r_i, s_i), (_, r_j, s_j) = rows[i], rows[j]
                for a in attrs:
                    diff = s_i[a] - s_j[a]
                    if diff == 0 or abs(diff) < gap:
                        out[a].dropped["below_min_gap"] += 1
                        continue
                    chosen, rejected = (r_i, r_j) if diff > 0 else (r_j, r_i)
                    out[a].pairs.append(TextPair(prompts[prompt], chosen, rejected, w_i))
    return out
