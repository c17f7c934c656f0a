"""`spoctl prepare`: raw preference data -> per-dimension, tokenized, cleaned, split datasets plus a manifest.

Order of work, cheapest checks first so that bad input fails in seconds:
  1. the output directory and every SOURCE (exists, extension) are checked;
  2. every source is read, validated and converted to pairs (errors name file, line/record, field);
  3. the tokenizer is loaded (slow for GGUF files) and each dimension is rendered, length-checked, de-duplicated,
     capped and split;
  4. everything is written to a temporary directory that is renamed to --out only when complete.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import PrepareConfig
from ..console import Output
from ..errors import InputError, UsageError
from ..fsutil import atomic_directory, write_json_atomic
from . import clean
from .formats import DimPairs, TextPair, adapt, detect_format
from .render import Renderer, fit_length
from .sources import Source, read_records, resolve_source
from .store import COLUMNS, FORMAT_VERSION, PREPARED_MANIFEST, TOKEN_COLUMNS, features, split_hash

DEBUG_EXAMPLES = 3
TOKENIZE_CHUNK = 512
LENGTH_DROPS = ("prompt_too_long", "too_long", "tie_after_truncation")


@dataclass
class Sourced:
    """The pairs one dimension got from its source, before tokenization."""

    label: str  # the DIM of --data DIM=SOURCE (differs from the dimension for multi-dimension formats)
    source: Source
    fmt: str
    records: int
    source_hash: str
    pairs: DimPairs


@dataclass
class Built:
    """One finished dimension: its rows per split and its manifest entry."""

    dim: str
    splits: dict[str, dict[str, list]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def prepare(cfg: PrepareConfig, out: Output, debug: bool = False) -> dict[str, Any]:
    """Run the whole preparation; returns the JSON-able summary printed by `--json`."""
    if not cfg.model:
        raise UsageError(
            "no model given: pass --model (a Hugging Face folder, a .gguf file or a Hub id) so that prompts are"
            " rendered with that model's tokenizer and chat template"
        )
    if not cfg.data:
        raise UsageError("no data given: pass --data DIM=SOURCE (repeatable) or set prepare.data in --config")
    out_dir = Path(cfg.out)
    replace = check_out_dir(out_dir, cfg.force)
    sources = {label: resolve_source(spec, label) for label, spec in cfg.data.items()}
    dims = read_all(cfg, sources, out)

    from ..models import load_tokenizer, resolve_model_source, tokenizer_identity

    out.info(f"loading tokenizer from {cfg.model}")
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    renderer = Renderer(tok, cfg.model, cfg.system_prompt)
    if not renderer.has_template:
        out.warn(f"'{cfg.model}' has no chat template: prompts are rendered as plain '\\n\\nHuman: ... \\n\\nAssistant:' text")
    built = [build_dim(dim, s, renderer, cfg, out) for dim, s in dims.items()]

    model_src = resolve_model_source(cfg.model)
    manifest = {
        "format_version": FORMAT_VERSION,
        "spoctl_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # Local models are stored as absolute paths so `align` can find them from any working directory.
        "model": cfg.model if model_src.kind == "hub" else str(Path(cfg.model).expanduser().resolve()),
        "tokenizer": tokenizer_identity(tok, cfg.model),
        "chat_template": renderer.has_template,
        "columns": list(COLUMNS),
        "config": cfg.model_dump(mode="json"),
        "dimensions": {b.dim: b.info for b in built},
    }
    write_prepared(out_dir, built, manifest, replace)
    report(out, out_dir, built, renderer, debug)
    return {
        "out": str(out_dir),
        "manifest": str(out_dir / PREPARED_MANIFEST),
        "model": manifest["model"],
        "dims": [b.dim for b in built],
        "dimensions": {b.dim: summary(b.info) for b in built},
    }


def summary(info: dict[str, Any]) -> dict[str, Any]:
    """The --json view of one dimension's manifest entry."""
    return {k: info[k] for k in ("source", "format", "counts", "hashes")} | {"mean_tokens": info["tokens"]["total"]["mean"]}


