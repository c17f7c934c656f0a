"""The prepared-data directory: its schema, and reading it back (the API `spoctl align` and `eval` use).

Layout:
    OUT/manifest.json
    OUT/<dim>/train/   (datasets.Dataset.save_to_disk, Arrow)
    OUT/<dim>/eval/
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import UsageError

FORMAT_VERSION = 1
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
    "prompt_messages",  # str: JSON list of {role, content}, system prompt included, for generation later
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
    h = hashlib.sha256()
    for row in zip(pair_ids, prompts, chosen, rejected):
        h.update(json.dumps([row[0], list(row[1]), list(row[2]), list(row[3])], separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def dataset_hash(ds: Any) -> str:
    """split_hash of a loaded split (to check that data on disk is what the manifest describes)."""
    cols = ds.select_columns(["pair_id", *TOKEN_COLUMNS]).to_dict()
    return split_hash(cols["pair_id"], *(cols[c] for c in TOKEN_COLUMNS))


@dataclass
class PreparedData:
    """A prepared-data directory: the manifest plus lazy access to each dimension's splits."""

    path: Path
    manifest: dict[str, Any]
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
        """The manifest entry of one dimension (source, format, counts, tokens, hashes)."""
        self._check_dim(dim)
        return self.manifest["dimensions"][dim]

    def split(self, dim: str, name: str = "train"):
        """The `name` split ('train' or 'eval') of `dim` as a datasets.Dataset (memory-mapped Arrow)."""
        import datasets

        self._check_dim(dim)
        if name not in SPLITS:
            raise UsageError(f"no split {name!r}; prepared data has: {', '.join(SPLITS)}")
        key = (dim, name)
        if key not in self._cache:
            where = self.path / dim / name
            if not where.is_dir():
                raise UsageError(
                    f"{where}: missing; the prepared data in {self.path} is incomplete. Run spoctl prepare again with --force"
                )
            try:
                self._cache[key] = datasets.load_from_disk(str(where))
            except Exception as err:
                raise UsageError(
                    f"{where}: cannot be read ({type(err).__name__}: {err}); run spoctl prepare again with --force"
                ) from None
        return self._cache[key]

    def data_hash(self, dim: str, name: str = "train") -> str:
        """sha256 of the split's token ids as recorded in the manifest (see split_hash)."""
        self._check_dim(dim)
        if name not in SPLITS:
            raise UsageError(f"no split {name!r}; prepared data has: {', '.join(SPLITS)}")
        return self.manifest["dimensions"][dim]["hashes"][name]

    def _check_dim(self, dim: str) -> None:
        if dim not in self.manifest["dimensions"]:
            raise UsageError(
                f"prepared data in {self.path} has no dimension '{dim}' (it has: {', '.join(self.dims)});"
                f" run spoctl prepare with --data {dim}=..."
            )


def load_prepared(path: Path | str) -> PreparedData:
    """Open a directory written by `spoctl prepare`; errors say what to run to fix it."""
    path = Path(path)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{mpath}: damaged ({err}); run spoctl prepare again with --force") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise UsageError(
            f"{mpath}: prepared-data format version {version!r}, this spoctl reads version {FORMAT_VERSION};"
            " run spoctl prepare again with --force"
        )
    if not isinstance(manifest.get("dimensions"), dict) or not manifest["dimensions"]:
        raise UsageError(f"{mpath}: damaged (no dimensions); run spoctl prepare again with --force")
    return PreparedData(path=path, manifest=manifest)
