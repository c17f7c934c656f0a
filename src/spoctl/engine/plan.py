"""What each stage of a run does, decided once from the configuration: `StagePlan`.

A plan is the one place that knows which frozen models stage n needs and with which weights the earlier
dimensions enter its offset (docs/method.md). The frozen passes, the offset, the manifest entry and the run's
identity all read it; nothing else re-derives it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch

from .. import losses
from ..config import AlignConfig, LossConfig
from . import extensions


@dataclass(frozen=True)
class EarlierStage:
    """What a later stage needs to know of an earlier one: its dimension, its beta, its alpha (previous mode) and the
    weights it gave the dimensions before it (lambda^(j)), which the implicit-reward recursion undoes."""

    dim: str
    beta: float
    alpha: float
    weights: tuple[float, ...]


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
    earlier: tuple[EarlierStage, ...] = ()  # stages 1..n-1, in order
    # Stage extensions (engine/extension.py: --keep, --replay), in the order they act; none: plain SPO.
    extensions: tuple[Any, ...] = ()

    def extension(self, key: str) -> Any:
        """This stage's plan of the extension named `key`, or None when it has none."""
        return next((e for e in self.extensions if e.key == key), None)

    @property
    def keep(self) -> Any:
        """The stage's --keep plan (engine/keep.py reads it), or None."""
        return self.extension("keep")

    # ---- the method: which models, which weights -----------------------------------------------------------
    @property
    def reference(self) -> int:
        """Stage n trains against pi_{n-1}."""
        return self.index - 1

    @property
    def offset_models(self) -> list[int]:
        """The frozen models the offset needs besides the reference: pi_{n-2} in previous mode (none when alpha is
        0: the offset is then an exact zero), every earlier model pi_0..pi_{n-2} in all mode."""
        n = self.index
        if n == 1:
            return []
        if self.mode == "previous":
            return [n - 2] if self.alpha else []
        return list(range(n - 1))

    @property
    def earlier_weights(self) -> dict[str, float]:
        """lambda_i^(n) by earlier dimension, as this stage weighs them: given in all mode; alpha^(n-i) (with per-stage
        alphas, their products) in previous mode, which the collapsed previous-mode offset equals."""
        if self.mode == "all":
            return dict(self.weights)
        return dict(zip([e.dim for e in self.earlier], self.weight_vector))

    @property
    def weight_vector(self) -> tuple[float, ...]:
        """lambda^(n) = [lambda_1^(n), ..., lambda_{n-1}^(n)] in stage order."""
        if self.mode == "all":
            return tuple(float(self.weights.get(e.dim, 0.0)) for e in self.earlier)
        return tuple(losses.previous_mode_weights([*(e.alpha for e in self.earlier), self.alpha], self.index))

    def offset(self, logps: Callable[[int], Any]) -> torch.Tensor:
        """The SPO constant of every pair of one split: zero at stage 1 (and for alpha = 0), §previous or §all mode
        after. `logps(k)` returns pi_k's log-probs on that split (`.chosen`, `.rejected`); only the models in
        `reference` and `offset_models` are asked for."""
        ref = logps(self.reference)
        if not self.offset_models:
            return torch.zeros_like(ref.chosen)
        if self.mode == "previous":
            prev2 = logps(self.index - 2)
            return losses.spo_offset_previous(self.alpha, self.earlier[-1].beta, ref.chosen, ref.rejected,
                                              prev2.chosen, prev2.rejected)
        return losses.spo_offset_all(list(self.weight_vector), self.reward_margins(logps))

    def reward_margins(self, logps: Callable[[int], Any]) -> list[torch.Tensor]:
        """Delta r_i of every earlier dimension on one split, from pi_0..pi_{n-1} (the implicit-reward recursion)."""
        lp = [logps(k) for k in range(self.index)]
        return losses.implicit_reward_margins(betas=[e.beta for e in self.earlier],
                                              weights=[list(e.weights) for e in self.earlier],
                                              logps_chosen=[x.chosen for x in lp],
                                              logps_rejected=[x.rejected for x in lp])

    def frozen_requests(self, all_dims: list[str]) -> dict[int, list[tuple[str, str]]]:
        """Which frozen models this stage needs, on which (dimension, split): the reference and the offset models on
        the stage's own data (train for the loss, eval for its eval metrics), and the base model pi_0 on every
        dimension's eval split (the forgetting view, log(pi_theta / pi_0), evaluated during the stage)."""
        own = [(self.dim, "train"), (self.dim, "eval")]
        need: dict[int, list[tuple[str, str]]] = {k: list(own) for k in [self.reference, *self.offset_models]}
        base = need.setdefault(0, [])
        base += [(d, "eval") for d in all_dims if (d, "eval") not in base]
        for ext in self.extensions:
            for k, requests in ext.frozen_requests(self.index, self.dim).items():
                have = need.setdefault(k, [])
                have += [r for r in requests if r not in have]
        return need

    def manifest_entry(self, describe: Callable[[int], str]) -> dict[str, Any]:
        """What the manifest records of the plan: settings, models (as `describe(k)` names them) and weights."""
        entry = {"plan": self.to_manifest(), "reference_model": describe(self.reference),
                 "offset_models": [describe(k) for k in self.offset_models], "weights": self.earlier_weights}
        for ext in self.extensions:
            entry.update(ext.manifest_entry())
        return entry

    # ---- training length -----------------------------------------------------------------------------------
    def steps_per_epoch(self, pairs: int) -> int:
        """Optimizer steps in one pass over `pairs` training pairs (an incomplete last batch is dropped)."""
        return pairs // self.batch_size

    def total_steps(self, steps_per_epoch: int) -> int:
        steps = math.ceil(self.epochs * steps_per_epoch)
        return min(steps, self.max_steps) if self.max_steps else steps

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(replace(self, earlier=(), extensions=()))
        d.pop("earlier")
        # Each extension under its key; a stage without extensions records (and is identified by) exactly what a
        # plain SPO stage always did.
        d.pop("extensions")
        d.update({ext.key: ext.to_manifest() for ext in self.extensions})
        d["loss"] = self.loss.model_dump()
        return d


def stage_plans(cfg: AlignConfig) -> list[StagePlan]:
    """One plan per dimension: the global `align` settings, overridden by `align.stages.<dim>`."""
    plans: list[StagePlan] = []
    for n, dim in enumerate(cfg.dims, start=1):
        o = cfg.stages.get(dim)

        def pick(name: str) -> Any:
            v = getattr(o, name) if o is not None else None
            return getattr(cfg, name) if v is None else v

        weights: dict[str, float] = {}
        if cfg.mode == "all":
            given = pick("weights") or {}
            weights = {d: float(given.get(d, 0.0)) for d in cfg.dims[: n - 1]}
        plan = StagePlan(
            index=n, dim=dim, beta=pick("beta"), mode=cfg.mode, alpha=pick("alpha"), weights=weights,
            learning_rate=pick("learning_rate"), epochs=pick("epochs"), batch_size=pick("batch_size"),
            max_steps=pick("max_steps"), loss=pick("loss"),
            earlier=tuple(EarlierStage(p.dim, p.beta, p.alpha, p.weight_vector) for p in plans),
            extensions=tuple(e for e in (kind.plan(cfg, n) for kind in extensions.KINDS) if e is not None),
        )
        plans.append(plan)
    return plans
