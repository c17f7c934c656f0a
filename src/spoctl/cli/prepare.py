"""`spoctl prepare`."""

from __future__ import annotations

import typer

from ..config import PrepareConfig
from ..errors import UsageError
from .common import CommonOptions, command, execute
from .flags import Flag

PREPARE_FLAGS = [
    Flag("data", ("--data", "-d"), "pairs", metavar="DIM=SOURCE", example="helpful=hh/helpful.jsonl.gz",
         collect=True,
         note="Repeatable; options after '?': helpful=hh.jsonl, helpful=owner/name?split=test&data_dir=...&dim=...; "
              "the same DIM again mixes sources (?weight=0.3: that share of a source's pairs) "
              "(docs/data-formats.md)."),
    Flag("format", ("--format", "-f")),
    Flag("columns", ("--columns",), metavar="FIELD=COLUMN,...", convert=lambda text: parse_columns(text),
         note="On the command line: FIELD=COLUMN,..., e.g. prompt=question,chosen=good,rejected=bad."),
    Flag("model", ("--model", "-m"), metavar="MODEL"),
    Flag("out", ("--out", "-o"), type=str, metavar="PATH"),  # "" reaches the config's own message
    Flag("length.max_length", ("--max-length",)),
    Flag("length.max_prompt_tokens", ("--max-prompt-tokens",)),
    Flag("length.overflow", ("--overflow",)),
    Flag("length.prompt_truncation", ("--prompt-truncation",)),
    Flag("eval_fraction", ("--eval-fraction",)),
    Flag("max_pairs", ("--max-pairs",)),
    Flag("seed", ("--seed",)),
    Flag("force", ("--force",), "on"),
]


@command(config=PrepareConfig, flags=PREPARE_FLAGS, examples=[
    "spoctl prepare --data helpful=hh/helpful.jsonl.gz --data harmless=hh/harmless.jsonl.gz"
    " --model HuggingFaceTB/SmolLM2-135M-Instruct --out prepared/",
])
def prepare(
    debug: bool = typer.Option(False, "--debug", help="Print a few rendered examples exactly as the model sees them."),
    *,
    opts: CommonOptions,
) -> None:
    """Turn raw preference data into per-dimension, tokenized, split datasets for `spoctl align`."""
    out = opts.output

    def build() -> PrepareConfig:
        cfg = opts.resolve(PrepareConfig, "prepare")
        if not cfg.data and not opts.print_config:
            raise UsageError("no data given: pass --data DIM=SOURCE (repeatable) or set prepare.data in --config")
        return cfg

    def act(cfg: PrepareConfig) -> dict:
        from ..data.prepare import prepare as run_prepare

        return run_prepare(cfg, out, debug=debug)

    execute(opts, build, "prepare", act)


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
