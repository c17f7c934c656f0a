"""The prepared-data directory: its schema, and reading it back (the API `spoctl align` and `eval` use).

Layout:
    OUT/manifest.json
    OUT/.lock          (readers share it; prepare --force needs it alone: spoctl.locks)
    OUT/<dim>/train/   (datasets.Dataset.save_to_disk, Arrow)
    OUT/<dim>/eval/

Every file of every split is recorded in the manifest (bytes and sha256) when prepare writes it, and checked when
it is read back: sizes whenever a split is opened, hashes once by `load_prepared`. So data changed behind
spoctl's back (an edit, a truncation, a bit flip) stops with the file's name instead of training silently on it.

For the engine:
    with load_prepared(path) as data:      # shared lock held until close(); prepare --force waits its turn
        data.dims, data.model, data.split(dim, "train"), data.data_hash(dim, "train")
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import UsageError
from ..fsutil import sha256_file
from ..locks import FolderLock, lock_shared

FORMAT_VERSION = 2
# Version 1 (no per-file records) is still read: its splits are checked by re-hashing their token ids instead.
READABLE_VERSIONS = (1, 2)
PREPARED_MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
# The columns of every split, in order. The engine relies on exactly these names and types.
COLUMNS = (
    "pair_id",  # str: sha256 of the raw prompt messages, chosen and rejected text
    "prompt_input_ids",  # list[int]: the rendered prompt, ending with the generation prompt
    "chosen_input_ids",  # list[int]: the chosen completion only, end-of-turn token included
    "rejected_input_ids",  # list[int]
    "prompt",  # str: tokenizer.decode(prompt_input_ids), exactly what the model sees
    "chosen",  # str: the raw chosen response text (before any truncation)
    "rejected",  # str
    "prompt_messages",  # str: JSON list of {role, content} that prompt_input_ids renders, system prompt included
)
TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def features():
    """The datasets Features of a split (int64 ids: what torch embedding/gather want without casting)."""
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence
    return datasets.Features(
        {c: (seq(datasets.Value("int64")) if c in TOKEN_COLUMNS else datasets.Value("string")) for c in COLUMNS}
    )


def split_hash(
    pair_ids: Iterable[str],
    prompts: Iterable[Sequence[int]],
    chosen: Iterable[Sequence[int]],
    rejected: Iterable[Sequence[int]],
) -> str:
    """sha256 over the ids and token ids of a split, row by row in order: what the model trains on, nothing else."""
    return split_hash_rows(zip(pair_ids, prompts, chosen, rejected))


def split_hash_rows(rows: Iterable[tuple[str, Sequence[int], Sequence[int], Sequence[int]]]) -> str:
    """split_hash of (pair_id, prompt ids, chosen ids, rejected ids) rows, consumed as they come."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row[0], list(row[1]), list(row[2]), list(row[3])], separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def dataset_hash(ds: Any) -> str:
    """split_hash of a loaded split: how data without per-file records (format version 1) is checked."""
    cols = ds.select_columns(["pair_id", *TOKEN_COLUMNS]).to_dict()
    return split_hash(cols["pair_id"], *(cols[c] for c in TOKEN_COLUMNS))


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{file name: {bytes, sha256}} of every file in a split folder, as prepare records them."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(folder.iterdir()) if f.is_file()}


def _file_error(path: Any, message: str) -> UsageError:
    """A UsageError (what callers of load_prepared catch) that names the file first, as input errors do."""
    return UsageError(f"{path}: {message}")


def _rerun(path: Path) -> str:
    return f"run spoctl prepare again with --out {path} --force to rebuild it"


