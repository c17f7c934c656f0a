"""SIGTERM and SIGHUP: how a command ends when a scheduler, a container runtime or a closed terminal asks it to.

Slurm, Kubernetes, Docker and CI runners send SIGTERM some seconds before they kill; a closed terminal sends
SIGHUP. Either becomes a `Stopped` exception where the program is -- as Ctrl-C becomes KeyboardInterrupt, and like it
not an Exception, so no `except Exception` turns it into another error -- reported as `Interrupted`, so
`eval`, `export` and `prepare` stop the way they stop on Ctrl-C: what they write is written under a temporary name
and renamed into place, so nothing earlier is touched, and the CLI prints one `error:` line (and the JSON error
document under --json) and exits 128 + the signal's number (143 for SIGTERM, 129 for SIGHUP).

`align`'s training loop holds the signal instead (`held()`): it finishes the optimizer step under way, every process
agrees to stop at the same step (the signal may reach only some of them), saves a checkpoint, marks the stage
interrupted in the manifest and then raises `Interrupted` with the command that continues the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

from .errors import Stopped
from .launcher import is_main_process, world_size

SIGNALS = (signal.SIGTERM, signal.SIGHUP)

_received: list[int] = []  # the signals received while held, in order
_holding = [0]  # depth of `held()` blocks
_awaiting_checks = [False]  # under a launcher: a signal waits until the command's input checks are done


def exit_before_start(argv: list[str]) -> None:
    """Until a command installs `stop_signals` (Python starting, the CLI's imports): SIGTERM or SIGHUP ends the
    process at once, nothing having been done, with the same `error:` line, JSON document and exit code.

    Except under a launcher (WORLD_SIZE above 1): there the signal is most often torchrun ending the other
    processes because one of them failed -- on an input error every process finds, the quickest one. The main
    process, still importing, would then print "stopped by SIGTERM" in place of the error the user has to fix (CI
    caught it: a `--lr -1` under torchrun gave an "interrupted" JSON document). So there the signal waits until the
    command has checked its input (`checks_done`), also once the command has started (CI again: the signal came
    while `align` imported its modules): an input error is reported as such, and valid input stops with the signal
    before any work. The launcher kills a process that does not end in time."""
    json_mode = "--json" in (argv[: argv.index("--")] if "--" in argv else argv)
    launched = world_size() > 1
    _awaiting_checks[0] = launched

    def stop(signum: int, frame: object) -> None:
        if launched:
            _received.append(signum)
            return
        import json
        import sys

        message = f"stopped by {signal.Signals(signum).name} outside the command's work (nothing was being written)"
        sys.stderr.write(f"error: {message}\n")
        if json_mode and is_main_process():
            sys.stdout.write(json.dumps({"error": message, "exit_code": 128 + signum, "kind": "interrupted"}) + "\n")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, stop)


def ignore_after_the_end() -> None:
    """The command is over and its exit code settled: a SIGTERM or SIGHUP from now on can change nothing it did.
    Python's shutdown puts the default action back on both signals, so one arriving then ended the process as killed
    by it (-15 to a shell's 143), silently, after a run that had finished (the chaos test caught it 20 ms after
    align's last line). Blocked from here on, a late signal is dropped when the process exits, and the command's
    own exit code stands."""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def _handler(signum: int, frame: object) -> None:
    if _holding[0] or _awaiting_checks[0]:
        _received.append(signum)
        return
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Stopped` (or, inside `held()`, wait for the caller) while in this block; the
    previous handlers come back after it. Only the main thread can install handlers: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        _received.clear()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A signal received inside this block only records itself (`pending()`); the block decides when to stop. One
    still pending when the block ends raises there."""
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1
    if not _holding[0] and _received:
        signum = _received[0]
        _received.clear()
        raise Stopped(signum)


def checks_done() -> None:
    """The command has checked its input and starts its work (align: after its data, model and tokenizer checks,
    before the process group): a signal that waited for this (under a launcher, `exit_before_start`) stops it now.
    Elsewhere a no-op."""
    if not _awaiting_checks[0]:
        return
    _awaiting_checks[0] = False
    if _received and not _holding[0]:
        signum = _received[0]
        _received.clear()
        raise Stopped(signum)


def pending() -> int | None:
    """The first signal received inside `held()` and not yet acted on, else None."""
    return _received[0] if _received else None


def acknowledge() -> None:
    """The caller acts on the pending signals (it raises its own `Interrupted`)."""
    _received.clear()
