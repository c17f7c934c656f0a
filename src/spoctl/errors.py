"""Errors that end a command with a clear message and a documented exit code.

Exit codes (all subcommands): 0 success, 1 a check failed (the eval gate, export's numerical check), 2 usage,
input or file-system error, 70 an internal error (a bug: the traceback is shown), 130 interrupted (Ctrl-C), 143 and
129 stopped by SIGTERM and SIGHUP (128 + the signal's number; `align` saves a checkpoint first, see spoctl.signals).
Library code raises these; only the CLI turns them into exit codes, so everything stays callable from Python.
`describe_error` is the one place that turns any exception into the message, kind and exit code a user sees.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): distinct from 1, so a crash never reads as a failed gate
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class SpoctlError(Exception):
    """Base class. `str(err)` is the whole message shown to the user; `kind` is the `--json` error's kind."""

    exit_code = EXIT_USAGE
    kind = "usage"


class UsageError(SpoctlError):
    """Bad flags, bad configuration values, or a dimension/run that does not exist."""


class InputError(SpoctlError):
    """Bad input data or files. The message names the file, the line or record, and the field."""

    kind = "input"

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
    kind = "check"


class Interrupted(SpoctlError):
    """Stopped by SIGTERM or SIGHUP (spoctl.signals): exit 128 + the signal's number, as shells report it."""

    kind = "interrupted"

    def __init__(self, message: str, signum: int = 15):  # 15: SIGTERM (what Processes.share rebuilds)
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class Stopped(BaseException):
    """SIGTERM or SIGHUP arriving where the command can stop at once (spoctl.signals). Like KeyboardInterrupt it is
    a BaseException: the `except Exception` blocks that turn a library's failure into a clear error (a model that
    does not load, a damaged file) must not turn a signal into one of those ("could not load model ...: stopped by
    SIGTERM", exit 2, as the chaos suite found). Reported as the `Interrupted` error `as_error()` gives."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def as_error(self) -> Interrupted:
        import signal

        return Interrupted(f"stopped by {signal.Signals(self.signum).name}", self.signum)


class TrainingError(SpoctlError):
    """Training cannot go on (NaN loss, ...). The last good checkpoint is intact."""

    kind = "training"


# ------------------------------------------------------------------------------------------------ any exception
@dataclass(frozen=True)
class ErrorInfo:
    """What the CLI shows for an exception: `error: {message}` on stderr, and with --json the same as an object."""

    message: str
    kind: str  # usage | input | os | check | training | interrupted | internal
    exit_code: int
    path: str | None = None

    def as_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"error": self.message, "exit_code": self.exit_code, "kind": self.kind}
        if self.path is not None:
            doc["path"] = self.path
        return doc


# errno -> (what happened, what to do). The path comes from the exception (err.filename).
_AGAIN = "and run the command again (a stopped `spoctl align` continues with --resume)"
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.EACCES: ("permission denied", "check the permissions of the file and of the folders above it, or use another"
                                        " location (--out, --data, SPOCTL_HOME)"),
    errno.EPERM: ("operation not permitted", "check the permissions and ownership of the path, or use another location"),
    errno.EROFS: ("read-only file system", "write to a writable location instead (--out, SPOCTL_HOME)"),
    errno.ENOSPC: ("no space left on the device", f"free some space or write elsewhere, {_AGAIN}"),
    errno.EDQUOT: ("disk quota exceeded", f"free some space or write elsewhere, {_AGAIN}"),
    errno.EFBIG: ("file too large for a size limit (`ulimit -f` or the file system's maximum file size)",
                  f"raise the limit or write to another file system, {_AGAIN}"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "fix the path, or move the file out of the way"),
    errno.EISDIR: ("is a folder where a file is needed", "give a file, or move the folder out of the way"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EEXIST: ("already exists and is in the way", "remove it or choose another path"),
    errno.ENOTEMPTY: ("the folder is not empty", "empty it or choose another path"),
    errno.EMFILE: ("too many open files", "raise the limit (`ulimit -n 4096`) and run the command again"),
    errno.ENFILE: ("too many open files on this system", "close other programs or raise the system's limit"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the symbolic links on the path"),
    errno.EXDEV: ("cannot move a file across file systems", "keep --out on the same file system as its folder"),
    errno.EBUSY: ("the file or folder is busy", "wait for the program using it to finish, then run the command again"),
    errno.EIO: ("input/output error (a failing disk or network file system)", "check the storage, then run the"
                                                                               " command again"),
    errno.ENOMEM: ("out of memory", "free memory or lower the sizes (--batch-size, --max-pairs, --max-length)"),
}


def _os_error(err: OSError) -> ErrorInfo:
    path = err.filename if err.filename not in (None, "") else None
    if err.filename2 not in (None, ""):
        path_text = f"{err.filename} -> {err.filename2}"
    elif err.filename == "":
        path_text = "'' (an empty path)"
    else:
        path_text = str(path) if path is not None else None
    known = _OS_ERRORS.get(err.errno) if err.errno is not None else None
    if known is not None:
        what, todo = known
        where = f"{path_text}: " if path_text else ""
        message = f"{where}{what}; {todo}"
    else:
        # Libraries raise OSError without an errno for their own conditions (transformers: "Can't load tokenizer
        # for ..."): their text is the message.
        text = err.strerror or str(err) or type(err).__name__
        message = f"{path_text}: {text}" if path_text and path_text not in text else text
    return ErrorInfo(message, "os", EXIT_USAGE, None if path is None else str(path))


# How Rust libraries (safetensors, tokenizers) show an operating-system error: "... (os error 27)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def describe_error(err: BaseException) -> ErrorInfo | None:
    """The message, kind and exit code for an exception a command raised; None for an unexpected one (a bug)."""
    if isinstance(err, Stopped):
        err = err.as_error()
    if isinstance(err, SpoctlError):
        path = getattr(err, "path", None)
        return ErrorInfo(str(err), err.kind, err.exit_code, None if path is None else str(path))
    if isinstance(err, KeyboardInterrupt):
        return ErrorInfo("interrupted", "interrupted", EXIT_INTERRUPTED)
    if isinstance(err, OSError):
        return _os_error(err)
    rust = _RUST_OS_ERROR.search(str(err)) if type(err).__module__.split(".")[0] in ("safetensors", "tokenizers",
                                                                                       "builtins") else None
    if rust is not None:
        code = int(rust.group(1))
        return _os_error(OSError(code, os.strerror(code)))
    if isinstance(err, RecursionError):
        return ErrorInfo("input nested too deeply to process (e.g. JSON nested thousands of levels); flatten the"
                         " record or remove it", "input", EXIT_USAGE)
    if isinstance(err, UnicodeEncodeError):
        bad = err.object[err.start:err.end] if isinstance(err.object, str) else ""
        return ErrorInfo(f"text that cannot be written as {err.encoding}: {bad!r} at position {err.start} ({err.reason};"
                         " a lone surrogate such as '\\udc80' comes from a JSON escape or bytes decoded with"
                         " 'surrogateescape'); fix or remove that text in the input", "input", EXIT_USAGE)
    if isinstance(err, MemoryError):
        return ErrorInfo("out of memory; lower the sizes (--batch-size, --max-pairs, --max-length) or free memory",
                         "os", EXIT_USAGE)
    return None
