"""`--replay DIM=SHARE`: rehearsal, the baseline every claim about SPO and `--keep` must beat.

Stage n mixes a fixed share of an earlier dimension's training pairs into its batches: with a batch of B pairs
of its own, every step also trains on ceil(SHARE x B) pairs of DIM (rounded up to a multiple of the processes),
drawn afresh each step from all of DIM's training pairs by a pure function of (seed, stage, dimension, step), so a
resumed stage replays what an uninterrupted one would. Their loss is the one `--keep`'s replay uses
(`losses.replay_loss`: the stage's preference loss on beta_n * Delta(pi_theta, pi_{n-1}), no offset, no SFT
term), and each replayed pair weighs exactly what one of the stage's own pairs weighs (1/B): no multiplier. SHARE
1.0 trains on as many replayed pairs as new ones. What it is not: a constraint (nothing measures DIM or adapts the
weight; that is `--keep`), or a mixed dataset (the stage's own pairs, order and offset are untouched, so a stage
without replay is plain SPO, bit for bit).

Replayed pairs count in the stage's budget: their tokens enter the tokens-per-second metric and the manifest's
cost (`replay_tokens`, `replay_pairs`, `replay_seconds`), and the steps they cost are the stage's own steps.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from .. import losses
from ..errors import UsageError
from .batching import TokenPair, collate_pairs, local_micro_batches
from .extension import StageInputs
from .frozen import FrozenLogps
from .logprobs import attention_window, batch_layout, resolve_layout, score_batch


@dataclass(frozen=True)
class ReplayTarget:
    dim: str
    stage: int  # the dimension's own stage, 1-based
    share: float


@dataclass(frozen=True)
class ReplayPlan:
    """What a stage replays (part of its plan, so of the run's identity)."""

    targets: tuple[ReplayTarget, ...]
    key = "replay"

    def frozen_requests(self, index: int, dim: str) -> dict[int, list[tuple[str, str]]]:
        """pi_{n-1} on each replayed dimension's training pairs: the replay loss's reference."""
        return {index - 1: [(t.dim, "train") for t in self.targets]}

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)

    def manifest_entry(self) -> dict[str, Any]:
        return {"replay_shares": {t.dim: t.share for t in self.targets}}

    def check_processes(self, strategy: str, world: int) -> None:
        if strategy == "fsdp" and world > 1:
            raise UsageError("--replay runs under DDP or on one process: with distributed fsdp over several processes "
                             "it is not supported yet; use --set distributed=ddp (or an accelerate config without FSDP)")

    def start(self, inputs: StageInputs) -> "Replayer":
        return Replayer(self, inputs)


def replay_plan(cfg: Any, index: int) -> ReplayPlan | None:
    """Stage `index`'s replay: its own `stages.<dim>.replay` if given, else the global `replay` restricted to the
    dimensions aligned before it. None when it replays nothing (a share of 0 replays nothing)."""
    dim = cfg.dims[index - 1]
    own = cfg.stages.get(dim)
    wanted = cfg.replay if own is None or own.replay is None else own.replay
    earlier = cfg.dims[: index - 1]
    targets = tuple(ReplayTarget(d, earlier.index(d) + 1, float(s)) for d, s in wanted.items() if d in earlier and s)
    return ReplayPlan(targets) if targets else None


