"""One raw record and where it came from: `Where` (file plus line or record number), the errors that point there,
and the checks every record passes before anything expensive sees it (field size, valid Unicode, nesting depth).

These checks run while reading, before the tokenizer is loaded: one 50 MB field drove the Rust tokenizer past
11 GB and into an abort, and a lone surrogate (`"\\ud800"` in JSON) only failed deep inside the tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

# Containers nested deeper than this are not chat data; refusing them also keeps every later walk shallow.
MAX_DEPTH = 64


class RecordError(InputError):
    """An InputError located by record number (Parquet, CSV, JSON list, dataset rows) instead of by line."""

    def __init__(self, message: str, *, path: str, record: int, field: str | None = None):
        super().__init__(message, path=path, field=field)
        self.record = record
        where = [str(path), f"record {record}"] + ([f"field '{field}'"] if field else [])
        self.args = (f"{': '.join(where)}: {message}",)


@dataclass(frozen=True, slots=True)  # one per pair held in memory: no per-instance __dict__
class Where:
    """Where a record came from; `unit` is 'line' (JSONL) or 'record' (1-based index in other sources)."""

    path: str
    unit: str
    index: int

    def __str__(self) -> str:
        return f"{self.path}: {self.unit} {self.index}"

    def error(self, message: str, field: str | None = None) -> InputError:
        if self.unit == "line":
            return InputError(message, path=self.path, line=self.index, field=field)
        return RecordError(message, path=self.path, record=self.index, field=field)


Record = tuple[Where, dict[str, Any]]


def json_type_name(obj: Any) -> str:
    """How a JSON value's type is named in error messages ('a string', 'null', ...)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)


def check_record(record: dict[str, Any], where: Where, max_chars: int) -> None:
    """Every string in the record: at most `max_chars` characters and valid Unicode; containers at most MAX_DEPTH deep.

    Iterative (an explicit stack), so a hostile record cannot exhaust Python's recursion limit here.
    """
    for key in record:
        _check_text(str(key), where, printable(str(key)), max_chars)
    stack: list[tuple[str, Any, int]] = [(printable(str(k)), v, 1) for k, v in record.items()]
    while stack:
        name, value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, where, name, max_chars)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise where.error(f"nested more than {MAX_DEPTH} levels deep; not preference data", field=name)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                stack.append((f"{name}.{printable(str(k))}" if isinstance(value, dict) else f"{name}[{k}]", v, depth + 1))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(name: str) -> str:
    """A name that prints on one line of an error message (control characters and lone surrogates escaped)."""
    name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], name)


def key_list(keys: Any) -> str:
    """'a, b, c' of a record's keys, sorted and printable ('no fields' when there are none)."""
    return ", ".join(printable(str(k)) for k in sorted(keys, key=str)) or "no fields"


def _check_text(text: str, where: Where, name: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise where.error(
            f"{len(text):,} characters, more than max_record_chars ({max_chars:,}); a text this long would take"
            " gigabytes to tokenize and is cut by the length policy anyway. Shorten it, drop the record, or raise"
            " the limit with --set max_record_chars=N",
            field=name,
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise where.error(
            f"not valid Unicode text: a lone surrogate {text[err.start]!r} at character {err.start}"
            " (JSON escapes like \\ud800 must come in high/low pairs)",
            field=name,
        ) from None
