"""Atomic writes and crash litter: a crash never leaves a half-written file or folder that looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UsageError


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """A temporary path in `path`'s folder to write to; when the block succeeds it is fsynced and renamed over
    `path`, when it fails it is removed. For writers that want a file name (safetensors, torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def hash_file_into(h: Any, path: Path | str) -> Any:
    """Feed a file's bytes to hashlib object `h` in blocks (any size, constant memory); returns `h`."""
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes."""
    return hash_file_into(hashlib.sha256(), path).hexdigest()


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path | str, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path | str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_directory(final: Path | str, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to `final`, on failure delete it.

    `replace=True` swaps out an existing `final` (the old one is removed only after the new one is complete).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            if not replace:
                raise UsageError(f"{final}: already exists")
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_litter(name: str) -> bool:
    """Whether a file or folder name is one of this module's temporary names (`.<name>.<random>.tmp` from
    atomic_file/atomic_directory, `.<name>.old` from a replacing atomic_directory): what a killed process leaves."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".old"))


def remove_litter(root: Path | str) -> list[Path]:
    """Remove the temporary files and folders a crashed spoctl left anywhere under `root`. Only call it while
    holding the folder's lock: a live writer's temporary names look the same. Returns what was removed."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if not is_litter(name):
                continue
            path = Path(dirpath) / name
            final = path.with_name(name[1:].removesuffix(".old"))
            if name.endswith(".old") and not final.exists():
                # Killed between atomic_directory's two renames: the old complete folder is all there is.
                os.replace(path, final)
                continue
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
        dirnames[:] = [d for d in dirnames if not is_litter(d)]
    return removed


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