# ------------------------------------------------------------------------------------------------ small pure rules
def replay_size(share: float, batch_size: int, world: int) -> int:
    """Pairs replayed per step: ceil(share x batch size), at least 1, rounded up to a multiple of the processes."""
    r = max(1, math.ceil(share * batch_size - 1e-9))
    return -(-r // world) * world


def replay_draw(seed: int, stage: int, dim: str, step: int, pool: int, size: int) -> list[int]:
    """The `size` pool indices replayed at `step`: a pure function of (seed, stage, dimension, step)."""
    mixed = ((seed * 1000 + stage) * 1_000_003 + step) * 7919 + zlib.crc32(dim.encode())
    perm = torch.randperm(pool, generator=torch.Generator().manual_seed(mixed)).tolist()
    return [perm[j % len(perm)] for j in range(size)]


def preference_replay_loss(plan: Any, prev: FrozenLogps) -> Callable[..., torch.Tensor]:
    """`--replay`'s per-pair loss: the stage's preference loss against pi_{n-1} (`prev`, on the pool), no offset and
    no SFT term (an NLL term on the earlier dimension's chosen responses would train them outright)."""

    def per_pair(pc: torch.Tensor, pr: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        return losses.replay_loss(plan.beta, pc, pr, prev.chosen[sel].to(pc.device), prev.rejected[sel].to(pc.device),
                                  plan.loss.type, plan.loss.label_smoothing)

    return per_pair


def replay_backward(scorer: Any, pool: Sequence[TokenPair], chosen: list[int],
                    per_pair_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], *,
                    weight: float, denominator: int, cfg: Any, pad_token_id: int,
                    accelerator: Any) -> tuple[float, int]:
    """Backward weight x (sum of `per_pair_loss(policy chosen, policy rejected, pool indices)` over this process's
    share of `chosen`) x world / denominator, under no_sync (the stage's own last micro-batch synchronises the
    accumulated gradient). Returns this process's (loss sum, tokens). Shared by `--replay` (the preference loss
    against pi_{n-1}: `preference_replay_loss`) and `--keep` (its constraint term)."""
    acc = accelerator
    model = acc.unwrap_model(scorer).model
    layout, window = resolve_layout(cfg.layout, model), attention_window(model)
    rank, world = acc.process_index, acc.num_processes
    lengths = [p.sort_length for p in pool]
    loss_sum, tokens = 0.0, 0
    for idx in local_micro_batches(chosen, lengths, rank, world, cfg.micro_batch_size):
        with acc.no_sync(scorer), acc.autocast():
            pairs = [pool[i] for i in idx]
            batch = collate_pairs(pairs, pad_token_id, batch_layout(layout, pairs, window)).to(acc.device)
            pc, pr, _, _ = score_batch(scorer, batch)
            per_pair = per_pair_loss(pc.float(), pr.float(), torch.tensor(idx))
            acc.backward(weight * per_pair.sum() * world / denominator)
        loss_sum += float(per_pair.detach().sum())
        tokens += batch.n_tokens
    return loss_sum, tokens


# ------------------------------------------------------------------------------------------------ the extension
class Replayer:
    """Stage n's replay at run time (a `StageExtension`)."""

    key = "replay"

    def __init__(self, rp: ReplayPlan, inputs: StageInputs):
        self.rp, self.plan, self.cfg, self.pad = rp, inputs.plan, inputs.cfg, inputs.pad_token_id
        self.acc = inputs.dist.accelerator
        world = self.acc.num_processes
        self.pools = {t.dim: inputs.split_pairs(t.dim, "train") for t in rp.targets}
        self.losses = {t.dim: preference_replay_loss(self.plan, inputs.logps(self.plan.reference, t.dim, "train"))
                       for t in rp.targets}
        self.sizes = {t.dim: replay_size(t.share, self.plan.batch_size, world) for t in rp.targets}
        self.pairs = {t.dim: 0 for t in rp.targets}  # replayed so far (global)
        self.tokens, self.seconds = 0.0, 0.0
        self._loss: dict[str, float] = {}

    def offset(self, base: torch.Tensor) -> torch.Tensor:
        return base

    def before_step(self, step: int, scorer: Any) -> float:
        started = time.perf_counter()
        sums = []
        for t in self.rp.targets:
            chosen = replay_draw(self.cfg.seed, self.plan.index, t.dim, step, len(self.pools[t.dim]),
                                 self.sizes[t.dim])
            sums += replay_backward(scorer, self.pools[t.dim], chosen, self.losses[t.dim], weight=1.0,
                                    denominator=self.plan.batch_size, cfg=self.cfg, pad_token_id=self.pad,
                                    accelerator=self.acc)
        reduced = self.acc.reduce(torch.tensor(sums, dtype=torch.float64, device=self.acc.device),
                                  reduction="sum").tolist()
        step_tokens = 0.0
        for j, t in enumerate(self.rp.targets):
            self._loss[t.dim] = reduced[2 * j] / self.sizes[t.dim]
            step_tokens += reduced[2 * j + 1]
            self.pairs[t.dim] += self.sizes[t.dim]
        self.tokens += step_tokens
        self.seconds += time.perf_counter() - started
        return step_tokens

    def after_step(self, done: int, scorer: Any) -> dict[str, float]:
        metrics = {f"stage{self.plan.index}/{dim}/replay/loss": loss for dim, loss in self._loss.items()}
        self._loss.clear()
        return metrics

    def state(self) -> dict[str, Any]:
        return {"pairs": dict(self.pairs), "tokens": self.tokens, "seconds": self.seconds}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.pairs.update({d: int(n) for d, n in state["pairs"].items() if d in self.pairs})
        self.tokens, self.seconds = float(state["tokens"]), float(state["seconds"])

    def finish(self, train_seconds: float, info: Callable[[str], None],
               warn: Callable[[str], None]) -> dict[str, Any]:
        info(f"stage {self.plan.index} ({self.plan.dim}): replayed "
             + ", ".join(f"{self.pairs[t.dim]} pairs of {t.dim} ({self.sizes[t.dim]} a step, share {t.share:g})"
                         for t in self.rp.targets)
             + f" in {self.seconds:.1f}s")
        return {"replay": {t.dim: {"share": t.share, "own_stage": t.stage, "pool": len(self.pools[t.dim]),
                                   "pairs_per_step": self.sizes[t.dim], "replayed_pairs": self.pairs[t.dim]}
                           for t in self.rp.targets}}

    def cost(self, train_seconds: float) -> dict[str, Any]:
        return {"replay_seconds": round(self.seconds, 2), "replay_tokens": int(self.tokens),
                "replay_pairs": sum(self.pairs.values())}


class ReplayKind:
    """`--replay` / `align.replay` / `stages.<dim>.replay` (registered in engine/extensions.py)."""

    key = "replay"
    columns = (("replayed pairs", lambda row: _replay_cell(row.get("replay"))),)

    @staticmethod
    def plan(cfg: Any, index: int) -> ReplayPlan | None:
        return replay_plan(cfg, index)

    @staticmethod
    def summary(entry: dict[str, Any]) -> dict[str, Any]:
        return {"replay": entry["replay"]} if "replay" in entry else {}

    @staticmethod
    def result(stages: list[dict[str, Any]]) -> dict[str, Any]:
        return {}


def _replay_cell(replay: dict[str, Any] | None) -> str:
    """'helpful 40 (share 0.2)' per replayed dimension."""
    return "; ".join(f"{d} {r['replayed_pairs']} (share {r['share']:g})" for d, r in (replay or {}).items())
