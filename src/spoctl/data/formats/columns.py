"""An explicit column mapping for data in any other shape: `--columns prompt=question,chosen=good,rejected=bad`
(or `prepare.columns`) renames each record's columns to the fields a format reads, before detection."""

from __future__ import annotations

from ..records import Record, key_list


def apply_columns(records: list[Record], columns: dict[str, str] | None) -> list[Record]:
    """Each record with COLUMN renamed to FIELD for every FIELD -> COLUMN; a missing column names the record."""
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
