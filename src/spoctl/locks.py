"""The lock file of a folder spoctl owns (`FOLDER/.lock`, an advisory `flock`, released when the process dies).

A run directory is locked exclusively by the process that writes it (`RunDir.lock`). A prepared-data folder is
shared: readers share the lock and `prepare` takes it alone. `load_prepared` holds a shared `flock` for the life of the data it returns, so `prepare --force` (which needs the
exclusive lock, without waiting) cannot replace a folder an `align` or `eval` is reading. `prepare` also holds the
exclusive lock on its temporary folder while writing it; the lock file moves with the folder when it is renamed
into place, and a temporary folder whose lock nobody holds was left by a crashed process.

flock rather than POSIX record locks: a flock belongs to the open file, so two readers in one process do not
release each other's lock when one of them closes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from .errors import UsageError

LOCK_NAME = ".lock"
# How long a reader waits for a prepare that is renaming its new folder into place (a moment, normally).
READER_WAIT_S = 5.0


def lock_is_a_folder(path: Path) -> UsageError:
    return UsageError(f"{path}: is a folder, where spoctl keeps its lock file; remove it")


def _open(path: Path, *, create: bool) -> int | None:
    """A descriptor on the lock file, or None where there is none and none can be made (read-only media)."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o644)
    except IsADirectoryError:
        raise lock_is_a_folder(path) from None
    except FileNotFoundError:
        if not create:
            return None
        raise
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    # A read-only folder: flock works on a read-only descriptor. If the lock file does not exist there, nobody
    # can lock it, and nobody can replace the folder either (prepare would need to write to it), so no lock is needed.
    with contextlib.suppress(FileNotFoundError):
        return os.open(path, os.O_RDONLY)
    return None


def holders(path: Path) -> list[int]:
    """Process ids holding a flock on `path` (Linux's /proc/locks; empty where that is not available)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == ident and parts[4].isdigit():
            pids.append(int(parts[4]))
    return sorted(set(pids), key=lambda p: (p == os.getpid(), p))  # other processes first


def describe(pids: list[int]) -> str:
    """'pid 123: spoctl align ...' for the first holder, as far as /proc tells."""
    if not pids:
        return "another process"
    pid = pids[0]
    if pid == os.getpid():
        return f"this process (pid {pid}: prepared data opened and not yet closed)"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return f"pid {pid}" + (f": {cmd[:120]}" if cmd else "")


class FolderLock:
    """A held flock on `<folder>/.lock`; `release()` (or closing the process) lets it go."""

    def __init__(self, folder: Path, fd: int | None):
        self.folder, self._fd = folder, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


_BUSY = -1


def _attempt(path: Path, operation: int, *, create: bool) -> int | None:
    """A descriptor holding `operation` (LOCK_SH/LOCK_EX) on `path`, None where no lock file can be had, or _BUSY."""
    fd = _open(path, create=create)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return _BUSY
    return fd


def lock_shared(folder: Path) -> FolderLock:
    """The reader's lock; waits a moment for a prepare that is putting a new folder in place, then gives up."""
    path = folder / LOCK_NAME
    deadline = time.monotonic() + READER_WAIT_S
    while True:
        fd = _attempt(path, fcntl.LOCK_SH, create=True)
        if fd == _BUSY:
            if time.monotonic() > deadline:
                raise UsageError(
                    f"{folder}: spoctl prepare ({describe(holders(path))}) is writing this prepared data;"
                    " wait for it to finish, then start again"
                )
            time.sleep(0.1)
        elif fd is None or _same_file(fd, path):
            return FolderLock(folder, fd)
        else:
            os.close(fd)  # the folder was replaced while we waited: lock the new one


def lock_exclusive(folder: Path, *, create: bool = True, busy: str | None = None) -> FolderLock:
    """The writer's lock: at once or not at all. Refusing names the holder; `busy` is the message for it, with
    `{folder}` and `{holder}` filled in (the default is prepare's, which only readers can block)."""
    path = folder / LOCK_NAME
    fd = _attempt(path, fcntl.LOCK_EX, create=create)
    if fd == _BUSY:
        busy = busy or ("{folder}: not replacing it, because {holder} is reading it (an align or eval); wait for it"
                        " to finish, or choose another --out")
        raise UsageError(busy.format(folder=folder, holder=describe(holders(path))))
    return FolderLock(folder, fd)


class ExclusiveLock:
    """`with ExclusiveLock(folder, "run directory"):` -- one process at a time writes the folder."""

    def __init__(self, folder: Path | str, what: str):
        self.folder, self.what = Path(folder), what
        self._lock: FolderLock | None = None

    def acquire(self) -> "ExclusiveLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = lock_exclusive(self.folder, busy="{folder}: another spoctl process ({holder}) is using this "
                                                      + self.what + "; wait for it to finish or choose another --out")
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "ExclusiveLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock_exclusive(folder: Path) -> FolderLock | None:
    """The exclusive lock if nobody holds the lock file (never creating one), else None."""
    fd = _attempt(folder / LOCK_NAME, fcntl.LOCK_EX, create=False)
    return None if fd is None or fd == _BUSY else FolderLock(folder, fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
