"""The `spoctl` command line: a thin Typer layer that parses, calls the library, and prints.

Each subcommand lives in its own module and registers itself on the shared `app`.
"""

from __future__ import annotations

from .common import app
from . import align, demo, eval, export, prepare  # noqa: F401,E402  (registers the subcommands)


def main() -> None:
    """Console-script entry point."""
    import sys

    from .eval import bare_judge_to_auto

    sys.argv[1:] = bare_judge_to_auto(sys.argv[1:])  # `eval --judge` with no name means `--judge auto`
    # One program name however it is started (`python -m spoctl`, torchrun): usage lines, and the shell-completion
    # script, which must register `spoctl` and not `python -m spoctl`.
    app(prog_name="spoctl")
