"""Stage extensions: what a stage may add to plain SPO training without a branch in the training loop.

`--keep` (engine/keep.py) and `--replay` (engine/replay.py) are extensions; a new one is a module with three
objects and one line in `engine/extensions.py`:

- a **kind** (`ExtensionKind`): reads the configuration into a plan per stage, and knows how its manifest entries
  show in the end-of-run table and result document;
- a **plan** (`ExtensionPlan`, frozen, part of the stage's plan and so of the run's identity): which frozen
  log-probs it needs and what the manifest records of it; `start` builds the runtime object once they exist;
- the **runtime extension** (`StageExtension`), which `train_stage` calls at fixed points of every step.

The loop's contract, in order, per optimizer step: `offset(base)` gives the SPO offset the stage's pairs train with
(an extension that does not change it returns `base`); `before_step(step, scorer)` may backward an extra loss
(under `dist.no_sync`: the stage's own last micro-batch synchronises the accumulated gradient) and returns the tokens
it trained on, all processes together; after the optimizer step `after_step(done, scorer)` returns metrics to log.
A checkpoint carries `state()` under the extension's key and a resume hands it back to `load_state` (None: the
checkpoint was written without this extension). At the end of the stage `finish` returns the manifest entries it
adds and `cost` its share of the stage's cost. An extension that does nothing in a step must leave the step exactly
as plain SPO computes it: a run whose extensions are all idle is bit-identical to one without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from .batching import TokenPair
from .frozen import FrozenLogps


@dataclass
class StageInputs:
    """What an extension gets when its stage starts: the frozen log-probs its plan asked for, already computed."""

    plan: Any  # engine.plan.StagePlan
    cfg: Any  # config.AlignConfig
    dist: Any  # engine.distributed.Distributed
    pad_token_id: int
    train: Sequence[TokenPair]  # the stage's own training pairs
    base_offset: torch.Tensor  # the stage's SPO offset on them
    total_steps: int
    split_pairs: Callable[[str, str], list[TokenPair]]  # (dim, split) -> pairs
    logps: Callable[[int, str, str], FrozenLogps]  # (k, dim, split) -> pi_k's frozen log-probs
    warn: Callable[[str], None]


class StageExtension(Protocol):
    key: str

    def offset(self, base: torch.Tensor) -> torch.Tensor: ...

    def before_step(self, step: int, scorer: Any) -> float: ...

    def after_step(self, done: int, scorer: Any) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any] | None) -> None: ...

    def finish(self, train_seconds: float, info: Callable[[str], None],
               warn: Callable[[str], None]) -> dict[str, Any]: ...

    def cost(self, train_seconds: float) -> dict[str, Any]: ...


class ExtensionPlan(Protocol):
    key: str

    def frozen_requests(self, index: int, dim: str) -> dict[int, list[tuple[str, str]]]: ...

    def to_manifest(self) -> dict[str, Any]: ...

    def manifest_entry(self) -> dict[str, Any]: ...

    def check_processes(self, strategy: str, world: int) -> None: ...

    def start(self, inputs: StageInputs) -> StageExtension: ...


class ExtensionKind(Protocol):
    key: str
    # End-of-run table: (column header, the cell of one summary row).
    columns: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...]

    def plan(self, cfg: Any, index: int) -> ExtensionPlan | None: ...

    def summary(self, entry: dict[str, Any]) -> dict[str, Any]: ...

    def result(self, stages: list[dict[str, Any]]) -> dict[str, Any]: ...


class Idle:
    """Defaults for a runtime extension: no offset change, no extra loss, no metrics, no state, no cost."""

    key = "idle"

    def offset(self, base: torch.Tensor) -> torch.Tensor:
        return base

    def before_step(self, step: int, scorer: Any) -> float:
        return 0.0

    def after_step(self, done: int, scorer: Any) -> dict[str, float]:
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any] | None) -> None:
        return None

    def finish(self, train_seconds: float, info: Callable[[str], None],
               warn: Callable[[str], None]) -> dict[str, Any]:
        return {}

    def cost(self, train_seconds: float) -> dict[str, Any]:
        return {}
