"""An explicit column mapping for data in any other shape: `--columns prompt=question,chosen=good,rejected=bad`
(or `prepare.columns`) renames each record's columns to the fields a format reads, before detection.

A COLUMN may end with `:reverse` to state the opposite polarity of what its FIELD means by default: for a label
(`better_response_id`, `safer_response_id`, SHP's `labels`) that 1 marks the first response; for a rating (a
HelpSteer attribute, an UltraFeedback aspect) that lower is better, e.g. `verbosity=verbosity:reverse`.
"""

from __future__ import annotations

from ..records import Record, key_list

REVERSE = ":reverse"


def split_columns(columns: dict[str, str] | None) -> tuple[dict[str, str], frozenset[str]]:
    """({FIELD: COLUMN} without modifiers, the FIELDs stated as :reverse)."""
    mapping: dict[str, str] = {}
    reverse = set()
    for target, column in (columns or {}).items():
        if column.endswith(REVERSE):
            column = column[: -len(REVERSE)] or target  # `verbosity=:reverse` is `verbosity=verbosity:reverse`
            reverse.add(target)
        mapping[target] = column
    return mapping, frozenset(reverse)


def apply_columns(records: list[Record], columns: dict[str, str] | None) -> list[Record]:
    """Each record with COLUMN renamed to FIELD for every FIELD -> COLUMN; a missing column names the record."""
    columns, _ = split_columns(columns)
    if not columns:
        return records
    mapped_from = set(columns.values()) | set(columns)
    out = []
    for where, rec in records:
        renamed = {k: v for k, v in rec.items() if k not in mapped_from}
        for target, column in columns.items():
            if column not in rec:
                raise where.error(
                    f"no column {column!r} (mapped to '{target}' by --columns {target}={column});"
                    f" the record has: {key_list(rec)}"
                )
            renamed[target] = rec[column]
        out.append((where, renamed))
    return out
