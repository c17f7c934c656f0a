"""Where an export came from, named so that the names mean something on another machine: a Hub id where there is
one, else a file or folder name with a hash -- never this machine's absolute paths -- and the sha256 of every model
file the export read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fsutil import sha256_file
from ..models import resolve_model_source
from ..naming import is_hub_id
from .stage import ExportSource

# What is read of a model folder: the weights and the JSON configs (PEFT adapter config, lineage, tokenizer).
_MODEL_FILES = ("*.safetensors", "*.json")


def hub_id(spec: str | None) -> str | None:
    """`spec` when it names a Hub repository (not a local file or folder), else None."""
    if not spec or not is_hub_id(spec) or Path(spec).exists():
        return None
    try:
        return spec if resolve_model_source(spec).kind == "hub" else None
    except Exception:  # a malformed local path is simply not a Hub id
        return None


def portable_path(spec: str) -> str:
    """A local path as it may be shown elsewhere: as given when relative and inside the folder it was given from,
    else only its last part (the hash next to it says which file it was)."""
    p = Path(spec)
    if p.is_absolute() or ".." in p.parts or spec.startswith("~"):
        return p.name or spec
    return p.as_posix()


def model_name(spec: str, base_id: str | None) -> str:
    """The base model for the card and the lineage: its Hub id, else its folder or .gguf file name."""
    return base_id or hub_id(spec) or portable_path(spec)


def data_sources(src: ExportSource) -> dict[str, dict[str, Any] | None]:
    """Each exported dimension's entry in the prepared-data manifest; None where it cannot be read any more."""
    from ..data.store import load_prepared
    from ..errors import UsageError

    if src.prepared_dir is None:
        return {d: None for d in src.dims}
    try:
        prepared = load_prepared(src.prepared_dir)
    except UsageError:
        return {d: None for d in src.dims}
    out: dict[str, dict[str, Any] | None] = {}
    for d in src.dims:
        info = prepared.manifest["dimensions"].get(d)
        want = (src.manifest.get("data_hashes") or {}).get(d) or {}
        same = info and want and all((info.get("hashes") or {}).get(s) == h for s, h in want.items())
        # A prepared folder re-made with other data since the run describes something else: say unknown.
        out[d] = info if same else None
    return out


def source_entry(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """A dimension's data source, portable: {name, hub_id, sha256 (of the source file, or of a Hub dataset's
    rows), format}."""
    if not info:
        return None
    spec = str(info.get("source") or "unknown")
    hub = spec if info.get("source_kind") == "hub" or (info.get("source_kind") is None and hub_id(spec)) else None
    return {"name": hub or portable_path(spec), "hub_id": hub if hub and is_hub_id(hub) else None,
            "sha256": (info.get("hashes") or {}).get("source"), "format": info.get("format")}


def model_files(folder: Path, verified: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """sha256 of the files of a model folder that loading it reads (weights, configs), by file name. `verified`:
    the run's record of the folder ({name: {size, sha256}}) that ModelChain.verify has just checked every file
    against -- those sha256 are the files' own, so they are not computed a second time."""
    files = sorted({f for pattern in _MODEL_FILES for f in folder.glob(pattern) if f.is_file()})
    known = verified or {}
    return {f.name: known[f.name]["sha256"] if f.name in known else sha256_file(f) for f in files}


def input_hashes(src: ExportSource, *, reads_base: bool) -> dict[str, dict[str, str] | None]:
    """The sha256 of every model file the export reads: the base model's (when its weights are read, i.e. LoRA
    runs; None for a Hub model) and each stage folder's, keyed by the folder relative to the run directory.
    Call after `ModelChain.verify`: a stage file the run recorded has just been checked against its recorded
    sha256; every other file is hashed here, from the file itself."""
    out: dict[str, dict[str, str] | None] = {}
    if reads_base:
        base = resolve_model_source(src.base_spec)
        if base.kind == "gguf":
            out["base_model"] = {base.gguf_file: sha256_file(Path(base.path) / base.gguf_file)}
        elif base.kind == "folder":
            out["base_model"] = model_files(Path(base.path))
        else:
            out["base_model"] = None  # a Hub model: identified by its id and the run's weight fingerprint
    for k in (range(1, src.index + 1) if src.lora else [src.index]):
        folder = src.model_dir(k)
        out[folder.relative_to(src.run.root).as_posix()] = model_files(folder, src.manifest["stages"][k - 1].get("files"))
    return out