# --------------------------------------------------------------------------------------------- steps
def check_out_dir(out_dir: Path, force: bool) -> bool:
    """Refuse to overwrite without --force, and never replace a folder that is not prepared data. Returns `replace`."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory; choose another --out")
    if not any(out_dir.iterdir()):
        return True
    if not force:
        raise UsageError(f"{out_dir}: already exists and is not empty; pass --force to replace it, or choose another --out")
    if not (out_dir / PREPARED_MANIFEST).is_file():
        raise UsageError(
            f"{out_dir}: not replacing it even with --force, because it is not a spoctl prepared-data directory"
            f" (no {PREPARED_MANIFEST}); choose another --out"
        )
    return True


def read_all(cfg: PrepareConfig, sources: dict[str, Source], out: Output) -> dict[str, Sourced]:
    """Read and convert every source; a dimension produced twice is an error."""
    dims: dict[str, Sourced] = {}
    for label, source in sources.items():
        out.detail(f"reading {source.spec}")
        records, digest = read_records(source, hub_split=cfg.hub_split)
        fmt = cfg.format if cfg.format != "auto" else detect_format(records[0][1], records[0][0])
        produced = adapt(fmt, records, label, cfg)
        if len(produced) > 1 or label not in produced:
            out.info(f"{source.spec}: {fmt} gives dimension{'s' if len(produced) > 1 else ''} {', '.join(produced)}")
        for dim, pairs in produced.items():
            if dim in dims:
                prev = dims[dim]
                raise UsageError(
                    f"dimension '{dim}' is produced twice: by --data {prev.label}={prev.source.spec} ({prev.fmt})"
                    f" and by --data {label}={source.spec} ({fmt}); give each dimension once"
                )
            dims[dim] = Sourced(label, source, fmt, len(records), digest, pairs)
    return dims


def build_dim(dim: str, s: Sourced, renderer: Renderer, cfg: PrepareConfig, out: Output) -> Built:
    """Clean, tokenize, apply the length policy, cap and split one dimension."""
    dropped = Counter(s.pairs.dropped)
    kept = clean.remove_ties_and_duplicates(s.pairs.pairs, dropped)
    order = clean.selection_order([pid for pid, _ in kept], cfg.max_pairs, cfg.seed)
    limit = cfg.max_pairs or len(kept)
    rows: list[tuple[int, str, TextPair, Any]] = []
    # Tokenize in chunks and stop once the cap is met: with --max-pairs only what is needed gets tokenized.
    for start in range(0, len(order), TOKENIZE_CHUNK):
        if len(rows) >= limit:
            break
        chunk = [(i, *kept[i]) for i in order[start : start + TOKENIZE_CHUNK]]
        chunk_pairs = [pair for _, _, pair in chunk]
        prompt_ids = renderer.prompt_ids(chunk_pairs)
        chosen_ids = renderer.completion_ids([p.chosen for p in chunk_pairs])
        rejected_ids = renderer.completion_ids([p.rejected for p in chunk_pairs])
        for (i, pid, pair), p, c, r in zip(chunk, prompt_ids, chosen_ids, rejected_ids):
            if len(rows) >= limit:
                break
            fitted = fit_length(p, c, r, cfg.length)
            if fitted.drop:
                dropped[fitted.drop] += 1
            else:
                rows.append((i, pid, pair, fitted))
    capped = len(kept) - len(rows) - sum(dropped[r] for r in LENGTH_DROPS)
    if capped:
        dropped["max_pairs"] += capped
    rows = [row[1:] for row in sorted(rows, key=lambda row: row[0])]  # back to file order
    truncated = sum(f.truncated for _, _, f in rows)
    if not rows:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())) or "none"
        raise InputError(
            f"dimension '{dim}' would keep no pairs ({s.pairs.candidates} candidates; dropped: {reasons});"
            " check the format and the length limits (--max-length, --max-prompt-tokens, --overflow)",
            path=s.source.spec,
        )
    eval_ids = clean.split_ids([(pid, clean.prompt_key(pair)) for pid, pair, _ in rows], cfg.eval_fraction, cfg.seed)
    if not eval_ids:
        out.warn(f"{dim}: only {len(rows)} pair, so no eval pair is held out")

    built = Built(dim)
    for name in ("train", "eval"):
        part = [row for row in rows if (row[0] in eval_ids) == (name == "eval")]
        built.splits[name] = columns(part, renderer)
    fitted_all = [f for _, _, f in rows]
    built.info = {
        "source": s.source.spec,
        "source_kind": s.source.kind,
        "data_key": s.label,
        "format": s.fmt,
        "counts": {
            "read": s.records,
            "candidates": s.pairs.candidates,
            "kept": len(rows),
            "train": len(rows) - len(eval_ids),
            "eval": len(eval_ids),
            "dropped": dict(sorted(dropped.items())),
            "truncated": truncated,
        },
        "tokens": {
            "prompt": clean.length_stats([len(f.prompt) for f in fitted_all]),
            "chosen": clean.length_stats([len(f.chosen) for f in fitted_all]),
            "rejected": clean.length_stats([len(f.rejected) for f in fitted_all]),
            "total": clean.length_stats([len(f.prompt) + max(len(f.chosen), len(f.rejected)) for f in fitted_all]),
        },
        "hashes": {"source": s.source_hash, **{name: split_hash(*token_columns(built.splits[name])) for name in built.splits}},
        "paths": {name: f"{dim}/{name}" for name in ("train", "eval")},
    }
    return built


def columns(rows: list[tuple[str, TextPair, Any]], renderer: Renderer) -> dict[str, list]:
    """The split's columns (see store.COLUMNS), rows in source order."""
    return {
        "pair_id": [pid for pid, _, _ in rows],
        "prompt_input_ids": [f.prompt for _, _, f in rows],
        "chosen_input_ids": [f.chosen for _, _, f in rows],
        "rejected_input_ids": [f.rejected for _, _, f in rows],
        "prompt": [renderer.decode(f.prompt) for _, _, f in rows],
        "chosen": [p.chosen for _, p, _ in rows],
        "rejected": [p.rejected for _, p, _ in rows],
        "prompt_messages": [json.dumps(renderer.messages(p.prompt), ensure_ascii=False) for _, p, _ in rows],
    }


