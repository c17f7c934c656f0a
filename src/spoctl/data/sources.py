"""Reading raw preference records from a local file or a Hugging Face Hub dataset.

Every record comes with a `Where` (file plus line or record number) so that any later validation error can
name exactly where the bad data is. JSONL is read line by line here (not through `datasets`) for that reason.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from ..errors import InputError, UsageError
from ..fsutil import sha256_file
from ..naming import is_hub_id

# Extensions spoctl reads, each optionally followed by `.gz`.
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Text columns a CSV must keep as strings even when every cell looks like a number.
CSV_TEXT_COLUMNS = ("prompt", "chosen", "rejected", "response", "response_0", "response_1")
# Suffixes that mark a SOURCE as a file path even if it does not exist (so the error says "does not exist").
FILE_LIKE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".gz", ".tsv", ".txt", ".arrow", ".zip", ".xz", ".bz2"}
HUB_PROBE_TIMEOUT_S = 5.0


class RecordError(InputError):
    """An InputError located by record number (Parquet, CSV, JSON list, Hub rows) instead of by line."""

    def __init__(self, message: str, *, path: str, record: int, field: str | None = None):
        super().__init__(message, path=path, field=field)
        self.record = record
        where = [str(path), f"record {record}"] + ([f"field '{field}'"] if field else [])
        self.args = (f"{': '.join(where)}: {message}",)


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Source:
    """A resolved `--data DIM=SOURCE`: a local file (`kind='file'`) or a Hub dataset id (`kind='hub'`)."""

    spec: str
    kind: str
    path: Path | None = None
    file_kind: str | None = None  # jsonl | json | parquet | csv
    gzipped: bool = False


def resolve_source(spec: str, dim: str) -> Source:
    """Decide whether SOURCE is a local file or a Hub id, and check what can be checked without reading it."""
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir():
            raise InputError(
                f"is a directory; --data {dim}=SOURCE needs a file ({_ext_list()}) or a Hub dataset id", path=spec
            )
        return _file_source(spec, p)
    looks_like_path = (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1  # a Hub id is `name` or `owner/name`
        or any(s.lower() in FILE_LIKE_SUFFIXES for s in p.suffixes)
        or not is_hub_id(spec)
    )
    if looks_like_path:
        raise InputError(f"file does not exist (--data {dim}={spec})", path=spec)
    return Source(spec=spec, kind="hub")


def _file_source(spec: str, p: Path) -> Source:
    suffixes = [s.lower() for s in p.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    ext = suffixes[-2] if gz and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not gz else "")
    if ext not in FILE_KINDS:
        shown = "".join(suffixes[-2:] if gz else suffixes[-1:]) or "(none)"
        raise InputError(f"unsupported file extension {shown}; use {_ext_list()}", path=spec)
    return Source(spec=spec, kind="file", path=p, file_kind=FILE_KINDS[ext], gzipped=gz)


def _ext_list() -> str:
    return ", ".join(FILE_KINDS) + " (each optionally .gz)"


# --------------------------------------------------------------------------------------------- reading
def read_records(source: Source, *, hub_split: str = "train") -> tuple[list[tuple[Where, dict[str, Any]]], str]:
    """All records of `source` with their locations, and a sha256 of the source content.

    Files hash their bytes on disk; Hub datasets hash the canonical JSON of their rows.
    """
    if source.kind == "hub":
        return _read_hub(source.spec, hub_split)
    assert source.path is not None
    digest = sha256_file(source.path)
    reader = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}[source.file_kind]
    try:
        records = list(reader(source))
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise InputError(f"not a valid gzip file ({err})", path=source.spec) from None
    if not records:
        raise InputError("the file is empty: it holds no records", path=source.spec)
    return records, digest


def _open_bytes(source: Source) -> io.BufferedIOBase:
    assert source.path is not None
    return gzip.open(source.path, "rb") if source.gzipped else open(source.path, "rb")  # type: ignore[return-value]


def _read_jsonl(source: Source) -> Iterator[tuple[Where, dict[str, Any]]]:
    """One JSON object per line; decoding per line so that invalid UTF-8 is reported with its line number."""
    with _open_bytes(source) as f:
        for lineno, raw in enumerate(f, start=1):
            where = Where(source.spec, "line", lineno)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise where.error(f"invalid UTF-8 ({err.reason} at byte {err.start} of the line)") from None
            if not text.strip():
                continue  # blank lines (e.g. a trailing one) carry no record
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise where.error(f"malformed JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(obj, dict):
                raise where.error(f"expected a JSON object per line, got {json_type_name(obj)}")
            yield where, obj


def _read_json(source: Source) -> Iterator[tuple[Where, dict[str, Any]]]:
    """A JSON document: a list of records, or an object with the records under "data"."""
    with _open_bytes(source) as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"invalid UTF-8 ({err.reason})", path=source.spec, line=line) from None
    if not text.strip():
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"malformed JSON: {err.msg} (column {err.colno})", path=source.spec, line=err.lineno) from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise InputError(
            f'expected a list of records or {{"data": [...]}}, got {json_type_name(doc)}'
            " (for one object per line, name the file .jsonl)",
            path=source.spec,
        )
    yield from _checked_rows(source.spec, doc)


def _read_parquet(source: Source) -> Iterator[tuple[Where, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with _open_bytes(source) as f:
            table = pq.read_table(io.BytesIO(f.read()) if source.gzipped else f)
    except (pa.ArrowException, OSError) as err:
        if isinstance(err, (gzip.BadGzipFile, EOFError)):
            raise
        raise InputError(f"not a readable Parquet file ({err})", path=source.spec) from None
    yield from _checked_rows(source.spec, table.to_pylist())


def _read_csv(source: Source) -> Iterator[tuple[Where, dict[str, Any]]]:
    """CSV with a header row; numbers are inferred per column, but the text columns always stay strings."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with _open_bytes(source) as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"invalid UTF-8 ({err.reason})", path=source.spec, line=line) from None
    if not raw.strip():
        return
    header = raw.split(b"\n", 1)[0].decode("utf-8").strip().lstrip("\ufeff")
    columns = [c.strip().strip('"') for c in header.split(",")]
    types = {c: pa.string() for c in columns if c in CSV_TEXT_COLUMNS}
    try:
        table = pacsv.read_csv(
            io.BytesIO(raw),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
        )
    except pa.ArrowException as err:
        raise InputError(f"not a readable CSV file ({err})", path=source.spec) from None
    yield from _checked_rows(source.spec, table.to_pylist())


