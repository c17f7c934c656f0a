"""Per-stage settings: the global `align` values, overridden by `align.stages.<dim>`."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import AlignConfig, LossConfig


@dataclass(frozen=True)
class StagePlan:
    index: int  # 1-based: stage n aligns dims[n-1]
    dim: str
    beta: float
    mode: str  # "previous" | "all"
    alpha: float  # previous mode
    weights: dict[str, float] = field(default_factory=dict)  # all mode: lambda_i^(n) by earlier dimension
    learning_rate: float = 5e-6
    epochs: float = 1.0
    batch_size: int = 8
    max_steps: int | None = None
    loss: LossConfig = field(default_factory=LossConfig)

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss"] = self.loss.model_dump()
        return d

    def total_steps(self, steps_per_epoch: int) -> int:
        steps = math.ceil(self.epochs * steps_per_epoch)
        return min(steps, self.max_steps) if self.max_steps else steps


def stage_plans(cfg: AlignConfig) -> list[StagePlan]:
    plans = []
    for n, dim in enumerate(cfg.dims, start=1):
        o = cfg.stages.get(dim)

        def pick(name: str) -> Any:
            v = getattr(o, name) if o is not None else None
            return getattr(cfg, name) if v is None else v

        earlier = cfg.dims[: n - 1]
        weights: dict[str, float] = {}
        if cfg.mode == "all":
            given = pick("weights") or {}
            weights = {d: float(given.get(d, 0.0)) for d in earlier}
        plans.append(StagePlan(
            index=n, dim=dim, beta=pick("beta"), mode=cfg.mode, alpha=pick("alpha"), weights=weights,
            learning_rate=pick("learning_rate"), epochs=pick("epochs"), batch_size=pick("batch_size"),
            max_steps=pick("max_steps"), loss=pick("loss"),
        ))
    return plans


# Settings that do not change what a run computes: they may differ between a run and its resume.
_NOT_IDENTITY = {"out", "resume", "report_to", "log_every", "save_every", "eval_every", "frozen_batch_size",
                 "logprob_chunk", "layout", "compile", "gradient_checkpointing", "attention"}  # same math


def run_key(cfg: AlignConfig, base_fingerprint: str, data_hashes: dict[str, Any]) -> str:
    """Identity of a run: same key, same computation. A RUN_DIR with another key belongs to another run."""
    ident = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IDENTITY}
    ident["data"] = None  # the folder may move; its content hashes are what matters
    blob = json.dumps({"config": ident, "base": base_fingerprint, "data": data_hashes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
