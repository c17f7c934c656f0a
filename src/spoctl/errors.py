"""Errors that end a command with a clear message and a documented exit code.

Exit codes (all subcommands): 0 success, 1 a check failed (the eval gate), 2 usage or input error.
Library code raises these; only the CLI turns them into exit codes, so everything stays callable from Python.
"""

from __future__ import annotations

EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class SpoctlError(Exception):
    """Base class. `str(err)` is the whole message shown to the user."""

    exit_code = EXIT_USAGE


class UsageError(SpoctlError):
    """Bad flags, bad configuration values, or a dimension/run that does not exist."""


class InputError(SpoctlError):
    """Bad input data or files. The message names the file, the line or record, and the field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        self.path, self.line, self.field = path, line, field
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class CheckFailed(SpoctlError):
    """A gate the user asked for was not met (exit 1)."""

    exit_code = EXIT_CHECK_FAILED


class TrainingError(SpoctlError):
    """Training cannot go on (NaN loss, ...). The last good checkpoint is intact."""
