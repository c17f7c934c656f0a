"""What a `--data DIM=SOURCE` names, and reading it: a local file, a local dataset folder, or a Hub dataset.

SOURCE is `[hub:]LOCATION[?key=value&...]` (config.SourceSpec documents the keys) or, in a config file, the
long form `{source: LOCATION, split: ..., ...}`. Every record comes with a `Where` (file plus line or record
number) so that any later validation error can name exactly where the bad data is.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..config import SourceSpec
from ..errors import InputError, UsageError
from ..naming import is_hub_id
from .hubdata import DatasetRows
from .readers import FILE_KINDS, FileRecords, Limits, read_file
from .records import Record, RecordError, Where, json_type_name

__all__ = ["Source", "Limits", "Record", "RecordError", "Where", "json_type_name", "resolve_source", "read_records",
           "dataset_rows", "source_rows", "FILE_KINDS"]

# Suffixes that mark a SOURCE as a file path even if it does not exist (so the error says "does not exist").
FILE_LIKE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".gz", ".tsv", ".txt", ".arrow", ".zip", ".xz", ".bz2"}


@dataclass(frozen=True)
class Source:
    """A resolved SOURCE. `kind`: 'file', 'folder' (a local dataset repository) or 'hub'."""

    spec: SourceSpec
    kind: str
    path: Path | None = None
    file_kind: str | None = None  # jsonl | json | parquet | csv
    gzipped: bool = False

    @property
    def location(self) -> str:
        """The file, folder or Hub id as the user wrote it (without hub: and options)."""
        return self.spec.location

    @property
    def text(self) -> str:
        """SOURCE as written on the command line (the long form rendered as `location?key=value`)."""
        from urllib.parse import urlencode

        opts = {k: ",".join(v) if isinstance(v, list) else v for k, v in self.spec.dataset_options().items()}
        if self.spec.dim:
            opts["dim"] = self.spec.dim
        if self.spec.weight != 1:
            opts["weight"] = f"{self.spec.weight:g}"
        return self.spec.source + (f"?{urlencode(opts)}" if opts else "")

    @property
    def streaming(self) -> bool:
        return self.kind != "file" and self.spec.streaming


def resolve_source(spec: str | SourceSpec, dim: str) -> Source:
    """Decide what SOURCE is, and check what can be checked without reading it."""
    if isinstance(spec, str):
        try:
            spec = SourceSpec.parse(spec)
        except ValueError as err:
            raise UsageError(f"--data {dim}=...: {err}") from None
    location = spec.location
    if spec.is_hub:
        if not is_hub_id(location):
            raise UsageError(f"--data {dim}={spec.source}: {location!r} is not a Hub dataset id (owner/name)")
        return Source(spec, "hub")
    p = Path(location).expanduser()
    if p.is_dir():
        return Source(spec, "folder", path=p)
    if p.exists():
        return _file_source(spec, p, dim)
    looks_like_path = (
        location.startswith((".", "/", "~"))
        or location.count("/") > 1  # a Hub id is `name` or `owner/name`
        or any(s.lower() in FILE_LIKE_SUFFIXES for s in p.suffixes)
        or not is_hub_id(location)
    )
    if looks_like_path:
        raise InputError(f"file does not exist (--data {dim}={spec.source})", path=location)
    return Source(spec, "hub")


def _file_source(spec: SourceSpec, p: Path, dim: str) -> Source:
    location = spec.location
    mode = os.stat(p).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise InputError("not a regular file (a device or socket); give a data file", path=location)
    if spec.dataset_options():
        raise UsageError(
            f"--data {dim}={spec.source}: {', '.join(spec.dataset_options())} only apply to a dataset folder or a"
            " Hub id, not to a file"
        )
    suffixes = [s.lower() for s in p.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    ext = suffixes[-2] if gz and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not gz else "")
    if ext not in FILE_KINDS:
        shown = "".join(suffixes[-2:] if gz else suffixes[-1:]) or "(none)"
        raise InputError(f"unsupported file extension {shown}; use {_ext_list()}, or a dataset folder", path=location)
    return Source(spec, "file", path=p, file_kind=FILE_KINDS[ext], gzipped=gz)


def _ext_list() -> str:
    return ", ".join(FILE_KINDS) + " (each optionally .gz)"


def check_size(source: Source, limits: Limits) -> None:
    """The cheap size check before any reading: a regular file larger than the limit is refused at once."""
    if source.kind == "file" and source.path is not None:
        st = os.stat(source.path)
        if stat.S_ISREG(st.st_mode) and st.st_size > limits.max_source_bytes:
            raise InputError(
                f"{st.st_size:,} bytes, larger than max_source_bytes ({limits.max_source_bytes:,}); its pairs are held"
                " in memory while preparing. Split the file, or raise the limit with --set max_source_bytes=4GB",
                path=source.location,
            )


def dataset_rows(source: Source, limits: Limits, default_split: str | None) -> DatasetRows:
    """The rows of a dataset folder or Hub id (iterate them; `.sha256` and `.read` follow as they are read)."""
    return DatasetRows(source.location, source.spec.dataset_options(), remote=source.kind == "hub",
                       default_split=default_split, limits=limits)


def source_rows(source: Source, limits: Limits, default_split: str | None) -> FileRecords | DatasetRows:
    """The records of any source, read as they are iterated; `.sha256` and `.read` follow (complete at the end)."""
    if source.kind == "file":
        assert source.path is not None and source.file_kind is not None
        return FileRecords(source.location, source.path, source.file_kind, source.gzipped, limits)
    return dataset_rows(source, limits, default_split)


def read_records(source: Source, limits: Limits | None = None, default_split: str | None = None) -> tuple[list[Record], str]:
    """All records of `source` with their locations, and a sha256 of the source content.

    Files hash their bytes (read once); datasets hash the canonical JSON of their rows.
    """
    limits = limits or Limits()
    if source.kind == "file":
        assert source.path is not None and source.file_kind is not None
        return read_file(source.location, source.path, source.file_kind, source.gzipped, limits)
    rows = dataset_rows(source, limits, default_split)
    records: list[Record] = list(rows)
    return records, rows.sha256
