"""`spoctl prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import PrepareConfig
from ..errors import UsageError
from .common import CommonOptions, command, execute, parse_assignments

@command(examples=[
    "spoctl prepare --data helpful=hh/helpful.jsonl.gz --data harmless=hh/harmless.jsonl.gz"
    " --model HuggingFaceTB/SmolLM2-135M-Instruct --out prepared/",
])
def prepare(
    data: Optional[list[str]] = typer.Option(None, "--data", "-d", help="DIM=SOURCE (repeatable): a local file or a Hub dataset id."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="auto | pairwise | hh-rlhf | pku-saferlhf | helpsteer."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Tokenizer and chat template: folder, .gguf file or Hub id."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Prepared-data directory (default: prepared)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longest prompt, in tokens."),
    max_length: Optional[int] = typer.Option(None, help="Longest prompt + response, in tokens."),
    overflow: Optional[str] = typer.Option(None, help="Over-long pairs: truncate or drop."),
    eval_fraction: Optional[float] = typer.Option(None, help="Share of each dimension held out for evaluation."),
    max_pairs: Optional[int] = typer.Option(None, help="Keep at most this many pairs per dimension."),
    seed: Optional[int] = typer.Option(None, help="Seed of the train/eval split."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    debug: bool = typer.Option(False, "--debug", help="Print a few rendered examples exactly as the model sees them."),
    *,
    opts: CommonOptions,
) -> None:
    """Turn raw preference data into per-dimension, tokenized, split datasets for `spoctl align`."""
    out = opts.output

    def build() -> PrepareConfig:
        flags = {
            "data": parse_assignments(data, "--data", "helpful=hh/helpful.jsonl.gz"),
            "format": format,
            "model": model,
            "out": str(out_dir) if out_dir else None,
            "length.max_prompt_tokens": max_prompt_tokens,
            "length.max_length": max_length,
            "length.overflow": overflow,
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