def token_columns(cols: dict[str, list]) -> list[list]:
    return [cols[c] for c in ("pair_id", *TOKEN_COLUMNS)]


def write_prepared(out_dir: Path, built: list[Built], manifest: dict[str, Any], replace: bool) -> None:
    """Write every split and the manifest into a temporary sibling, then rename it to `out_dir`."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # keep stdout/stderr to spoctl's own messages
    try:
        with atomic_directory(out_dir, replace=replace) as tmp:
            feats = features()
            for b in built:
                for name, cols in b.splits.items():
                    # An empty split needs num_shards=1, or datasets writes no data file and cannot load it back.
                    shards = 1 if not cols["pair_id"] else None
                    datasets.Dataset.from_dict(cols, features=feats).save_to_disk(str(tmp / b.dim / name), num_shards=shards)
            write_json_atomic(tmp / PREPARED_MANIFEST, manifest)
    finally:
        if bars:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------- output
def report(out: Output, out_dir: Path, built: list[Built], renderer: Renderer, debug: bool) -> None:
    """The human summary table, drop reasons with --verbose, and rendered examples with --debug."""
    rows = []
    for b in built:
        c = b.info["counts"]
        dropped = sum(c["dropped"].values())
        mean = b.info["tokens"]["total"]["mean"]
        rows.append([b.dim, b.info["format"], c["kept"], c["train"], c["eval"], dropped, c["truncated"], mean])
        if c["dropped"]:
            out.detail(f"{b.dim}: dropped " + ", ".join(f"{n} {why}" for why, n in c["dropped"].items()))
    header = ["dimension", "format", "kept", "train", "eval", "dropped", "truncated", "mean tokens"]
    out.table(f"prepared data in {out_dir}", header, rows)
    if debug:
        for b in built:
            debug_examples(out, b, renderer)


def debug_examples(out: Output, b: Built, renderer: Renderer) -> None:
    """The first train pairs, decoded from the very ids the model will see."""
    train = b.splits["train"]
    for i in range(min(DEBUG_EXAMPLES, len(train["pair_id"]))):
        out.info(f"--- {b.dim} example {i + 1} (pair {train['pair_id'][i][:12]}) ---")
        for col in ("prompt", "chosen", "rejected"):
            ids = train[f"{col}_input_ids"][i]
            out.info(f"{col} ({len(ids)} tokens):")
            text = renderer.decode(ids)
            out.info(_escape(text) if out.is_terminal else text)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
