"""Reading local files (JSONL, JSON, Parquet, CSV, each optionally gzip'd) into located records.

Each file is opened once and hashed while it is read, so a FIFO (named pipe) works and a large file is read from
disk once. Sizes are guarded as bytes arrive (after decompression), so a gzip bomb or a device cannot exhaust
memory, and every record passes `check_record` before anything else sees it. JSONL is read line by line here (not
through `datasets`) so that every error can name its line.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import InputError
from .records import Record, Where, check_record, json_type_name

# Extensions spoctl reads, each optionally followed by `.gz`.
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Text columns a CSV must keep as strings even when every cell looks like a number.
CSV_TEXT_COLUMNS = ("prompt", "chosen", "rejected", "response", "response_0", "response_1", "instruction", "input")
BLOCK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Resource guards applied while reading (prepare.max_record_chars, prepare.max_source_bytes)."""

    max_record_chars: int = 200_000
    max_source_bytes: int = 2_000_000_000


class _HashingRaw(io.RawIOBase):
    """A raw binary stream that feeds every byte it passes on to a sha256."""

    def __init__(self, f: Any):
        self._f = f
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
        return n

    def drain(self) -> None:
        """Hash whatever the parser left unread (e.g. bytes after the last gzip member)."""
        while block := self._f.read(BLOCK):
            self.sha256.update(block)


class _Guard:
    """Counts decompressed bytes and stops at the limit with an error that names the setting."""

    def __init__(self, spec: str, limit: int):
        self.spec, self.limit, self.seen = spec, limit, 0

    def add(self, n: int) -> None:
        self.seen += n
        if self.seen > self.limit:
            raise InputError(
                f"larger than max_source_bytes ({self.limit:,} bytes after decompression); its pairs are held in"
                " memory while preparing. Split the file, or raise the limit with --set max_source_bytes=4GB",
                path=self.spec,
            )


class FileRecords:
    """The checked records of a local file, read as they are iterated (once); `sha256` and `read` are complete when
    the iteration ends. Records are not kept here, so a caller that converts them in blocks holds only a block."""

    def __init__(self, spec: str, path: Path, file_kind: str, gzipped: bool, limits: Limits):
        self.spec, self.path, self.file_kind, self.gzipped, self.limits = spec, path, file_kind, gzipped, limits
        self.sha256 = ""
        self.read = 0

    def __iter__(self) -> Iterator[Record]:
        spec, limits = self.spec, self.limits
        reader: Callable[[str, Any, _Guard], Iterator[Record]] = READERS[self.file_kind]
        guard = _Guard(spec, limits.max_source_bytes)
        try:
            with open(self.path, "rb", buffering=0) as raw_file:
                raw = _HashingRaw(raw_file)
                buffered = io.BufferedReader(raw, BLOCK)
                stream: Any = gzip.GzipFile(fileobj=buffered, mode="rb") if self.gzipped else buffered
                for where, rec in reader(spec, stream, guard):
                    check_record(rec, where, limits.max_record_chars)
                    self.read += 1
                    yield where, rec
                raw.drain()  # bytes a parser left unread (after the last gzip member) still belong to the file
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise InputError(f"not a valid gzip file ({err})", path=spec) from None
        except RecursionError:
            raise InputError("JSON nested too deeply to read (thousands of levels); not preference data", path=spec) from None
        except OSError as err:
            raise InputError(f"cannot read the file: {err.strerror or err}", path=spec) from None
        if not self.read:
            raise InputError("the file is empty: it holds no records", path=spec)
        self.sha256 = raw.sha256.hexdigest()


def read_file(spec: str, path: Path, file_kind: str, gzipped: bool, limits: Limits) -> tuple[list[Record], str]:
    """All records of a local file, checked, and the sha256 of its bytes."""
    rows = FileRecords(spec, path, file_kind, gzipped, limits)
    records = list(rows)
    return records, rows.sha256


def _read_all(stream: Any, guard: _Guard) -> bytes:
    parts = []
    while block := stream.read(BLOCK):
        guard.add(len(block))
        parts.append(block)
    return b"".join(parts)


def _read_jsonl(spec: str, stream: Any, guard: _Guard) -> Iterator[Record]:
    """One JSON object per line; decoding per line so that invalid UTF-8 is reported with its line number."""
    lineno = 0
    while True:
        # readline with a bound: a file without newlines (or a device) never becomes one giant line in memory.
        raw = stream.readline(guard.limit - guard.seen + 1)
        if not raw:
            return
        guard.add(len(raw))
        lineno += 1
        where = Where(spec, "line", lineno)
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
        except RecursionError:
            raise where.error("JSON nested too deeply to read; not preference data") from None
        if not isinstance(obj, dict):
            raise where.error(f"expected a JSON object per line, got {json_type_name(obj)}")
        yield where, obj


def _decode(spec: str, raw: bytes) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"invalid UTF-8 ({err.reason})", path=spec, line=line) from None


def _read_json(spec: str, stream: Any, guard: _Guard) -> Iterator[Record]:
    """A JSON document: a list of records, or an object with the records under "data"."""
    text = _decode(spec, _read_all(stream, guard))
    if not text.strip():
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"malformed JSON: {err.msg} (column {err.colno})", path=spec, line=err.lineno) from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise InputError(
            f'expected a list of records or {{"data": [...]}}, got {json_type_name(doc)}'
            " (for one object per line, name the file .jsonl)",
            path=spec,
        )
    yield from checked_rows(spec, doc)


def _read_parquet(spec: str, stream: Any, guard: _Guard) -> Iterator[Record]:
    import pyarrow.parquet as pq

    data = _read_all(stream, guard)
    try:
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ValueError, ... for damaged or odd files
        raise InputError(f"not a readable Parquet file ({type(err).__name__}: {_first_line(err)})", path=spec) from None
    yield from checked_rows(spec, rows)


def _read_csv(spec: str, stream: Any, guard: _Guard) -> Iterator[Record]:
    """CSV with a header row; numbers are inferred per column, but the text columns always stay strings."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    raw = _read_all(stream, guard)
    header = _decode(spec, raw).split("\n", 1)[0].strip().lstrip("\ufeff")
    if not raw.strip():
        return
    columns = [c.strip().strip('"') for c in header.split(",")]
    types = {c: pa.string() for c in columns if c in CSV_TEXT_COLUMNS}
    try:
        table = pacsv.read_csv(
            io.BytesIO(raw),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
        )
        rows = table.to_pylist()
    except Exception as err:  # pyarrow's CSV reader raises ArrowInvalid, ArrowTypeError, ValueError, ...
        raise InputError(f"not a readable CSV file ({type(err).__name__}: {_first_line(err)})", path=spec) from None
    yield from checked_rows(spec, rows)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else "no detail"


def checked_rows(spec: str, rows: Any) -> Iterator[Record]:
    """Rows of a table or list as located records; each must be an object."""
    for i, row in enumerate(rows, start=1):
        where = Where(spec, "record", i)
        if not isinstance(row, dict):
            raise where.error(f"expected an object, got {json_type_name(row)}")
        yield where, row


READERS: dict[str, Callable[[str, Any, _Guard], Iterator[Record]]] = {
    "jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv,
}
