"""`--keep` as a stage extension (engine/extension.py): the glue between the loop's protocol and the Keeper of
engine/keep.py, which owns the constraints, multipliers and replay."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import UsageError
from .extension import StageInputs
from .keep import KeepPlan, Keeper, keep_plan, kept_dims, report, table_cell


class KeepExtensionPlan(KeepPlan):
    """A stage's KeepPlan with what the extension protocol asks of a plan (same fields, so the same manifest and
    run identity as before keep became an extension)."""

    key = "keep"

    @classmethod
    def of(cls, kp: KeepPlan) -> "KeepExtensionPlan":
        return cls(**{name: getattr(kp, name) for name in kp.__dataclass_fields__})

    def to_manifest(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def manifest_entry(self) -> dict[str, Any]:
        return {"keep_fractions": {t.dim: t.fraction for t in self.targets}}

    def check_processes(self, strategy: str, world: int) -> None:
        if strategy == "fsdp" and world > 1:
            # The replay runs its own micro-batches per process, which FSDP's collective forwards would need in
            # step (the constraint measurement is shared out like the eval views, and would run).
            raise UsageError("--keep runs under DDP or on one process: with distributed fsdp over several processes "
                             "it is not supported yet; use --set distributed=ddp (or an accelerate config without "
                             "FSDP)")

    def start(self, inputs: StageInputs) -> "KeepExtension":
        kept = kept_dims(inputs.plan, inputs.cfg.seed, inputs.split_pairs, inputs.logps, inputs.warn)
        keeper = Keeper(kept, plan=inputs.plan, cfg=inputs.cfg, dist=inputs.dist, pad_token_id=inputs.pad_token_id,
                        total=inputs.total_steps, base_offset=inputs.base_offset)
        return KeepExtension(keeper)


class KeepExtension:
    """The Keeper behind the stage-extension protocol."""

    key = "keep"

    def __init__(self, keeper: Keeper):
        self.keeper = keeper

    def offset(self, base: torch.Tensor) -> torch.Tensor:
        return self.keeper.offset_train  # the base offset: the multipliers act through the constraint term

    def before_step(self, step: int, scorer: Any) -> float:
        return self.keeper.replay(step, scorer)

    def after_step(self, done: int, scorer: Any) -> dict[str, float]:
        return self.keeper.after_step(done, scorer)

    def state(self) -> dict[str, Any]:
        return self.keeper.state()

    def load_state(self, state: dict[str, Any] | None) -> None:
        self.keeper.load_state(state)

    def finish(self, train_seconds: float, info: Callable[[str], None],
               warn: Callable[[str], None]) -> dict[str, Any]:
        """What it cost, and whether each constraint held (manifest and console)."""
        return {"keep": self.keeper.summary(),
                "keep_violations": report(self.keeper, self.keeper.plan, train_seconds, info, warn)}

    def cost(self, train_seconds: float) -> dict[str, Any]:
        return self.keeper.cost(train_seconds)


class KeepKind:
    """`--keep` / `align.keep` / `stages.<dim>.keep` (registered in engine/extensions.py)."""

    key = "keep"
    columns = (("kept: margin vs bound, multiplier", lambda row: table_cell(row.get("keep"))),
               ("keep s", lambda row: row.get("keep_seconds", "")))

    @staticmethod
    def plan(cfg: Any, index: int) -> KeepExtensionPlan | None:
        own = cfg.stages.get(cfg.dims[index - 1])
        kp = keep_plan(cfg, index, own.keep if own is not None else None)
        return KeepExtensionPlan.of(kp) if kp is not None else None

    @staticmethod
    def summary(entry: dict[str, Any]) -> dict[str, Any]:
        if "keep" not in entry:
            return {}
        return {"keep": {d: k["final"] | {"threshold": k["threshold"]} for d, k in entry["keep"].items()},
                "keep_seconds": entry.get("cost", {}).get("keep_seconds")}

    @staticmethod
    def result(stages: list[dict[str, Any]]) -> dict[str, Any]:
        """Constraints that ended violated, every stage's (empty: all held)."""
        return {"keep_violations": [v for st in stages for v in st.get("keep_violations", [])]}
