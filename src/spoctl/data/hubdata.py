"""Rows of a dataset repository through `datasets.load_dataset`: a Hub id or a local folder in the same layout
(data files in subfolders, as `Anthropic/hh-rlhf` keeps helpful-base/ and harmless-base/).

Options map one to one onto `load_dataset`: subset (its `name`), data_dir, data_files, split, revision, streaming.
A Hub id is checked for reachability first (spoctl.hub), so an offline machine fails in seconds; offline mode
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) reads the local datasets cache instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

from .. import hub
from ..errors import InputError, UsageError
from .readers import Limits
from .records import Record, Where, check_record, json_type_name


class DatasetRows:
    """The rows of one split, located (`label: record N`), checked and hashed as they are read.

    Without streaming the split is downloaded (or read from the cache) first; with streaming rows arrive as they
    are iterated, so a reader that stops early reads only what it needed.
    """

    def __init__(self, location: str, options: dict[str, Any], *, remote: bool, default_split: str | None,
                 limits: Limits):
        self.location, self.remote, self.limits = location, remote, limits
        self.streaming = bool(options.get("streaming"))
        self.options = {k: v for k, v in options.items() if k != "streaming"}
        if remote and not hub.offline_mode():
            reason = hub.unreachable_reason()
            if reason is not None:
                raise _unreachable(location, reason)
        self.saved = self._saved_dataset()
        given = self.options.pop("split", None)
        self.split = given or default_split or (self._own_split(given) if self.saved else self._default_split())
        rest = urlencode({k: ",".join(v) if isinstance(v, list) else v for k, v in self.options.items()})
        self.label = f"{location}{'?' + rest if rest else ''}[{self.split}]"
        self._sha = hashlib.sha256()
        self.read = 0

    def _kwargs(self) -> dict[str, Any]:
        o = self.options
        return {"name": o.get("subset"), "data_dir": o.get("data_dir"), "data_files": o.get("data_files"),
                "revision": o.get("revision")}

    def _default_split(self) -> str:
        """train when the dataset has it, else its only split (a local folder of test files has just `test`)."""
        import datasets

        try:
            names = datasets.get_dataset_split_names(self.location, self._kwargs()["name"],
                                                     **{k: v for k, v in self._kwargs().items() if k != "name"})
        except Exception:  # let load_dataset report the real problem
            return "train"
        if "train" in names or len(names) != 1:
            return "train"
        return names[0]

    def _saved_dataset(self) -> Path | None:
        """A folder written by `datasets.Dataset.save_to_disk` (state.json + dataset_info.json + Arrow files), which
        `load_dataset` refuses; it is read with `load_from_disk` (Arrow only, nothing executed). A saved DatasetDict
        (dataset_dict.json, one folder per split) loads through `load_dataset` like any dataset folder."""
        if self.remote:
            return None
        folder = Path(self.location).expanduser()
        if not ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()):
            return None
        extra = [k for k in self.options if k != "split"]
        if extra:
            raise UsageError(f"{self.location}: a dataset saved with save_to_disk holds one split and no subsets;"
                             f" {', '.join(extra)} do not apply to it")
        return folder

    def _own_split(self, given: str | None) -> str:
        """The split a saved Dataset records in its state.json (train when it records none)."""
        try:
            own = json.loads((self.saved / "state.json").read_text(encoding="utf-8")).get("_split")  # type: ignore[operator]
        except (OSError, ValueError):
            own = None
        return own or "train"

    def _load(self) -> Any:
        import datasets

        if self.saved is not None:
            try:
                ds = datasets.load_from_disk(str(self.saved))
            except Exception as err:  # a damaged folder: missing or unreadable Arrow files
                raise self._error(err) from None
            own = self._own_split(None)
            if self.split != own and self.split != "train":
                raise UsageError(f"{self.location}: a dataset saved with save_to_disk holds one split ({own});"
                                 f" split={self.split} is not it")
            return ds.to_iterable_dataset() if self.streaming else ds
        try:
            return datasets.load_dataset(self.location, split=self.split, streaming=self.streaming, **self._kwargs())
        except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError, HF errors...
            raise self._error(err) from None

    def _error(self, err: Exception) -> UsageError:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if self.remote and (isinstance(err, ConnectionError) or "offline" in first.lower() or "reach" in first.lower()):
            return _unreachable(self.location, first)
        return UsageError(f"could not load dataset {self.label}: {type(err).__name__}: {first}")

    def __iter__(self) -> Iterator[Record]:
        rows = self._load()
        it = iter(rows)
        index = 0
        while True:
            try:
                row = next(it)
            except StopIteration:
                break
            except Exception as err:  # a streamed file that breaks half-way, a connection that drops
                raise self._error(err) from None
            index += 1
            where, rec = Where(self.label, "record", index), row
            if not isinstance(rec, dict):
                raise where.error(f"expected an object, got {json_type_name(rec)}")
            check_record(rec, where, self.limits.max_record_chars)
            self._sha.update(json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
            self.read = index
            yield where, rec
        if index == 0:
            raise InputError(f"split '{self.split}' is empty", path=self.label)

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON of the rows read so far (all of them, unless a stream was stopped early)."""
        return self._sha.hexdigest()


def _unreachable(spec: str, detail: str) -> UsageError:
    return UsageError(
        f"could not load Hub dataset '{spec}' (there is no local file or folder of that name either):"
        f" the Hugging Face Hub could not be reached ({detail}). "
        f"Download the data and pass a local file or dataset folder instead, e.g. --data DIM=path/to/file.jsonl "
        f"(or set HF_DATASETS_OFFLINE=1 to use a copy already in the local datasets cache)"
    )
