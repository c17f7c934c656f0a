"""Step 1 of prepare: read every source and turn it into pairs per dimension.

Per source: read (checked, hashed), rename columns (`--columns`), detect the format (one info line saying what was
detected and why), convert, and keep the dimensions asked for. A source may give only some of its dimensions:
`--data harmless=pku.jsonl` takes only `harmless` from a PKU-SafeRLHF file (the DIM names one of the file's
dimensions), and `--data safety=pku.jsonl?dim=harmless` takes `harmless` under another name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import Any

from ..config import PrepareConfig
from ..console import Output
from ..errors import UsageError
from . import clean
from .formats import FORMATS, DimPairs, adapt, apply_columns, detect_format
from .readers import Limits
from .records import Record
from .sources import Source, dataset_rows, read_records

# Rows per step when streaming: after each step prepare checks whether --max-pairs is already met.
STREAM_CHUNK = 1000


@dataclass
class Sourced:
    """The pairs one dimension got from its source, before tokenization."""

    label: str  # the DIM of --data DIM=SOURCE (differs from the dimension for multi-dimension formats)
    source: Source
    fmt: str
    records: int
    source_hash: str
    pairs: DimPairs
    complete: bool = True  # False when a stream was stopped once --max-pairs was met


def limits_of(cfg: PrepareConfig) -> Limits:
    return Limits(max_record_chars=cfg.max_record_chars, max_source_bytes=cfg.max_source_bytes)


def read_all(cfg: PrepareConfig, sources: dict[str, Source], out: Output) -> dict[str, Sourced]:
    """Read and convert every source; a dimension produced twice is an error."""
    dims: dict[str, Sourced] = {}
    for label, source in sources.items():
        out.detail(f"reading {source.text}")
        for dim, sourced in read_source(cfg, label, source, out).items():
            if dim in dims:
                prev = dims[dim]
                raise UsageError(
                    f"dimension '{dim}' is produced twice: by --data {prev.label}={prev.source.text} ({prev.fmt})"
                    f" and by --data {label}={source.text} ({sourced.fmt}); give each dimension once, or take"
                    f" one dimension of a multi-dimension source with --data {dim}=SOURCE or SOURCE?dim=NAME"
                )
            dims[dim] = sourced
    return dims


class _Reader:
    """The format decision and conversion for one source (shared by whole reads and streams)."""

    def __init__(self, cfg: PrepareConfig, label: str, source: Source, out: Output):
        self.cfg, self.label, self.source, self.out = cfg, label, source, out
        given = source.spec.format or (cfg.format if cfg.format != "auto" else None)
        self.fmt: str | None = given
        if given:
            out.info(f"{source.text}: format {given} (given, not detected)")
        self.columns = source.spec.columns if source.spec.columns is not None else cfg.columns
        self.everything: list[str] = []  # every dimension the format gives, before selection

    def convert(self, records: list[Record]) -> dict[str, DimPairs]:
        records = apply_columns(records, self.columns)
        if self.fmt is None:
            detected = detect_format(records[0][1], records[0][0])
            self.out.info(detected.line(self.source.text))
            self.fmt = detected.format
        produced = adapt(self.fmt, records, self.label, self.cfg)
        self.everything = list(produced)
        return self.select(produced)

    def select(self, produced: dict[str, DimPairs]) -> dict[str, DimPairs]:
        wanted, text = self.source.spec.dim, self.source.text
        if wanted:
            if wanted not in produced:
                raise UsageError(f"--data {self.label}={text}: dim={wanted}, but {self.fmt} gives"
                                 f" {', '.join(produced)} from it")
            return {self.label: produced[wanted]}
        if len(produced) > 1 and self.label in produced:
            return {self.label: produced[self.label]}
        return produced

    def announce(self, produced: dict[str, Any]) -> None:
        everything = self.everything
        if self.source.spec.dim:
            self.out.info(f"{self.source.text}: taking its '{self.source.spec.dim}' pairs as dimension {self.label}")
        elif len(everything) > 1 and self.label in everything:
            others = [d for d in everything if d != self.label]
            self.out.info(f"{self.source.text}: taking only dimension {self.label} (the DIM of --data);"
                          f" it also has {', '.join(others)}")
        elif len(produced) > 1 or self.label not in produced:
            self.out.info(f"{self.source.text}: {self.fmt} gives dimension{'s' if len(produced) > 1 else ''}"
                          f" {', '.join(produced)}")


def read_source(cfg: PrepareConfig, label: str, source: Source, out: Output) -> dict[str, Sourced]:
    reader = _Reader(cfg, label, source, out)
    if source.streaming:
        return _read_stream(reader)
    records, digest = read_records(source, limits_of(cfg), cfg.hub_split)
    converted = reader.convert(records)
    reader.announce(converted)
    return {d: Sourced(label, source, reader.fmt or "", len(records), digest, p) for d, p in converted.items()}


def _read_stream(reader: _Reader) -> dict[str, Sourced]:
    """Rows as they arrive; with --max-pairs and a per-record format, stop once every dimension has enough pairs
    that are neither ties nor duplicates (the length policy may still drop a few: see docs/prepare.md)."""
    cfg, source = reader.cfg, reader.source
    rows = dataset_rows(source, limits_of(cfg), cfg.hub_split)
    it = iter(rows)
    kept: list[Record] = []
    merged: dict[str, DimPairs] = {}
    usable: Counter = Counter()
    seen: dict[str, set[str]] = {}
    stopped = False
    while chunk := list(islice(it, STREAM_CHUNK)):
        if cfg.max_pairs is None or (reader.fmt and not FORMATS[reader.fmt].per_record):
            kept.extend(chunk)
            continue
        for dim, part in reader.convert(chunk).items():
            merged.setdefault(dim, DimPairs()).extend(part)
            ids = seen.setdefault(dim, set())
            for p in part.pairs:
                pid = clean.pair_id(p)
                if p.chosen.strip() != p.rejected.strip() and pid not in ids:
                    ids.add(pid)
                    usable[dim] += 1
        if reader.fmt and not FORMATS[reader.fmt].per_record:
            kept.extend(chunk)  # detected a grouped format on the first chunk: read on, convert at the end
            merged.clear()
            continue
        if merged and all(usable[d] >= cfg.max_pairs for d in merged):
            stopped = True
            break
    if kept or not merged:
        merged = reader.convert(kept) if kept else merged
    if not merged:
        raise UsageError(f"{rows.label}: the stream gave no rows")
    reader.announce(merged)
    if stopped:
        reader.out.info(f"{rows.label}: streamed {rows.read:,} rows, enough for --max-pairs {cfg.max_pairs}")
    return {d: Sourced(reader.label, source, reader.fmt or "", rows.read, rows.sha256, p, complete=not stopped)
            for d, p in merged.items()}
