"""Which stage of a run to export, and the facts about it that every part of the export needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import Output
from ..errors import UsageError
from ..evaluate.runinfo import recorded_path, resolve_base
from ..rundir import RunDir


@dataclass(frozen=True)
class ExportSource:
    """Stage `index` of the run in `run`: its manifest entry and the chain of stages that led to it."""

    run: RunDir
    manifest: dict[str, Any]
    index: int
    base: str = ""  # the base model spec, a relative local path resolved (see evaluate.runinfo.resolve_base)
    prepared_dir: Path | None = None  # the run's prepared data, found from this folder; None if it is gone

    @property
    def entry(self) -> dict[str, Any]:
        return self.manifest["stages"][self.index - 1]

    @property
    def dim(self) -> str:
        return self.entry["dim"]

    @property
    def base_spec(self) -> str:
        return self.base or self.manifest["base_model"]

    @property
    def lora(self) -> bool:
        return bool(self.manifest.get("lora"))

    @property
    def stages(self) -> list[dict[str, Any]]:
        """Stages 1..index: everything the exported model has been through, in order."""
        return self.manifest["stages"][: self.index]

    @property
    def dims(self) -> list[str]:
        return [st["dim"] for st in self.stages]

    def model_dir(self, k: int | None = None) -> Path:
        """Stage k's saved model folder (default: the exported stage's)."""
        k = self.index if k is None else k
        return self.run.stage_model_dir(k, self.manifest["stages"][k - 1]["dim"])


def read_run(run_dir: Path | None) -> tuple[RunDir, dict[str, Any]]:
    """The run `--run` names and its manifest; UsageError when none is given or it is not a run. Needs no torch:
    `spoctl.export.export_model` asks it before the exporter is imported, so a mistyped --run is told at once."""
    if run_dir is None:
        raise UsageError("no run given: pass --run RUN_DIR (made by `spoctl align`)")
    run = RunDir(run_dir)
    return run, run.read_manifest()  # UsageError when RUN_DIR is not a run


def select_stage(run_dir: Path | None, stage: str, out: Output) -> ExportSource:
    """Resolve `--stage last|N|DIM` against the run's manifest; only a completed stage can be exported."""
    run, manifest = read_run(run_dir)
    stages = manifest.get("stages") or []
    done = [st["index"] for st in stages if st.get("status") == "completed"]
    spec = stage.strip()
    if spec == "last":
        if not done:
            raise UsageError(f"{run.root}: no stage has completed yet; finish `spoctl align` (with --resume) first")
        index = max(done)
        if index < len(stages):
            # Exporting the newest finished stage of an unfinished run is useful, but never silently.
            out.warn(f"{run.root}: the run has not finished (stage {index + 1} of {len(stages)} is "
                     f"{stages[index].get('status', 'pending')}); exporting stage {index} ({stages[index - 1]['dim']})")
    elif spec.isdigit():
        index = int(spec)
        if not 1 <= index <= len(stages):
            raise UsageError(f"--stage {spec}: the run has stages 1 to {len(stages)}")
    else:
        by_dim = {st["dim"]: st["index"] for st in stages}
        if spec not in by_dim:
            raise UsageError(f"--stage {spec}: no such stage; use last, a number (1-{len(stages)}) or a dimension"
                             f" ({', '.join(by_dim)})")
        index = by_dim[spec]
    entry = stages[index - 1]
    if entry.get("status") != "completed":
        raise UsageError(f"{run.root}: stage {index} ({entry['dim']}) has not completed (status: "
                         f"{entry.get('status', 'pending')}); resume the run with `spoctl align --resume` first")
    src = ExportSource(run=run, manifest=manifest, index=index, base=resolve_base(run, manifest["base_model"]),
                       prepared_dir=_prepared_dir(run, manifest))
    if not src.model_dir().is_dir():
        raise UsageError(f"{src.model_dir()}: stage {index}'s model is missing; the run directory is incomplete")
    return src


def _prepared_dir(run: RunDir, manifest: dict[str, Any]) -> Path | None:
    """The prepared data the run trained on, or None when it is no longer there (the export then says so)."""
    if not manifest.get("data"):
        return None
    try:
        return recorded_path(run, manifest["data"], "the prepared data", "--data")
    except UsageError:
        return None
