"""`ultrafeedback`: openbmb/UltraFeedback as published (not binarized): one instruction, several completions, each
rated per aspect by GPT-4:

    {"instruction": "...", "completions": [{"response": "...", "annotations": {
        "instruction_following": {"Rating": "5", "Rationale": "..."}, "honesty": {"Rating": "4", ...},
        "truthfulness": {"Rating": "5", "Type": [...], ...}, "helpfulness": {"Rating": "4", ...}}, ...}, ...], ...}

Every aspect becomes a dimension (the aspects of the first record's first rated completion, or `attributes`), so one
source gives four SPO stages. Ratings are numbers or numeric strings; "N/A" means not rated (counted as `unrated`).
Within an instruction, pairs follow the rule in spoctl.data.formats.ranking.
"""

from __future__ import annotations

from typing import Any

from ...errors import UsageError
from ..records import Record, Where, json_type_name, key_list, printable
from .fields import DimPairs, required, text, user, with_system
from .ranking import pair_scored, rating


def adapt_ultrafeedback(records: list[Record], dim: str, opts: Any) -> dict[str, DimPairs]:
    aspects = _aspects(records, getattr(opts, "attributes", None))
    reverse = getattr(opts, "reverse", frozenset())
    out = {a: DimPairs() for a in aspects}
    for where, rec in records:
        prompt = with_system(rec, where, [user(text(required(rec, "instruction", where), where, "instruction",
                                                    "instruction"))])
        completions = required(rec, "completions", where)
        if not isinstance(completions, list):
            raise where.error(f"expected a list of completions, got {json_type_name(completions)}", field="completions")
        rows = [_completion(c, i, where, aspects) for i, c in enumerate(completions)]
        for a in aspects:
            sign = -1.0 if a in reverse else 1.0
            scored = [(response, None if s[a] is None else sign * s[a]) for response, s in rows]
            pair_scored(prompt, scored, where, out[a], opts)
    return out


def _aspects(records: list[Record], wanted: list[str] | None) -> list[str]:
    """The aspects of the first completion that has annotations (or those asked for, checked against them)."""
    found: list[str] = []
    for _, rec in records:
        for c in rec.get("completions") or []:
            if isinstance(c, dict) and isinstance(c.get("annotations"), dict) and c["annotations"]:
                found = [str(k) for k in c["annotations"]]
                break
        if found:
            break
    if not found:
        where = records[0][0]
        raise where.error("no completion has annotations with ratings (e.g. annotations.helpfulness.Rating)",
                          field="completions")
    if wanted is None:
        return found
    missing = [a for a in wanted if a not in found]
    if missing:
        raise UsageError(f"attributes: {key_list(missing)} not found among the UltraFeedback aspects in"
                         f" {records[0][0].path}; it has: {key_list(found)}")
    return list(wanted)


def _completion(c: Any, i: int, where: Where, aspects: list[str]) -> tuple[str, dict[str, float | None]]:
    name = f"completions[{i}]"
    if not isinstance(c, dict):
        raise where.error(f"expected a completion object, got {json_type_name(c)}", field=name)
    if "response" not in c:
        raise where.error(f"missing field (the completion has: {key_list(c)})", field=f"{name}.response")
    response = text(c["response"], where, f"{name}.response")
    notes = c.get("annotations")
    if not isinstance(notes, dict):
        raise where.error(f"expected an object of per-aspect ratings, got {json_type_name(notes)}",
                          field=f"{name}.annotations")
    scores: dict[str, float | None] = {}
    for a in aspects:
        field = f"{name}.annotations.{printable(a)}"
        note = notes.get(a)
        value = note.get("Rating") if isinstance(note, dict) else note
        try:
            scores[a] = rating(value)
        except ValueError:
            raise where.error(f"expected a numeric rating or N/A, got {printable(repr(value))}", field=field) from None
    return response, scores
