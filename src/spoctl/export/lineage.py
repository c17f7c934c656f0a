"""`spoctl_lineage.json`: where an exported model came from, and the hashes to verify each step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..fsutil import sha256_file
from ..rundir import now_iso
from .check import CheckResult
from .stage import ExportSource

LINEAGE_NAME = "spoctl_lineage.json"
LINEAGE_VERSION = 1


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative POSIX paths), except the lineage file that lists them."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LINEAGE_NAME}


def lineage(src: ExportSource, folder: Path, *, kind: str, dtype: str, base_id: str | None, check: CheckResult,
            earlier: list[str], sources: dict[str, Any]) -> dict[str, Any]:
    m = src.manifest
    return {
        "lineage_version": LINEAGE_VERSION,
        "spoctl_version": __version__,
        "exported": now_iso(),
        "run": {"dir": str(src.run.root.resolve()), "run_key": m.get("run_key"), "created": m.get("created"),
                "mode": m.get("mode"), "lora": src.lora, "precision": m.get("precision"), "dims": m.get("dims")},
        "base_model": {"spec": src.base_spec, "hub_id": base_id, "fingerprint": m.get("base_fingerprint")},
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
        "data": {"prepared_dir": m.get("data"), "hashes": m.get("data_hashes"),
                 "sources": {d: (i or {}).get("source") for d, i in sources.items()}},
        "check": check.to_dict(),
        "files": file_hashes(folder),
    }
