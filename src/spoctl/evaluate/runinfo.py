"""Opening a finished (or partly finished) run for evaluation: its manifest, prepared data, completed stages,
tokenizer and model chain. Nothing here computes; it only checks that the pieces fit together."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import EvalConfig
from ..console import Output
from ..errors import UsageError
from ..rundir import RunDir, latest_run


@dataclass
class EvalRun:
    run: RunDir
    manifest: dict[str, Any]
    prepared: Any  # spoctl.data.store.PreparedData
    dims: list[str]  # the dimensions evaluated, in stage order
    stages: list[dict[str, Any]]  # the completed stages' manifest entries: stages 1..K, in order
    chain: Any  # spoctl.engine.chain.ModelChain
    tokenizer: Any
    warnings: list[str] = field(default_factory=list)

    @property
    def k_max(self) -> int:
        return len(self.stages)

    def label(self, k: int) -> str:
        """'base' or 'stage 2 harmless': how models are named in tables, plots and samples."""
        return "base" if k == 0 else f"stage {k} {self.stages[k - 1]['dim']}"

    def generator(self, k: int) -> str:
        """A file-name-safe model name: base, stage1-helpful, ..."""
        return "base" if k == 0 else f"stage{k}-{self.stages[k - 1]['dim']}"


def completed_prefix(manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The stages that completed, in order up to the first that did not (a later stage builds on every earlier
    one, so nothing after a gap is usable), and a warning per stage left out."""
    done: list[dict[str, Any]] = []
    warnings: list[str] = []
    for st in manifest.get("stages", []):
        if st.get("status") == "completed" and len(done) == st["index"] - 1:
            done.append(st)
        else:
            warnings.append(f"stage {st['index']} ({st['dim']}) is {st.get('status', 'unknown')}: not evaluated")
    return done, warnings


def open_run(cfg: EvalConfig, out: Output) -> EvalRun:
    from ..data.store import load_prepared
    from ..engine.chain import ModelChain
    from ..models import load_tokenizer

    if cfg.run is None:
        latest = latest_run()
        if latest is None:
            raise UsageError("no run given and no run under ./runs: spoctl eval RUN_DIR (a directory made by"
                             " `spoctl align`)")
        out.info(f"evaluating the latest run: {latest}")
        cfg = cfg.model_copy(update={"run": latest})
    run = RunDir(cfg.run)
    if not run.root.is_dir():
        raise UsageError(f"{run.root}: no such run directory")
    manifest = run.read_manifest()  # UsageError when there is none
    stages, warnings = completed_prefix(manifest)
    if not stages:
        raise UsageError(f"{run.root}: no stage has completed yet, so there is nothing to evaluate"
                         " (finish it with `spoctl align ... --resume`)")
    for w in warnings:
        out.warn(w)

    run_dims = list(manifest.get("dims") or [])
    dims = list(cfg.dims) or run_dims
    unknown = [d for d in dims if d not in run_dims]
    if unknown:
        raise UsageError(f"--dims: the run has no dimension '{unknown[0]}' (it has: {', '.join(run_dims)})")

    if cfg.data is None and not manifest.get("data"):
        raise UsageError(f"{run.manifest_path}: names no prepared data; pass --data PREPARED_DIR")
    data_dir = Path(cfg.data or manifest["data"])
    if cfg.data is None and not data_dir.is_dir():
        # The manifest keeps the path as align was given it, possibly relative to another working directory.
        raise UsageError(f"{data_dir}: the run's prepared data is not there (from {run.manifest_path});"
                         " pass --data PREPARED_DIR")
    prepared = load_prepared(data_dir)
    recorded = manifest.get("data_hashes") or {}
    for d in dims:
        want = (recorded.get(d) or {}).get("eval")
        if want and prepared.data_hash(d, "eval") != want:
            raise UsageError(f"{data_dir}: the eval split of '{d}' is not the one this run was trained with;"
                             " pass --data with the run's prepared data")

    base = manifest.get("base_model")
    if not base:
        raise UsageError(f"{run.manifest_path}: names no base model; the manifest is damaged")
    tokenizer = load_tokenizer(base, trust_remote_code=cfg.trust_remote_code)
    chain = ModelChain(base, run, manifest, trust_remote_code=cfg.trust_remote_code)
    return EvalRun(run=run, manifest=manifest, prepared=prepared, dims=dims, stages=stages, chain=chain,
                   tokenizer=tokenizer, warnings=warnings)
