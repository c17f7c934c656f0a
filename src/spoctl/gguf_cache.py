"""GGUF files unpacked once: the config, tokenizer and float32 weights transformers makes of a .gguf file, kept as
an ordinary safetensors model folder so that later loads read that instead.

transformers parses a GGUF file anew on every load: for SmolLM2-135M's 98 MB file about 5 CPU-seconds for the
config, 5 for the tokenizer and 19 for the model (dequantisation included; 9 when unpacked here, see
`_parsed_once`), and spoctl loads a base model several times per command (tokenizer, vocabulary check, base
fingerprint, every frozen model of a LoRA chain). The cache turns each into a read of a safetensors folder.

Layout: `<cache_home>/gguf/<sha256 of the file>-transformers-<version>-v<FORMAT>/{config,tokenizer,model}/`. The key
is the file's content, not its name or place, and the transformers version (which owns the unpacking: another
version may unpack differently). Each part is written whole into a temporary sibling and renamed into place
(fsutil.atomic_directory), with `part.json` listing its files and sizes; a part whose files do not match that
list, or that fails to load, is removed and built again from the GGUF file. Only safetensors, JSON and the chat
template's text are read back (never pickle). Where the cache cannot be written (read-only home, full disk) spoctl
warns once and loads from the GGUF file as before. `SPOCTL_CACHE=off` turns the cache off.

What a run records about its model is unchanged: manifests name the .gguf file and hash its bytes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .fsutil import atomic_directory, read_json, sha256_file, write_json_atomic
from .rundir import cache_home

FORMAT = 1
PART_INFO = "part.json"
T = TypeVar("T")


@functools.lru_cache(maxsize=32)
def _content_hash(path: str, size: int, mtime_ns: int, inode: int) -> str:
    # Hashing SmolLM2's 98 MB takes about 0.1 CPU-second; the memo saves it for the 3-4 loads of one command.
    return sha256_file(path)


def file_hash(gguf: Path) -> str:
    st = gguf.stat()
    return _content_hash(str(gguf.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def entry_dir(gguf: Path) -> Path | None:
    """The cache folder of this GGUF file, or None when caching is off."""
    home = cache_home()
    if home is None:
        return None
    import transformers

    return home / "gguf" / f"{file_hash(gguf)}-transformers-{transformers.__version__}-v{FORMAT}"


def _listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != PART_INFO}


def _complete(part: Path) -> bool:
    """The part holds exactly the files, of the sizes, that were written into it (a truncated or deleted file, or
    a folder someone else put there, is not complete)."""
    try:
        info = read_json(part / PART_INFO)
        return info.get("format") == FORMAT and info.get("files") == _listing(part)
    except (OSError, ValueError, AttributeError):
        return False


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def load_through_cache(gguf: Path, part: str, *, build: Callable[[], Any], save: Callable[[Any, Path], None],
                       load: Callable[[Path], T], direct: Callable[[], T]) -> T:
    """`load(folder)` of this file's cached `part`, made first when it is not there or not whole: `build()` reads
    it from the GGUF file and `save(obj, folder)` writes it. Cold and warm loads thus read the same folder. A part
    that does not load is removed and made once more; with the cache off, or not writable, `direct()` loads from
    the GGUF file as before. What `build` raises (a damaged GGUF file, a refused model) is the caller's."""
    entry = entry_dir(gguf)
    if entry is None:
        return direct()
    folder = entry / part
    for attempt in (1, 2):
        # A whole part only ever appears by a rename, so a folder that is there but not whole is damaged; one that
        # is not there may be appearing now (another process): that one is left alone, and made here only if absent.
        if folder.exists() and not _complete(folder):
            shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            try:
                entry.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                return _unwritable(gguf, entry, err, direct)
            with _parsed_once():
                obj = build()
            try:
                with atomic_directory(folder) as tmp:
                    save(obj, tmp)
                    write_json_atomic(tmp / PART_INFO, {"format": FORMAT, "source": str(gguf.resolve()),
                                                        "sha256": file_hash(gguf), "files": _listing(tmp)})
            except Exception as err:  # noqa: BLE001 - a cache that cannot be written must not stop the command
                if not folder.is_dir():  # else another process made it meanwhile (our rename found it): it serves
                    del obj
                    return _unwritable(gguf, entry, err, direct)
            del obj
        try:
            return load(folder)
        except Exception as err:  # noqa: BLE001 - our own copy does not load: make it again from the source, once
            if attempt == 2:
                raise
            first = str(err).splitlines()[0] if str(err) else ""
            _warn_once(str(folder), f"{folder}: the cached {part} of {gguf.name} does not load ({type(err).__name__}: "
                                    f"{first}); unpacking the GGUF file again")
            shutil.rmtree(folder, ignore_errors=True)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _parsed_once() -> Iterator[None]:
    """While a part is unpacked: transformers parses the whole GGUF file on every read of it (3-4 s for SmolLM2's
    98 MB, most of it the vocabulary; a model reads it twice, for its config and its weights) and builds gguf's
    tensor-name table once per submodule (397 times for SmolLM2, 10-20 ms each). Here each is made once per part.
    The reader is only read from (transformers dequantises into new arrays) and goes with the part (it holds ~130
    MB for SmolLM2, so it is not kept for the next one); gguf's own functions are restored afterwards."""
    try:
        import gguf
    except ImportError:  # transformers then says what to install
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
        readers.clear()


def _unwritable(gguf: Path, entry: Path, err: Exception, direct: Callable[[], T]) -> T:
    _warn_once(str(entry), f"could not cache the unpacked {gguf.name} under {entry} ({err}); it is read from the "
                           "GGUF file each time. Set SPOCTL_CACHE to a writable folder, or SPOCTL_CACHE=off")
    return direct()
