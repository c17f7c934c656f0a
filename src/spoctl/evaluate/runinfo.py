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
    unfinished: list[dict[str, Any]] = field(default_factory=list)  # manifest entries of the stages left out

    @property
    def k_max(self) -> int:
        return len(self.stages)

    def label(self, k: int) -> str:
        """'base' or 'stage 2 harmless': how models are named in tables, plots and samples."""
        return "base" if k == 0 else f"stage {k} {self.stages[k - 1]['dim']}"

    def generator(self, k: int) -> str:
        """A file-name-safe model name: base, stage1-helpful, ..."""
        return "base" if k == 0 else f"stage{k}-{self.stages[k - 1]['dim']}"


def completed_prefix(manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The stages that completed, in order up to the first that did not (a later stage builds on every earlier
    one, so nothing after a gap is usable), and the stages left out."""
    done: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    for st in manifest.get("stages", []):
        if st.get("status") == "completed" and len(done) == st["index"] - 1:
            done.append(st)
        else:
            left.append(st)
    return done, left


def recorded_path(run: RunDir, recorded: str, what: str, flag: str) -> Path:
    """A path the run's manifest recorded, found from any working directory.

    Runs record the prepared data as an absolute path; older runs recorded it as `spoctl align` was given it,
    relative to the folder align ran in -- usually the run directory's parent (`--out hh`) or the current one.
    """
    path = Path(recorded).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = list(dict.fromkeys([run.root.resolve().parent / path, Path.cwd() / path]))
    for c in candidates:
        if c.exists():
            return c
    tried = " or ".join(str(c) for c in candidates)
    raise UsageError(f"{run.manifest_path}: {what} {recorded!r} is not there (looked for {tried}); pass {flag}")


def resolve_base(run: RunDir, spec: str) -> str:
    """The run's base model spec, a relative local path found as `recorded_path` finds one; a Hub id (or a path
    that exists from here) is kept as it is."""
    p = Path(spec).expanduser()
    if p.is_absolute() or p.exists():
        return spec
    beside_run = run.root.resolve().parent / p
    if beside_run.exists():
        return str(beside_run)
    if spec.startswith("."):
        raise UsageError(f"{run.manifest_path}: the base model {spec!r} is not there (looked for {Path.cwd() / p}"
                         f" and {beside_run}); run from the folder `spoctl align` ran in")
    return spec


def find_run(cfg: EvalConfig) -> tuple[RunDir, dict[str, Any]]:
    """The run to evaluate (RUN_DIR, else the latest under ./runs) and its manifest; UsageError when there is none,
    RUN_DIR is missing or is not a run. Needs no torch: `spoctl.evaluate.evaluate` asks it first, so a mistyped
    RUN_DIR is told in half a second instead of after the model libraries load."""
    root = cfg.run if cfg.run is not None else latest_run()
    if root is None:
        raise UsageError("no run given and no run under ./runs: spoctl eval RUN_DIR (a directory made by"
                         " `spoctl align`)")
    run = RunDir(root)
    if not run.root.is_dir():
        raise UsageError(f"{run.root}: no such run directory")
    return run, run.read_manifest()  # UsageError when there is none


def open_run(cfg: EvalConfig, out: Output) -> EvalRun:
    from ..data.store import load_prepared
    from ..engine.chain import ModelChain
    from ..models import load_tokenizer

    run, manifest = find_run(cfg)
    if cfg.run is None:
        out.info(f"evaluating the latest run: {run.root}")
        cfg = cfg.model_copy(update={"run": run.root})
    stages, unfinished = completed_prefix(manifest)
    if not stages:
        raise UsageError(f"{run.root}: no stage has completed yet, so there is nothing to evaluate"
                         " (finish it with `spoctl align ... --resume`)")
    warnings = [f"stage {st['index']} ({st['dim']}) is {st.get('status', 'unknown')}: not evaluated"
                for st in unfinished]
    for w in warnings:
        out.warn(w)

    run_dims = list(manifest.get("dims") or [])
    dims = list(cfg.dims) or run_dims
    unknown = [d for d in dims if d not in run_dims]
    if unknown:
        raise UsageError(f"--dims: the run has no dimension '{unknown[0]}' (it has: {', '.join(run_dims)})")

    if cfg.data is None and not manifest.get("data"):
        raise UsageError(f"{run.manifest_path}: names no prepared data; pass --data PREPARED_DIR")
    data_dir = cfg.data or recorded_path(run, manifest["data"], "the prepared data", "--data PREPARED_DIR")
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
    base = resolve_base(run, base)
    tokenizer = load_tokenizer(base, trust_remote_code=cfg.trust_remote_code)
    chain = ModelChain(base, run, manifest, trust_remote_code=cfg.trust_remote_code)
    return EvalRun(run=run, manifest=manifest, prepared=prepared, dims=dims, stages=stages, chain=chain,
                   tokenizer=tokenizer, warnings=warnings, unfinished=unfinished)
