"""`spoctl prepare`: raw preference data -> per-dimension, tokenized, cleaned, split datasets plus a manifest.

Order of work, cheapest checks first so that bad input fails in seconds:
  1. every SOURCE is resolved and `--out` is checked (writable, replaceable with --force, not being read) and
     locked; source files are checked against the size limit;
  2. every source is read once, validated and converted to pairs (errors name file, line/record, field);
  3. the tokenizer is loaded (slow for GGUF files) and each dimension is rendered, length-fitted, de-duplicated,
     capped and split (spoctl.data.build);
  4. everything is written to a temporary folder that is renamed to --out only when complete; leftovers of
     crashed earlier runs for the same --out are then removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .. import __version__
from ..config import PrepareConfig
from ..console import Output
from ..errors import UsageError
from ..fsutil import write_json_atomic
from . import outdir
from .build import Built, build_dim
from .reading import limits_of, read_all, source_list
from .render import Renderer
from .sources import Source, check_size, resolve_source
from .store import COLUMNS, FORMAT_VERSION, PREPARED_MANIFEST, file_records

DEBUG_EXAMPLES = 3
SPOOL = ".spool"  # inside the temporary output folder: tokenized rows before they are split


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
    sources = {label: [resolve_source(one, label) for one in source_list(spec)] for label, spec in cfg.data.items()}
    every = [one for group in sources.values() for one in group]
    replace, old = outdir.claim(out_dir, cfg.force, outdir.source_paths(every))
    try:
        for source in every:
            check_size(source, limits_of(cfg))
        announce(out, cfg, every)
        dims = read_all(cfg, sources, out)

        from ..models import load_tokenizer, resolve_model_source, tokenizer_identity

        out.info(f"loading tokenizer from {cfg.model}")
        tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        renderer = Renderer(tok, cfg.model, cfg.system_prompt)
        if not renderer.has_template:
            out.warn(f"'{cfg.model}' has no chat template: prompts are rendered as plain '\\n\\nHuman: ... \\n\\nAssistant:' text")
        pairs = {dim: len(s.pairs.pairs) for dim, s in dims.items()}
        cap = f", at most {cfg.max_pairs:,} each" if cfg.max_pairs else ""
        out.info(f"tokenizing {sum(pairs.values()):,} pairs in {len(dims)} dimension{'s' if len(dims) > 1 else ''}"
                 f" ({', '.join(f'{d} {n:,}' for d, n in pairs.items())}{cap}), max_length {cfg.length.max_length}")

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
            "dimensions": {},
        }
        with _quiet_datasets(), outdir.writing(out_dir, replace) as tmp:
            # Tokenized rows are spooled inside the temporary folder, so a crash leaves nothing the next prepare of
            # this --out does not clean up; the spool is removed before the folder is put in place.
            spool = tmp / SPOOL
            spool.mkdir()
            built = []
            for dim in list(dims):
                b = build_dim(dim, dims.pop(dim), renderer, cfg, out, spool)  # pop: its pairs can go when built
                manifest["dimensions"][b.dim] = b.info
                write_splits(tmp, b)
                built.append(b)
            if debug:  # before the spool goes: the splits read from it
                for b in built:
                    debug_examples(out, b, renderer)
            for b in built:
                b.splits = {}
            shutil.rmtree(spool)
            write_json_atomic(tmp / PREPARED_MANIFEST, manifest)
    finally:
        if old is not None:
            old.release()
    for leftover in outdir.clean_stale_temps(out_dir):
        out.detail(f"removed {leftover}, left by an earlier prepare that did not finish")
    report(out, out_dir, built)
    return {
        "out": str(out_dir),
        "manifest": str(out_dir / PREPARED_MANIFEST),
        "model": manifest["model"],
        "dims": [b.dim for b in built],
        "dimensions": {b.dim: summary(b.info) for b in built},
    }


def announce(out: Output, cfg: PrepareConfig, sources: list[Source]) -> None:
    """What prepare will do, and a rough size, before the work starts."""
    sizes = [os.stat(s.path).st_size for s in sources if s.kind == "file" and s.path is not None and s.path.is_file()]
    size = f", {sum(sizes) / 2**20:,.1f} MiB of files" if sizes else ""
    out.info(f"preparing {len(cfg.data)} --data entr{'ies' if len(cfg.data) > 1 else 'y'} from {len(sources)}"
             f" source{'s' if len(sources) > 1 else ''}{size}: read and convert to pairs, then tokenize with"
             f" {cfg.model} into {cfg.out}")


def summary(info: dict[str, Any]) -> dict[str, Any]:
    """The --json view of one dimension's manifest entry."""
    return {k: info[k] for k in ("source", "format", "counts", "hashes")} | {"mean_tokens": info["tokens"]["total"]["mean"]}


