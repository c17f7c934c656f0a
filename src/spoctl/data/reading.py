"""Step 1 of prepare: read every source and turn it into pairs per dimension.

Per source: read (checked, hashed), rename columns (`--columns`), detect the format (one info line saying what was
detected and why), convert, and keep the dimensions asked for. A source may give only some of its dimensions:
`--data harmless=pku.jsonl` takes only `harmless` from a PKU-SafeRLHF file (the DIM names one of the file's
dimensions), and `--data safety=pku.jsonl?dim=harmless` takes `harmless` under another name.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ..config import PrepareConfig
from ..console import Output
from ..errors import UsageError
from . import clean
from .formats import FORMATS, AdaptOptions, DimPairs, adapt, apply_columns, detect_format, split_columns
from .readers import Limits
from .records import Record
from .sources import Source, source_rows

# Records per block: a source is converted to pairs block by block, so its raw records are never all in memory
# (formats that group records across the file, helpsteer, keep them); streams check --max-pairs after each block.
STREAM_CHUNK = 1000


@dataclass
class Sourced:
    """The pairs one dimension got from its source (or, mixed, from several), before tokenization."""

    label: str  # the DIM of --data DIM=SOURCE (differs from the dimension for multi-dimension formats)
    source: Source
    fmt: str
    records: int
    source_hash: str
    pairs: DimPairs
    complete: bool = True  # False when a stream was stopped once --max-pairs was met
    parts: list[dict[str, Any]] = field(default_factory=list)  # a mixed dimension: one entry per source


def limits_of(cfg: PrepareConfig) -> Limits:
    return Limits(max_record_chars=cfg.max_record_chars, max_source_bytes=cfg.max_source_bytes)


def source_list(spec: Any) -> list[Any]:
    """`prepare.data.DIM`: one SOURCE, or a list of them (several sources mixed into one dimension)."""
    return list(spec) if isinstance(spec, list) else [spec]


def read_all(cfg: PrepareConfig, sources: dict[str, list[Source]], out: Output) -> dict[str, Sourced]:
    """Read and convert every source; several sources under one DIM are mixed, a dimension produced by two
    different DIMs is an error."""
    dims: dict[str, Sourced] = {}
    for label, group in sources.items():
        produced: dict[str, list[Sourced]] = {}
        for source in group:
            out.detail(f"reading {source.text}")
            for dim, sourced in read_source(cfg, label, source, out).items():
                produced.setdefault(dim, []).append(sourced)
        for dim, parts in produced.items():
            if dim in dims:
                prev, sourced = dims[dim], parts[0]
                raise UsageError(
                    f"dimension '{dim}' is produced twice: by --data {prev.label}={prev.source.text} ({prev.fmt})"
                    f" and by --data {label}={sourced.source.text} ({sourced.fmt}); give each dimension once (or"
                    f" repeat --data {dim}=SOURCE to mix several sources into it), or take one dimension of a"
                    f" multi-dimension source with --data {dim}=SOURCE or SOURCE?dim=NAME"
                )
            weighted = len(group) > 1 or group[0].spec.weight != 1  # one source with a weight: its sample
            dims[dim] = mix(dim, parts, cfg.seed, out) if weighted else parts[0]
    return dims


def mix(dim: str, parts: list[Sourced], seed: int, out: Output) -> Sourced:
    """One dimension from several sources: from each, a seeded sample of `weight` of its pairs (by a hash of each
    pair's id, so a pair's fate does not depend on the other sources); the rest is counted as `mix_weight`."""
    merged = DimPairs()
    info = []
    for part in parts:
        weight = part.source.spec.weight
        pairs = part.pairs.pairs
        take = len(pairs) if weight >= 1 else round(weight * len(pairs))
        if take < len(pairs):
            ranked = sorted(range(len(pairs)), key=lambda i: clean.rank(seed, "mix", clean.pair_id(pairs[i])))
            chosen = set(ranked[:take])
            pairs = [p for i, p in enumerate(pairs) if i in chosen]  # source order kept
        merged.pairs.extend(pairs)
        merged.dropped.update(part.pairs.dropped)
        if take < len(part.pairs.pairs):
            merged.dropped["mix_weight"] += len(part.pairs.pairs) - take
        info.append({"source": part.source.text, "format": part.fmt, "weight": weight, "read": part.records,
                     "candidates": part.pairs.candidates, "sampled": take, "hash": part.source_hash,
                     "complete": part.complete,
                     "where": part.pairs.pairs[0].where.path if part.pairs.pairs else None})  # how its pairs are located
    out.info(f"{dim}: mixing " + ", ".join(f"{i['sampled']:,} of {len(p.pairs.pairs):,} pairs from {i['source']}"
                                           for i, p in zip(info, parts)))
    digest = hashlib.sha256(json.dumps([[i["hash"], i["weight"]] for i in info]).encode()).hexdigest()
    fmts = sorted({p.fmt for p in parts})
    return Sourced(parts[0].label, parts[0].source, "+".join(fmts), sum(p.records for p in parts), digest, merged,
                   complete=all(p.complete for p in parts), parts=info)


class _Reader:
    """The format decision and conversion for one source (shared by whole reads and streams)."""

    def __init__(self, cfg: PrepareConfig, label: str, source: Source, out: Output):
        self.cfg, self.label, self.source, self.out = cfg, label, source, out
        given = source.spec.format or (cfg.format if cfg.format != "auto" else None)
        self.fmt: str | None = given
        if given:
            out.info(f"{source.text}: format {given} (given, not detected)")
        self.columns = source.spec.columns if source.spec.columns is not None else cfg.columns
        _, reverse = split_columns(self.columns)
        self.options = AdaptOptions(min_score_gap=cfg.min_score_gap, attributes=cfg.attributes, pairing=cfg.pairing,
                                    seed=cfg.seed, reverse=reverse)
        self.everything: list[str] = []  # every dimension the format gives, before selection

    def convert(self, records: list[Record]) -> dict[str, DimPairs]:
        records = apply_columns(records, self.columns)
        if self.fmt is None:
            detected = detect_format(records[0][1], records[0][0])
            self.out.info(detected.line(self.source.text))
            self.fmt = detected.format
        produced = adapt(self.fmt, records, self.label, self.options)
        self.everything = list(produced)
        return self.select(produced)

    @property
    def per_record(self) -> bool:
        return self.fmt is None or FORMATS[self.fmt].per_record

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
    """Rows block by block: a per-record format converts each block at once (raw records are dropped after their
    block), a grouped one keeps the rows and converts at the end. A stream with --max-pairs and a per-record format
    stops once every dimension has enough pairs that are neither ties nor duplicates (the length policy may still
    drop a few: see docs/prepare.md)."""
    reader = _Reader(cfg, label, source, out)
    rows = source_rows(source, limits_of(cfg), cfg.hub_split)
    can_stop = source.streaming and cfg.max_pairs is not None
    it = iter(rows)
    kept: list[Record] = []
    merged: dict[str, DimPairs] = {}
    usable: Counter = Counter()
    seen: dict[str, set[str]] = {}
    stopped = False
    while chunk := list(islice(it, STREAM_CHUNK)):
        if not reader.per_record:
            kept.extend(chunk)  # a grouped format pairs rows across the whole source: convert at the end
            continue
        for dim, part in reader.convert(chunk).items():
            merged.setdefault(dim, DimPairs()).extend(part)
            if can_stop:
                ids = seen.setdefault(dim, set())
                for p in part.pairs:
                    pid = clean.pair_id(p)
                    if p.chosen.strip() != p.rejected.strip() and pid not in ids:
                        ids.add(pid)
                        usable[dim] += 1
        if not reader.per_record:
            kept.extend(chunk)  # detected a grouped format on the first block: read on, convert at the end
            merged.clear()
            continue
        if can_stop and merged and all(usable[d] >= cfg.max_pairs for d in merged):  # type: ignore[operator]
            stopped = True
            break
    if kept:
        merged = reader.convert(kept)
        del kept
    if not merged:
        raise UsageError(f"{getattr(rows, 'label', source.text)}: the stream gave no rows")
    reader.announce(merged)
    if stopped:
        reader.out.info(f"{rows.label}: streamed {rows.read:,} rows, enough for --max-pairs {cfg.max_pairs}")
    return {d: Sourced(label, source, reader.fmt or "", rows.read, rows.sha256, p, complete=not stopped)
            for d, p in merged.items()}