@dataclass
class PreparedData:
    """A prepared-data directory: the manifest plus lazy access to each dimension's splits.

    Holds a shared lock on the folder until `close()` (or the end of a `with` block, or of the process).
    """

    path: Path
    manifest: dict[str, Any]
    _lock: FolderLock | None = field(default=None, repr=False)
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    @property
    def dims(self) -> list[str]:
        """Dimensions in the order they were prepared (the --data order)."""
        return list(self.manifest["dimensions"])

    @property
    def model(self) -> str | None:
        """The model (tokenizer) the data was prepared with: a Hub id or an absolute local path."""
        return self.manifest.get("model")

    def dim_info(self, dim: str) -> dict[str, Any]:
        """The manifest entry of one dimension (source, format, counts, tokens, hashes, files)."""
        self._check_dim(dim)
        return self.manifest["dimensions"][dim]

    def split(self, dim: str, name: str = "train"):
        """The `name` split ('train' or 'eval') of `dim` as a datasets.Dataset (memory-mapped Arrow), checked."""
        import datasets

        self._check_split(dim, name)
        key = (dim, name)
        if key not in self._cache:
            where = self.path / dim / name
            if not where.is_dir():
                raise _file_error(where, f"missing; the prepared data in {self.path} is incomplete; {_rerun(self.path)}")
            self.verify(dim, name, hashes=False)
            try:
                ds = datasets.load_from_disk(str(where))
            except Exception as err:
                raise _file_error(where, f"cannot be read ({type(err).__name__}: {err}); {_rerun(self.path)}") from None
            if self._recorded(dim, name) is None and dataset_hash(ds) != self.dim_info(dim)["hashes"][name]:
                raise _file_error(where, f"its token ids do not match the hash in {PREPARED_MANIFEST}: the data was"
                                         f" changed after prepare wrote it; {_rerun(self.path)}")
            self._cache[key] = ds
        return self._cache[key]

    def data_hash(self, dim: str, name: str = "train") -> str:
        """sha256 of the split's token ids (see split_hash): the key of the engine's caches.

        Trustworthy because the files behind it were checked against the manifest (or, for data without file
        records, the split is loaded and re-hashed here first).
        """
        self._check_split(dim, name)
        if self._recorded(dim, name) is None:
            self.split(dim, name)
        return self.manifest["dimensions"][dim]["hashes"][name]

    def verify(self, dim: str, name: str, *, hashes: bool) -> None:
        """Check the split's files against the manifest: every recorded file present with its size, and with
        `hashes` its sha256 too. Raises UsageError naming the first file that differs."""
        recorded = self._recorded(dim, name)
        if recorded is None:
            return
        folder = self.path / dim / name
        for fname, rec in recorded.items():
            f = folder / fname
            if not f.is_file():
                raise _file_error(f, f"missing; the prepared data in {self.path} is incomplete; {_rerun(self.path)}")
            size = f.stat().st_size
            if size != rec["bytes"]:
                raise _file_error(f, f"{size:,} bytes, but prepare wrote {rec['bytes']:,}: the file was changed"
                                     f" after prepare wrote it; {_rerun(self.path)}")
            if hashes and sha256_file(f) != rec["sha256"]:
                raise _file_error(f, f"its content differs from what prepare wrote (sha256 mismatch): the file"
                                     f" was changed after prepare wrote it; {_rerun(self.path)}")

    def close(self) -> None:
        """Let go of the folder (prepare --force may replace it afterwards)."""
        self._cache.clear()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> "PreparedData":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _recorded(self, dim: str, name: str) -> dict[str, Any] | None:
        return (self.dim_info(dim).get("files") or {}).get(name)

    def _check_split(self, dim: str, name: str) -> None:
        self._check_dim(dim)
        if name not in SPLITS:
            raise UsageError(f"no split {name!r}; prepared data has: {', '.join(SPLITS)}")

    def _check_dim(self, dim: str) -> None:
        if dim not in self.manifest["dimensions"]:
            raise UsageError(
                f"prepared data in {self.path} has no dimension '{dim}' (it has: {', '.join(self.dims)});"
                f" run spoctl prepare with --data {dim}=..."
            )


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a prepared-data folder, its shape checked; errors say what to run to fix it."""
    hint = f"run spoctl prepare --data DIM=SOURCE --model MODEL --out {path} first"
    if not path.exists():
        raise UsageError(f"{path}: no prepared data here (the directory does not exist); {hint}")
    if not path.is_dir():
        raise UsageError(f"{path}: not a prepared-data directory (it is a file); {hint}")
    mpath = path / PREPARED_MANIFEST
    if not mpath.is_file():
        raise UsageError(f"{path}: not a prepared-data directory (no {PREPARED_MANIFEST}); {hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise _file_error(mpath, f"damaged ({type(err).__name__}: {err}); {_rerun(path)}") from None
    except OSError as err:
        raise _file_error(mpath, f"cannot be read ({err.strerror or err})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in READABLE_VERSIONS:
        raise UsageError(
            f"{mpath}: prepared-data format version {version!r}, this spoctl reads versions"
            f" {', '.join(map(str, READABLE_VERSIONS))}; {_rerun(path)}"
        )
    problem = _shape_problem(manifest)
    if problem:
        raise _file_error(mpath, f"damaged ({problem}); {_rerun(path)}")
    return manifest


def _shape_problem(manifest: dict[str, Any]) -> str | None:
    dims = manifest.get("dimensions")
    if not isinstance(dims, dict) or not dims:
        return "no dimensions"
    for dim, info in dims.items():
        if not isinstance(info, dict) or not isinstance(info.get("hashes"), dict):
            return f"dimensions.{dim} has no hashes"
        for name in SPLITS:
            if not isinstance(info["hashes"].get(name), str):
                return f"dimensions.{dim}.hashes.{name} is missing"
        files = info.get("files")
        if files is not None and not (isinstance(files, dict) and all(
                isinstance(v, dict) and all(isinstance(r, dict) and {"bytes", "sha256"} <= set(r) for r in v.values())
                for v in files.values())):
            return f"dimensions.{dim}.files is not a record of files"
    return None


def load_prepared(path: Path | str, *, verify: bool = True) -> PreparedData:
    """Open a directory written by `spoctl prepare`: lock it for reading, check the manifest and (with `verify`)
    every recorded file's size and sha256. Errors name the file and say what to run."""
    path = Path(path)
    read_manifest(path)  # errors about a missing or foreign folder come before any lock file is made in it
    lock = lock_shared(path)
    try:
        data = PreparedData(path=path, manifest=read_manifest(path), _lock=lock)  # re-read under the lock
        if verify:
            for dim in data.dims:
                for name in SPLITS:
                    data.verify(dim, name, hashes=True)
    except BaseException:
        lock.release()
        raise
    return data
