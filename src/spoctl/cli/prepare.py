"""`spoctl prepare`."""

from __future__ import annotations

from typing import Optional

import typer

from ..config import PrepareConfig
from ..data.formats import describe as format_choices
from ..errors import UsageError
from .common import CommonOptions, command, execute, parse_assignments


@command(examples=[
    "spoctl prepare --data helpful=hh/helpful.jsonl.gz --data harmless=hh/harmless.jsonl.gz"
    " --model HuggingFaceTB/SmolLM2-135M-Instruct --out prepared/",
])
def prepare(
    data: Optional[list[str]] = typer.Option(
        None, "--data", "-d", help="DIM=SOURCE (repeatable): a local file, a dataset folder or a Hub dataset id, "
                                   "optionally with ?split=test&data_dir=...&dim=...; the same DIM again mixes "
                                   "sources (?weight=0.3: that share of a source's pairs) (docs/data-formats.md)."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help=format_choices() + "."),
    columns: Optional[str] = typer.Option(
        None, "--columns", help="FIELD=COLUMN,...: which columns hold the fields, e.g. prompt=question,chosen=good,rejected=bad."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Tokenizer and chat template: folder, .gguf file or Hub id."),
    out_dir: Optional[str] = typer.Option(None, "--out", "-o", metavar="PATH", help="Prepared-data directory (default: prepared)."),
    max_length: Optional[int] = typer.Option(None, help="Longest prompt + response, in tokens (default 1024)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longest prompt, in tokens (default: half of --max-length)."),
    overflow: Optional[str] = typer.Option(None, help="Over-long pairs: truncate or drop."),
    prompt_truncation: Optional[str] = typer.Option(
        None, help="How long prompts are cut: keep-system-and-recent (whole old turns first) or keep-end."),
    eval_fraction: Optional[float] = typer.Option(None, help="Share of each dimension held out for evaluation."),
    max_pairs: Optional[int] = typer.Option(None, help="Keep at most this many pairs per dimension."),
    seed: Optional[int] = typer.Option(None, help="Seed of the train/eval split."),
    force: bool = typer.Option(False, "--force", help="Replace an existing prepared-data directory (nothing else)."),
    debug: bool = typer.Option(False, "--debug", help="Print a few rendered examples exactly as the model sees them."),
    *,
    opts: CommonOptions,
) -> None:
    """Turn raw preference data into per-dimension, tokenized, split datasets for `spoctl align`."""
    out = opts.output

    def build() -> PrepareConfig:
        flags = {
            "data": parse_data(data),
            "format": format,
            "columns": parse_columns(columns),
            "model": model,
            "out": out_dir,
            "length.max_prompt_tokens": max_prompt_tokens,
            "length.max_length": max_length,
            "length.overflow": overflow,
            "length.prompt_truncation": prompt_truncation,
            "eval_fraction": eval_fraction,
            "max_pairs": max_pairs,
            "seed": seed,
            "force": True if force else None,
        }
        cfg = opts.resolve(PrepareConfig, "prepare", flags)
        if not cfg.data and not opts.print_config:
            raise UsageError("no data given: pass --data DIM=SOURCE (repeatable) or set prepare.data in --config")
        return cfg

    def act(cfg: PrepareConfig) -> dict:
        from ..data.prepare import prepare as run_prepare

        return run_prepare(cfg, out, debug=debug)

    execute(opts, build, "prepare", act)


def parse_data(items: list[str] | None) -> dict[str, str | list[str]] | None:
    """`--data DIM=SOURCE` (repeatable); a DIM given again adds a source to mix into that dimension."""
    if not items:
        return None
    grouped: dict[str, list[str]] = {}
    for item in items:
        for key, raw in parse_assignments([item], "--data", "helpful=hh/helpful.jsonl.gz").items():  # type: ignore[union-attr]
            if raw in grouped.get(key, []):
                raise UsageError(f"--data: dimension '{key}' is given twice with the same source {raw}; give each"
                                 " source once (different sources under one DIM are mixed into that dimension)")
            grouped.setdefault(key, []).append(raw)
    return {k: v[0] if len(v) == 1 else v for k, v in grouped.items()}


def parse_columns(text: str | None) -> dict[str, str] | None:
    """'prompt=question,chosen=good' -> {'prompt': 'question', 'chosen': 'good'}."""
    if text is None:
        return None
    mapping: dict[str, str] = {}
    for item in text.split(","):
        field, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not field or not column:
            raise UsageError(f"--columns {text!r}: expected FIELD=COLUMN,..., e.g. --columns prompt=question,chosen=good,rejected=bad")
        if field in mapping:
            raise UsageError(f"--columns: field {field!r} is given twice")
        mapping[field] = column
    return mapping