def _checked_rows(spec: str, rows: list[Any]) -> Iterator[tuple[Where, dict[str, Any]]]:
    for i, row in enumerate(rows, start=1):
        where = Where(spec, "record", i)
        if not isinstance(row, dict):
            raise where.error(f"expected an object, got {json_type_name(row)}")
        yield where, row


def json_type_name(obj: Any) -> str:
    """How a JSON value's type is named in error messages ('a string', 'null', ...)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)


# --------------------------------------------------------------------------------------------- the Hub
def _offline_env() -> bool:
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _hub_reachable() -> bool:
    """A quick TCP probe of the Hub endpoint, so an offline machine fails in seconds and not after minutes of retries.

    Skipped behind a proxy (a direct connection proving nothing there).
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _unreachable(spec: str, detail: str) -> UsageError:
    return UsageError(
        f"could not load Hub dataset '{spec}' (there is no local file of that name either):"
        f" the Hugging Face Hub could not be reached ({detail}). "
        f"Download the data and pass a local file instead, e.g. --data DIM=path/to/file.jsonl "
        f"(or set HF_DATASETS_OFFLINE=1 to use a copy already in the local datasets cache)"
    )


def _read_hub(spec: str, split: str) -> tuple[list[tuple[Where, dict[str, Any]]], str]:
    """Rows of split `split` of Hub dataset `spec`, via `datasets.load_dataset` (uses the local cache when offline)."""
    if not _offline_env() and not _hub_reachable():
        raise _unreachable(spec, "no network connection")
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError, HF errors...
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, ConnectionError) or "offline" in first.lower() or "reach" in first.lower():
            raise _unreachable(spec, first) from None
        raise UsageError(f"could not load Hub dataset '{spec}' (split '{split}'): {type(err).__name__}: {first}") from None
    label = f"{spec}[{split}]"
    h = hashlib.sha256()
    records = []
    for where, row in _checked_rows(label, list(ds)):
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
        records.append((where, row))
    if not records:
        raise InputError(f"split '{split}' is empty", path=spec)
    return records, h.hexdigest()
