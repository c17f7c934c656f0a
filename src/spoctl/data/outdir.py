"""Where `prepare` writes: checking `--out` before any work, and writing the new folder in one atomic step.

`--force` replaces only what prepare itself produced: a folder whose manifest has prepare's format version and
the prepared layout. Never a spoctl run directory, never a folder holding a SOURCE being read, never anything
else, and never a folder an `align`/`eval` is reading (the exclusive lock of spoctl.locks).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import UsageError
from ..fsutil import atomic_directory
from ..locks import FolderLock, lock_exclusive, try_lock_exclusive
from .store import PREPARED_MANIFEST, READABLE_VERSIONS, SPLITS

# A temporary folder without a lock file is left alone this long (its writer may be about to create the lock).
UNLOCKED_TEMP_GRACE_S = 3600


def prepared_folder_problem(folder: Path) -> str | None:
    """None if `folder` is recognisably prepare's own output, else why not (in words for an error message)."""
    mpath = folder / PREPARED_MANIFEST
    if not mpath.is_file():
        return f"it is not a spoctl prepared-data directory (no {PREPARED_MANIFEST})"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return f"its {PREPARED_MANIFEST} cannot be read as prepared data"
    if not isinstance(manifest, dict):
        return f"its {PREPARED_MANIFEST} is not prepared data"
    if "run_key" in manifest or "stages" in manifest:
        return "it is a spoctl run directory (its manifest has run_key/stages)"
    if manifest.get("format_version") not in READABLE_VERSIONS:
        return f"its {PREPARED_MANIFEST} does not have prepare's format_version"
    dims = manifest.get("dimensions")
    if not isinstance(dims, dict) or not dims:
        return "its manifest lists no prepared dimensions"
    for dim in dims:
        if not all((folder / str(dim) / s).is_dir() for s in SPLITS):
            return f"it lacks the prepared layout ({dim}/train, {dim}/eval)"
    return None


def claim(out_dir: Path, force: bool, inputs: Iterable[Path]) -> tuple[bool, FolderLock | None]:
    """Check `--out` (cheap, before any reading): returns (replace, the exclusive lock on the old folder, if any).

    `inputs` are the local files and folders being read: a folder holding one of them is never replaced.
    """
    if str(out_dir).strip() in ("", "."):
        raise UsageError("--out: give a folder name other than the current directory, e.g. --out prepared/hh")
    absolute = Path(os.path.abspath(out_dir.expanduser()))
    _check_parent(absolute)
    if not absolute.exists() and not absolute.is_symlink():
        return False, None
    if not absolute.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory; choose another --out")
    cwd = Path.cwd().resolve()
    if cwd == absolute.resolve() or absolute.resolve() in cwd.parents:
        raise UsageError(f"{out_dir}: is the current directory or contains it; choose another --out")
    if not any(absolute.iterdir()):
        return True, None
    if not force:
        raise UsageError(f"{out_dir}: already exists and is not empty; pass --force to replace it, or choose another --out")
    problem = prepared_folder_problem(absolute)
    if problem:
        raise UsageError(f"{out_dir}: not replacing it even with --force, because {problem}; choose another --out")
    real = absolute.resolve()
    for src in inputs:
        src_real = Path(os.path.realpath(src))
        if src_real == real or real in src_real.parents:
            raise UsageError(f"{out_dir}: not replacing it, because it contains {src}, which this prepare reads;"
                             " choose another --out")
    return True, lock_exclusive(absolute)


def _check_parent(out: Path) -> None:
    """The nearest existing ancestor of --out must be a folder we can write in (where the temporary folder goes)."""
    parent = out.parent
    while not parent.exists():
        if parent.is_symlink():
            raise UsageError(f"{parent}: a broken link; --out {out} cannot be created there")
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{parent}: is a file, so --out {out} cannot be created; choose another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=".spoctl-write-check.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{parent}: cannot write there ({err.strerror or err}), so --out {out} cannot be created;"
                         " choose another --out") from None


@contextmanager
def writing(out_dir: Path, replace: bool) -> Iterator[Path]:
    """A temporary sibling folder, locked, that becomes `out_dir` when the block succeeds.

    On a failure nothing is left: the temporary folder is removed and an existing `out_dir` is untouched. OS errors
    (disk full, file too large, permissions) become one UsageError naming what failed and the path.
    """
    absolute = Path(os.path.abspath(out_dir.expanduser()))
    lock: FolderLock | None = None
    try:
        with atomic_directory(absolute, replace=replace) as tmp:
            lock = lock_exclusive(tmp)  # marks the folder as alive for clean_stale_temps of other processes
            yield tmp
    except OSError as err:
        what = err.strerror or type(err).__name__
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        kept = "; the previous prepared data is untouched" if replace else ""
        raise UsageError(f"{out_dir}: writing the prepared data failed: {what}{where}; nothing was written{kept}."
                         " Free some space or choose another --out, then run prepare again") from None
    finally:
        if lock is not None:
            lock.release()


def clean_stale_temps(out_dir: Path) -> list[Path]:
    """Remove prepare's own temporary folders for `out_dir` (`.OUT.<random>.tmp`) that no live process holds."""
    absolute = Path(os.path.abspath(out_dir.expanduser()))
    pattern = re.compile(rf"^\.{re.escape(absolute.name)}\.[A-Za-z0-9_]{{8}}\.tmp$")
    removed = []
    with suppress(OSError):
        for entry in absolute.parent.iterdir():
            if not (pattern.match(entry.name) and entry.is_dir() and not entry.is_symlink()):
                continue
            if _stale(entry):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _stale(folder: Path) -> bool:
    lock = try_lock_exclusive(folder)
    if lock is not None:
        lock.release()  # nobody held it: the writer is gone
        return True
    if (folder / ".lock").exists():
        return False  # a live writer holds it
    with suppress(OSError):
        return time.time() - folder.stat().st_mtime > UNLOCKED_TEMP_GRACE_S
    return False


def source_paths(sources: Iterable[Any]) -> list[Path]:
    """The local paths a prepare reads (files and dataset folders)."""
    return [s.path for s in sources if getattr(s, "path", None) is not None]
