"""The `spoctl` command line: a thin Typer layer that parses, calls the library, and prints.

Each subcommand lives in its own module and registers itself on the shared `app`.
"""

from __future__ import annotations

from .common import app
from . import align, compare, demo, eval, export, prepare  # noqa: F401,E402  (registers the subcommands)


def main() -> None:
    """Console-script entry point."""
    import sys

    from ..signals import exit_before_start, ignore_after_the_end
    from .eval import bare_judge_to_auto

    exit_before_start(sys.argv[1:])  # (again for the `spoctl` script, which imports this module first)

    sys.argv[1:] = bare_judge_to_auto(sys.argv[1:])  # `eval --judge` with no name means `--judge auto`
    # One program name however it is started (`python -m spoctl`, torchrun): usage lines, and the shell-completion
    # script, which must register `spoctl` and not `python -m spoctl`.
    try:
        app(prog_name="spoctl")
    except SystemExit as done:
        ignore_after_the_end()
        if not _in_process_group():
            raise
        _leave_process_group(done.code)


def _in_process_group() -> bool:
    import sys

    dist = sys.modules.get("torch.distributed")  # not imported: --help, prepare, a single-process run of most commands
    return dist is not None and dist.is_available() and dist.is_initialized()


def _leave_process_group(code: object) -> None:
    """End a process of a torchrun / accelerate launch group once its command is over (its files are written and
    closed; its output flushed here): destroy the process group, then leave without the interpreter's teardown.
    Torn down normally, a process sometimes aborts *after* its work is done, when a gloo thread still held by the
    FSDP device mesh outlives what it uses ("terminate called without an active exception", SIGABRT: 2 of 60
    two-process FSDP runs on this machine under load, with or without destroying the group first; 0 of 36 with
    this exit), and the launcher then reports the whole run as failed."""
    import logging
    import os
    import sys

    import torch.distributed as dist

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        status = 1
    dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