def write_splits(tmp: Path, b: Built) -> None:
    """Write one dimension's splits into the temporary folder and record their files (bytes, sha256)."""
    files = {}
    for name, ds in b.splits.items():
        # An empty split needs num_shards=1, or datasets writes no data file and cannot load it back.
        shards = 1 if len(ds) == 0 else None
        folder = tmp / b.dim / name
        ds.save_to_disk(str(folder), num_shards=shards)
        files[name] = file_records(folder)
    b.info["files"] = files


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Keep stdout/stderr to spoctl's own messages (datasets' bars would interleave with ours)."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------- output
def report(out: Output, out_dir: Path, built: list[Built]) -> None:
    """The human summary table: per dimension the pairs kept and split, what was dropped by reason, the token
    lengths (median / p95 / max of prompt + the longer response) and what was truncated."""
    rows = []
    for b in built:
        c = b.info["counts"]
        rows.append([b.dim, b.info["format"], c["kept"], c["train"], c["eval"], dropped_text(c["dropped"]),
                     lengths_text(b.info["tokens"]["total"]), truncated_text(c)])
        if c["dropped"]:
            out.detail(f"{b.dim}: dropped " + ", ".join(f"{n} {why}" for why, n in c["dropped"].items()))
    header = ["dimension", "format", "kept", "train", "eval", "dropped", "tokens median/p95/max", "truncated"]
    out.table(f"prepared data in {out_dir}", header, rows)


def dropped_text(dropped: dict[str, int]) -> str:
    """'15: 9 prompt_mismatch, 4 empty_response, 2 tie' (largest first), or '0'."""
    total = sum(dropped.values())
    if not total:
        return "0"
    parts = sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"{total:,}: " + ", ".join(f"{n:,} {why}" for why, n in parts)


def lengths_text(stats: dict[str, float]) -> str:
    """'104 / 191 / 256': whole tokens (the manifest keeps the exact median and the interpolated p95)."""
    return f"{stats['median']:.0f} / {stats['p95']:.0f} / {stats['max']:.0f}"


def truncated_text(counts: dict[str, Any]) -> str:
    """'3 (2 turns dropped, 1 message cut)': pairs cut anywhere, then what keep-system-and-recent removed."""
    cut = counts["truncation"]
    detail = [f"{cut['turns_dropped']:,} turns dropped" if cut["turns_dropped"] else "",
              f"{cut['messages_cut']:,} messages cut" if cut["messages_cut"] else ""]
    detail = [d for d in detail if d]
    return f"{counts['truncated']:,}" + (f" ({', '.join(detail)})" if detail else "")


def debug_examples(out: Output, b: Built, renderer: Renderer) -> None:
    """The first train pairs, decoded from the very ids the model will see."""
    train = b.splits["train"]
    for i in range(min(DEBUG_EXAMPLES, len(train))):
        row = train[i]
        out.info(f"--- {b.dim} example {i + 1} (pair {row['pair_id'][:12]}) ---")
        for col in ("prompt", "chosen", "rejected"):
            ids = row[f"{col}_input_ids"]
            out.info(f"{col} ({len(ids)} tokens):")
            text = renderer.decode(ids)
            out.info(_escape(text) if out.is_terminal else text)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
