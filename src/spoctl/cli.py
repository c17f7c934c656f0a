"""The `spoctl` command line: a thin Typer layer that parses, calls the library, and prints.

Every subcommand follows the same conventions: `--config FILE` (YAML, one section per subcommand), `--set KEY=VALUE`
overrides, `--print-config`, `--json` (one JSON result on stdout), `--quiet`, `--verbose`, and exit codes
0 (success), 1 (a check failed), 2 (usage or input error).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from . import __version__
from .config import AlignConfig, PrepareConfig, StrictModel, dump_config, resolve_config
from .console import Output
from .errors import EXIT_USAGE, SpoctlError, UsageError

app = typer.Typer(
    name="spoctl",
    help="Align a causal LM to several preference dimensions in sequence with Sequential Preference Optimization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Options shared by every subcommand (Typer has no option inheritance, so each command lists them).
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (sections: prepare, align, eval, export).")
SetOpt = typer.Option(None, "--set", help="Override any config key: --set KEY=VALUE (repeatable).")
PrintConfigOpt = typer.Option(False, "--print-config", help="Print the resolved configuration and exit.")
JsonOpt = typer.Option(False, "--json", help="Print one machine-readable JSON result on stdout.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Only warnings and errors.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="More detail.")


def _version_callback(value: bool) -> None:
    if value:
        print(f"spoctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version."),
) -> None:
    pass


def _run(out: Output, fn: Callable[[], Any]) -> Any:
    """Call library code and turn spoctl errors into a one-paragraph message and an exit code."""
    try:
        return fn()
    except SpoctlError as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None


def _print_config(out: Output, cfg: StrictModel, section: str) -> None:
    if out.json_mode:
        out.result({section: cfg.model_dump(mode="json")})
    else:
        sys.stdout.write(dump_config(cfg, section))


def parse_dim_sources(items: list[str] | None) -> dict[str, str] | None:
    """`--data helpful=a.jsonl --data harmless=b.jsonl` -> {helpful: a.jsonl, harmless: b.jsonl} (order kept)."""
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        dim, sep, source = item.partition("=")
        if not sep or not dim.strip() or not source.strip():
            raise UsageError(f"--data {item!r}: expected DIM=SOURCE, e.g. --data helpful=hh/helpful.jsonl.gz")
        dim = dim.strip()
        if dim in out:
            raise UsageError(f"--data: dimension '{dim}' is given twice ({out[dim]} and {source}); give each dimension once")
        out[dim] = source.strip()
    return out


# --------------------------------------------------------------------------------------------- prepare
@app.command(
    epilog="Example:\n\n  spoctl prepare --data helpful=hh/helpful.jsonl.gz --data harmless=hh/harmless.jsonl.gz"
    " --model HuggingFaceTB/SmolLM2-135M-Instruct --out prepared/"
)
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
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    print_config: bool = PrintConfigOpt,
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Turn raw preference data into per-dimension, tokenized, split datasets for `spoctl align`."""
    out = Output(json_mode=json_, quiet=quiet, verbose=verbose)

    def build() -> PrepareConfig:
        flags = {
            "data": parse_dim_sources(data),
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
        cfg = resolve_config(PrepareConfig, "prepare", config, set_, flags)
        if not cfg.data and not print_config:
            raise UsageError("no data given: pass --data DIM=SOURCE (repeatable) or set prepare.data in --config")
        return cfg

    cfg = _run(out, build)
    if print_config:
        _print_config(out, cfg, "prepare")
        return
    from .data.prepare import prepare as run_prepare

    result = _run(out, lambda: run_prepare(cfg, out, debug=debug))
    out.result(result)


# --------------------------------------------------------------------------------------------- align
@app.command(
    epilog="Examples:\n\n  spoctl align --dims helpful,harmless --data prepared/ --model ./smollm2 --lora --out runs/hh\n\n"
    "  spoctl align --dims helpful,harmless --data prepared/ --alpha 0    # sequential DPO baseline\n\n"
    "  spoctl align --dims helpful,harmless --data prepared/ --out runs/hh --resume"
)
def align(
    dims: Optional[str] = typer.Option(None, "--dims", help="Dimensions in stage order, comma-separated."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Prepared-data directory (from spoctl prepare)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: folder, .gguf or Hub id (default: the data's)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<timestamp>)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="previous (one alpha) | all (a weight per earlier dimension)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="SPO weight of earlier dimensions; 0 = sequential DPO."),
    beta: Optional[float] = typer.Option(None, "--beta", help="KL strength of every stage."),
    lora: Optional[bool] = typer.Option(None, "--lora/--full", help="Train LoRA adapters or all weights."),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs per stage."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Pairs per optimizer step (all processes)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap on optimizer steps per stage."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of batch order and adapter init."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run in --out."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    print_config: bool = PrintConfigOpt,
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Run one SPO stage per dimension, in order, checkpointing after each."""
    out = Output(json_mode=json_, quiet=quiet, verbose=verbose)

    def build() -> AlignConfig:
        flags = {
            "dims": [d.strip() for d in dims.split(",") if d.strip()] if dims else None,
            "data": str(data) if data else None,
            "model": model,
            "out": str(out_dir) if out_dir else None,
            "mode": mode,
            "alpha": alpha,
            "beta": beta,
            "lora.enabled": lora,
            "learning_rate": learning_rate,
            "epochs": epochs,
            "batch_size": batch_size,
            "max_steps": max_steps,
            "seed": seed,
            "resume": True if resume else None,
        }
        return resolve_config(AlignConfig, "align", config, set_, flags)

    cfg = _run(out, build)
    if print_config:
        _print_config(out, cfg, "align")
        return
    from .engine.align import align as run_align

    result = _run(out, lambda: run_align(cfg, out))
    out.result(result)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as exc:
        # Click exits 2 for usage errors already; keep every other code as is.
        raise
    except Exception:  # an unexpected bug: show it, but with a distinct exit code
        raise


if __name__ == "__main__":
    main()
