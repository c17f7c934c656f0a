"""Shared pieces of the `spoctl` command line: the Typer app, common options, error handling.

Every subcommand follows the same conventions: `--config FILE` (YAML, one section per subcommand), `--set KEY=VALUE`
overrides, `--print-config`, `--json` (one JSON result on stdout), `--quiet`, `--verbose`, and exit codes
0 (success), 1 (a check failed), 2 (usage or input error).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import typer

from .. import __version__
from ..config import StrictModel, dump_config
from ..console import Output
from ..errors import EXIT_CHECK_FAILED, SpoctlError, UsageError

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


def parse_assignments(items: list[str] | None, flag: str, example: str,
                      convert: Callable[[str], Any] = str) -> dict[str, Any] | None:
    """Repeatable `--flag KEY=VALUE` options -> {KEY: convert(VALUE)}, in order; each KEY at most once.

    Used by every DIM=... flag: `--data helpful=a.jsonl`, `--weight helpful=0.5`, `--fail-under helpful=0.6`.
    """
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise UsageError(f"{flag} {item!r}: expected DIM=VALUE, e.g. {flag} {example}")
        if key in out:
            raise UsageError(f"{flag}: dimension '{key}' is given twice; give each dimension once")
        try:
            out[key] = convert(raw)
        except ValueError:
            raise UsageError(f"{flag} {item!r}: {raw!r} is not a valid value, e.g. {flag} {example}") from None
    return out


def execute(out: Output, build: Callable[[], StrictModel], section: str, print_config: bool,
            action: Callable[[Any], dict[str, Any]]) -> dict[str, Any] | None:
    """The shape of every subcommand: resolve the configuration, print it or act on it, print the result.
    Returns the result (None after --print-config)."""
    cfg = _run(out, build)
    if print_config:
        _print_config(out, cfg, section)
        return None
    result = _run(out, lambda: action(cfg))
    out.result(result)
    return result


def fail_check(reason: str) -> None:
    """Exit 1 with a one-line reason: a check the user asked for (the eval gate) did not pass."""
    print(f"error: {reason}", file=sys.stderr)
    raise typer.Exit(EXIT_CHECK_FAILED)


def quiet_library_output() -> None:
    """Library progress bars (weight loading, dataset saving) would drown spoctl's own output."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. transformers' GGUF de-quantization bar
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
