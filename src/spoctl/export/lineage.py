"""`spoctl_lineage.json`: where an exported model came from, and the hashes to verify each step.

Everything in it is portable: models and data are named by Hub id, or by file name with a hash; the run by its
folder name and run key. No absolute path of the exporting machine is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..fsutil import sha256_file
from ..rundir import now_iso
from .check import CheckResult
from .provenance import model_name, portable_path, source_entry
from .stage import ExportSource

LINEAGE_NAME = "spoctl_lineage.json"
LINEAGE_VERSION = 2


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative POSIX paths), except the lineage file that lists them."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LINEAGE_NAME}


def is_export_folder(folder: Path) -> bool:
    """Whether `folder` is what `spoctl export` writes: it holds a lineage file of ours at its top."""
    try:
        lin = json.loads((folder / LINEAGE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(lin, dict) and {"lineage_version", "exported_stage", "files"} <= set(lin)


def lineage(src: ExportSource, folder: Path, *, kind: str, dtype: str, base_id: str | None, check: CheckResult,
            earlier: list[str], sources: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    m = src.manifest
    prepared = m.get("data")
    return {
        "lineage_version": LINEAGE_VERSION,
        "spoctl_version": __version__,
        "exported": now_iso(),
        "run": {"name": src.run.root.resolve().name, "run_key": m.get("run_key"), "created": m.get("created"),
                "mode": m.get("mode"), "lora": src.lora, "precision": m.get("precision"), "dims": m.get("dims")},
        "base_model": {"name": model_name(src.base_spec, base_id), "hub_id": base_id,
                       "fingerprint": m.get("base_fingerprint")},
        "exported_stage": {"index": src.index, "dim": src.dim},
        # What the files are: merged weights, or adapters to apply in `apply_order` on top of the base model.
        "export": {"kind": kind, "dtype": dtype,
                   **({"apply_order": [*earlier, "."]} if kind == "adapter" else {})},
        "stages": [{
            "index": st["index"], "dim": st["dim"], "beta": (st.get("plan") or {}).get("beta"),
            "weights": st.get("weights"), "plan": st.get("plan"), "pairs": st.get("pairs"),
            "data_hashes": st.get("data_hashes"),
            # Chains the previous model's fingerprint with this stage's saved weight files (engine/chain.py).
            "fingerprint": st.get("fingerprint"), "checkpoint": st.get("checkpoint"),
            "finished": st.get("finished"),
        } for st in src.stages],
        # The sha256 of each model file this export read, hashed from the files themselves as it started.
        "inputs": inputs,
        "data": {"prepared_dir": portable_path(str(prepared)) if prepared else None, "hashes": m.get("data_hashes"),
                 "sources": {d: source_entry(i) for d, i in sources.items()}},
        "check": check.to_dict(),
        "files": file_hashes(folder),
    }
