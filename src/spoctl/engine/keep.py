"""`--keep DIM=FRACTION`: hold an earlier dimension during a later stage (a constrained stage, solved primal-dual).

Stage n's problem (method §2) asks E[R_i] >= H_i of every earlier dimension i. Plain SPO turns that constraint into
a weight chosen by hand; here it is enforced, one Lagrange multiplier mu_i per kept dimension:

- **The constraint.** R_i is read the way the engine's forgetting view reads it: the implicit-reward margin
  Delta(pi_theta, pi_0) = log(pi_theta/pi_0)(y_w) - log(pi_theta/pi_0)(y_l), averaged over a *constraint split* of
  dimension i's pairs (v_i). H_i = `dual.threshold(start, FRACTION)`, start = v_i at the end of stage i.
- **The Lagrangian term**, its exact gradient: mu_i * mean over replayed pairs of dimension i of
  -beta_n * Delta(pi_theta, pi_0) (`losses.keep_constraint_loss`). Linear in the margin, so a fixed point of the loop
  is a KKT point of the constrained problem (engine/dual.py; tests/test_keep_convergence.py against bisection).
- **The multiplier**, a PI function of the normalised violation, measured every K steps (`dual.dual_step`).
  While every multiplier is 0 nothing of this runs: the stage is plain SPO, bit for bit.

Why the multiplier no longer also raises the SPO offset (it did until issue 20): the offset is the Lagrangian term of
a different constraint (E_pi[R_i], method §3), which is not what is measured; one multiplier driving both terms
settled where neither problem's multiplier is (0.31 against the true 0.18 on the tabular problem). And the DPO-loss
replay it also drove is rehearsal, now its own baseline, `--replay DIM=SHARE`, at a fixed weight.

**Why the mean margin, not the accuracy users read.** The constraint split comes from training pairs that stage i
fitted, so their accuracy starts near 1 and stays there while the margins erode, then falls in a step once many
pairs cross zero together; on a few hundred pairs it moves in steps of 1/P and is flat in between. A dual ascent
on it would see nothing until it is too late and then jump. The mean margin moves with every step of forgetting,
from the first. Its weakness -- a few pairs with huge margins can hold the mean up while others flip -- is why the
accuracy is logged and shown beside it, and why `spoctl eval --set gate.keep=true` checks the same fractions on
the held-out accuracy.

**Why the constraint split overlaps stage i's training data.** Removing it from stage i would change stage i of a
run with --keep (fewer pairs) against the same run without, and the constraint split could no longer equal the
data. So it is drawn (seeded) from dimension i's training pairs and is *never replayed*: no gradient of the stage
that keeps dimension i touches it, so it measures how much of what stage i learnt on those pairs survives, which
is what the constraint is about. Its value is an in-sample one (higher than on the eval split), and the constraint
is relative to it, so the overlap does not loosen the bound. The eval split, which reports results, is untouched.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .. import losses
from . import dual
from .dual import threshold  # noqa: F401  (the bound's one definition; evaluate.gate reads it from here)
from .batching import TokenPair
from .frozen import FrozenLogps
from .replay import replay_backward, replay_draw
from .schedule import make_scheduler
from .scoring import run_scoring

if TYPE_CHECKING:
    from ..config import AlignConfig
    from .distributed import Distributed

# engine.plan.StagePlan: not imported, as plan.py builds stages' keep plans (engine/extensions.py).
StagePlan = Any

UPDATES_PER_STAGE = 20  # default K = total steps / 20
MAX_CONSTRAINT_PAIRS = 256  # "a few hundred pairs at most": the measurement is a forward pass over them every K steps
CONSTRAINT_SHARE = 4  # default constraint split: a quarter of the dimension's training pairs (the rest can be replayed)
REPLAY_SHARE = 4  # default replay pairs per step: a quarter of the batch


@dataclass(frozen=True)
class KeepTarget:
    dim: str
    stage: int  # the dimension's own stage, 1-based
    fraction: float


@dataclass(frozen=True)
class KeepPlan:
    """What a stage keeps and how (part of its plan, so of the run's identity); None sizes resolve at run time."""

    targets: tuple[KeepTarget, ...]
    every: int | None = None
    pairs: int | None = None
    replay_pairs: int | None = None

    def frozen_requests(self, index: int, dim: str) -> dict[int, list[tuple[str, str]]]:
        """pi_0 and pi_i on each kept dimension's training pairs: the start value and bound (pi_i against pi_0 on the
        constraint split) and the constraint's base (pi_0, on the split and on the replayed pairs)."""
        need: dict[int, list[tuple[str, str]]] = {}
        for t in self.targets:
            for k in (0, t.stage):
                need.setdefault(k, []).append((t.dim, "train"))
        return {k: list(dict.fromkeys(v)) for k, v in need.items()}


def keep_plan(cfg: "AlignConfig", index: int, stage_keep: dict[str, float] | None) -> KeepPlan | None:
    """Stage `index`'s constraints: its own `stages.<dim>.keep` if given, else the global `keep` restricted to the
    dimensions aligned before it. None when it keeps nothing."""
    wanted = cfg.keep if stage_keep is None else stage_keep
    earlier = cfg.dims[: index - 1]
    targets = tuple(KeepTarget(d, earlier.index(d) + 1, float(f)) for d, f in wanted.items() if d in earlier)
    if not targets:
        return None
    kc = cfg.keep_control
    return KeepPlan(targets, every=kc.every, pairs=kc.pairs, replay_pairs=kc.replay_pairs)


# ------------------------------------------------------------------------------------------------ small pure rules
def every_steps(every: int | None, total: int) -> int:
    return every or max(1, round(total / UPDATES_PER_STAGE))


def constraint_size(pairs: int | None, n_train: int) -> int:
    return min(pairs or min(MAX_CONSTRAINT_PAIRS, max(1, n_train // CONSTRAINT_SHARE)), n_train)


def replay_size(replay_pairs: int | None, batch_size: int, world: int) -> int:
    """Pairs replayed per step, rounded up to a multiple of the processes (each takes an equal share)."""
    r = replay_pairs or max(1, batch_size // REPLAY_SHARE)
    return -(-r // world) * world


def constraint_split(n_train: int, size: int, seed: int, dim: str) -> tuple[list[int], list[int]]:
    """(constraint split, replay pool) as sorted indices into the dimension's training pairs: a seeded draw, the same
    in every stage that keeps the dimension. When the split takes every pair the pool is all of them (overlap)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(dim.encode()))
    perm = torch.randperm(n_train, generator=g).tolist()
    constraint, pool = sorted(perm[:size]), sorted(perm[size:])
    return constraint, pool or list(range(n_train))


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class KeptDim:
    """One kept dimension during stage n: its constraint split, bound, replay pool and multiplier."""

    target: KeepTarget
    constraint: list[TokenPair]
    base: FrozenLogps  # pi_0 on the constraint split
    start_margin: float  # mean Delta(pi_i, pi_0) on the constraint split
    start_accuracy: float
    bound: float  # H_i
    scale: float  # the violation's unit: mean |Delta(pi_i, pi_0)| on the constraint split (dual.margin_scale)
    pool: list[TokenPair]  # replayable training pairs (never the constraint split, unless it is all of them)
    pool_base: FrozenLogps  # pi_0 on the pool: the constraint term's base
    overlap: bool  # the constraint split is all the training data, so replay trains on it
    n_train: int
    control: dual.Dual = field(default_factory=dual.Dual)
    trajectory: list[dict[str, float]] = field(default_factory=list)
    replayed: int = 0  # replay pairs trained on (global)

    @property
    def multiplier(self) -> float:
        return self.control.multiplier

    def state(self) -> dict[str, Any]:
        return {"multiplier": self.multiplier, "integral": self.control.integral, "trajectory": self.trajectory,
                "replayed": self.replayed}


def _subset(logps: FrozenLogps, idx: list[int]) -> FrozenLogps:
    sel = torch.tensor(idx, dtype=torch.long)
    return FrozenLogps(logps.chosen[sel], logps.rejected[sel])


def kept_dims(plan: "StagePlan", seed: int, split_pairs: Callable[[str, str], list[TokenPair]],
              logps: Callable[[int, str, str], FrozenLogps], warn: Callable[[str], None]) -> list[KeptDim]:
    """Everything the keeping needs from frozen models, resolved to tensors (`logps(k, dim, split)` reads pi_k's
    frozen log-probs; the plan's `frozen_requests` made sure they exist)."""
    assert plan.keep is not None
    out = []
    for t in plan.keep.targets:
        pairs = split_pairs(t.dim, "train")
        size = constraint_size(plan.keep.pairs, len(pairs))
        cidx, pool = constraint_split(len(pairs), size, seed, t.dim)
        base, own = _subset(logps(0, t.dim, "train"), cidx), _subset(logps(t.stage, t.dim, "train"), cidx)
        start = losses.log_ratio_margin(own.chosen, own.rejected, base.chosen, base.rejected)
        kd = KeptDim(target=t, constraint=[pairs[i] for i in cidx], base=base, start_margin=float(start.mean()),
                     start_accuracy=float((start > 0).float().mean()), bound=0.0,
                     scale=dual.margin_scale(float(start.abs().mean())), pool=[pairs[i] for i in pool],
                     pool_base=_subset(logps(0, t.dim, "train"), pool), overlap=size == len(pairs),
                     n_train=len(pairs))
        kd.bound = dual.threshold(kd.start_margin, t.fraction)
        if kd.overlap:
            warn(f"stage {plan.index} ({plan.dim}): the constraint split of {t.dim} is all {len(pairs)} of its "
                 "training pairs, so replay trains on the pairs the constraint is measured on")
        if kd.start_margin <= 0:
            warn(f"stage {plan.index} ({plan.dim}): stage {t.stage} did not raise {t.dim}'s implicit-reward margin "
                 f"on its constraint split (mean log(pi_{t.stage}/pi_0) margin {kd.start_margin:.3g}); keeping it "
                 "holds a value that is no gain")
        out.append(kd)
    return out


# ------------------------------------------------------------------------------------------------ the controller
class Keeper:
    """The multipliers of one stage and everything they drive. `train_stage` calls, per step: `offset_train` (the
    re-weighted offset), `replay` (before the stage's own micro-batches) and `after_step` (measure, update, metrics);
    a checkpoint carries `state()`."""

    def __init__(self, kept: list[KeptDim], *, plan: "StagePlan", cfg: "AlignConfig", dist: "Distributed",
                 pad_token_id: int, total: int, base_offset: torch.Tensor):
        self.kept, self.plan, self.cfg, self.pad = kept, plan, cfg, pad_token_id
        self.dist, self.acc = dist, dist.accelerator
        self.total, self.base_offset = total, base_offset
        self.every = every_steps(plan.keep.every, total)
        self.replay_pairs = replay_size(plan.keep.replay_pairs, plan.batch_size, self.acc.num_processes)
        self.seconds = {"measure": 0.0, "replay": 0.0}
        self.tokens = 0.0  # replay tokens (global)
        self.measured_pairs = 0
        self._replay_loss: dict[str, float] = {}
        self._clock = lr_clock(cfg, total)
        self._measured_at = 0  # the step of the last measurement (0: the stage's start)

    # ---- (a) the offset -------------------------------------------------------------------------------
    @property
    def offset_train(self) -> torch.Tensor:
        """The stage's own SPO offset, unchanged: the multipliers act through the constraint term only (module doc)."""
        return self.base_offset

    # ---- (b) the constraint term on replayed pairs ------------------------------------------------------------------------------------
    def _replay_batch(self, kd: KeptDim, step: int) -> list[int]:
        """The pool indices replayed at `step`: a pure function of (seed, stage, dimension, step), so a resumed
        stage replays what an uninterrupted one would."""
        return replay_draw(self.cfg.seed, self.plan.index, kd.target.dim, step, len(kd.pool), self.replay_pairs)

    def replay(self, step: int, scorer: Any) -> float:
        """Backward mu_i times the constraint term (`losses.keep_constraint_loss`) of every dimension whose multiplier
        is positive, under no_sync (the stage's own
        last micro-batch synchronises the accumulated gradient). Returns the replay tokens (all processes)."""
        active = [kd for kd in self.kept if kd.multiplier > 0]
        if not active:
            return 0.0
        started = time.perf_counter()
        acc, plan = self.acc, self.plan
        sums = []
        for kd in active:
            def constraint_term(pc: torch.Tensor, pr: torch.Tensor, sel: torch.Tensor, kd: KeptDim = kd) -> torch.Tensor:
                # The Lagrangian's constraint term, -beta_n * Delta(pi_theta, pi_0): its gradient is the
                # constraint's own (engine/dual.py), whatever the stage's loss type.
                return losses.keep_constraint_loss(plan.beta, pc, pr, kd.pool_base.chosen[sel].to(pc.device),
                                                   kd.pool_base.rejected[sel].to(pc.device))

            # Mean over the global replay batch (DDP averages over processes), weighted by the multiplier.
            sums += replay_backward(scorer, kd.pool, self._replay_batch(kd, step), constraint_term,
                                    weight=kd.multiplier, denominator=self.replay_pairs, cfg=self.cfg,
                                    pad_token_id=self.pad, accelerator=acc)
        reduced = acc.reduce(torch.tensor(sums, device=acc.device), reduction="sum").tolist()
        step_tokens = 0.0
        for j, kd in enumerate(active):
            self._replay_loss[kd.target.dim] = reduced[2 * j] / self.replay_pairs
            step_tokens += reduced[2 * j + 1]
            kd.replayed += self.replay_pairs
        self.tokens += step_tokens
        self.seconds["replay"] += time.perf_counter() - started
        return step_tokens

    # ---- measurement and dual ascent ------------------------------------------------------------------
    def _measure(self, scorer: Any) -> dict[str, tuple[float, float]]:
        """(mean margin, accuracy) of Delta(pi_theta, pi_0) on each constraint split, on every process: each scores
        a share of the split and gets all the log-probs (`scoring.Scoring`, as the eval views do), so every
        process takes the same multiplier step."""
        scorer = self.dist.evaluation_scorer(scorer)
        was_training = scorer.training
        scorer.eval()
        found = {}
        scoring = run_scoring(self.dist, self.cfg, self.pad)
        for kd in self.kept:
            pol = scoring.score(scorer, kd.constraint)
            m = losses.log_ratio_margin(pol.chosen, pol.rejected, kd.base.chosen, kd.base.rejected)
            found[kd.target.dim] = (float(m.mean()), float((m > 0).float().mean()))
            self.measured_pairs += len(kd.constraint)
        if was_training:
            scorer.train()
        return found

    def after_step(self, done: int, scorer: Any) -> dict[str, float]:
        """After optimizer step `done`: every K steps measure the constraints and take a PI step (`dual.dual_step`;
        at the stage's last step measure only: nothing is left to act on). Returns the step's keep metrics."""
        prefix = f"stage{self.plan.index}"
        metrics: dict[str, float] = {}
        if done % self.every == 0 or done == self.total:
            started = time.perf_counter()
            values = self._measure(scorer)
            elapsed = self._clock[done] - self._clock[self._measured_at]
            for kd in self.kept:
                margin, accuracy = values[kd.target.dim]
                if done != self.total:
                    kd.control = dual.dual_step(kd.control, dual.violation(margin, kd.bound, kd.scale), elapsed)
                kd.trajectory.append({"step": done, "margin": margin, "accuracy": accuracy,
                                      "multiplier": kd.multiplier, "integral": kd.control.integral})
                p = f"{prefix}/{kd.target.dim}/keep"
                metrics.update({f"{p}/margin": margin, f"{p}/accuracy": accuracy, f"{p}/threshold": kd.bound,
                                f"{p}/slack": margin - kd.bound})
            self._measured_at = done
            self.seconds["measure"] += time.perf_counter() - started
        for kd in self.kept:
            p = f"{prefix}/{kd.target.dim}/keep"
            metrics[f"{p}/multiplier"] = kd.multiplier
            if kd.target.dim in self._replay_loss:
                metrics[f"{p}/replay_loss"] = self._replay_loss.pop(kd.target.dim)
        return metrics

    # ---- resume ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"dims": {kd.target.dim: kd.state() for kd in self.kept}, "seconds": self.seconds,
                "tokens": self.tokens, "measured_pairs": self.measured_pairs}

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's state (a checkpoint written without --keep has none: start from zero)."""
        if not state:
            return
        for kd in self.kept:
            s = state["dims"].get(kd.target.dim)
            if s:
                kd.control = dual.Dual(float(s.get("integral", s["multiplier"])), float(s["multiplier"]))
                kd.trajectory, kd.replayed = list(s["trajectory"]), int(s["replayed"])
                self._measured_at = max(self._measured_at, max((p["step"] for p in kd.trajectory), default=0))
        self.seconds = {k: float(v) for k, v in state["seconds"].items()}
        self.tokens, self.measured_pairs = float(state["tokens"]), int(state["measured_pairs"])

    # ---- what users see -------------------------------------------------------------------------------
    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> dict[str, Any]:
        """The manifest's `keep` entry of the stage: per kept dimension its bound, trajectory and final values."""
        out = {}
        for kd in self.kept:
            last = kd.trajectory[-1] if kd.trajectory else {"margin": kd.start_margin, "accuracy": kd.start_accuracy,
                                                             "multiplier": kd.multiplier}
            out[kd.target.dim] = {
                "fraction": kd.target.fraction, "own_stage": kd.target.stage,
                "constraint_pairs": len(kd.constraint), "train_pairs": kd.n_train, "overlap": kd.overlap,
                "replay_pool": len(kd.pool), "replay_pairs_per_step": self.replay_pairs, "replayed_pairs": kd.replayed,
                "every": self.every, "controller": {"kp": dual.KP, "ki": dual.KI}, "scale": kd.scale,
                "start": {"margin": kd.start_margin, "accuracy": kd.start_accuracy}, "threshold": kd.bound,
                "final": {"margin": last["margin"], "accuracy": last["accuracy"], "multiplier": last["multiplier"],
                          "satisfied": last["margin"] >= kd.bound},
                "max_multiplier": max([p["multiplier"] for p in kd.trajectory], default=0.0),
                "trajectory": kd.trajectory,
            }
        return out

    def cost(self, train_seconds: float) -> dict[str, Any]:
        return {"keep_seconds": round(self.total_seconds, 2),
                "keep_share": round(self.total_seconds / train_seconds, 4) if train_seconds > 0 else None,
                "keep_measure_seconds": round(self.seconds["measure"], 2),
                "keep_replay_seconds": round(self.seconds["replay"], 2),
                "keep_measured_pairs": self.measured_pairs, "keep_replay_tokens": int(self.tokens)}


def lr_clock(cfg: "AlignConfig", total: int) -> list[float]:
    """clock[s] = the share of the stage's learning-rate budget spent by the end of step s (clock[0] = 0,
    clock[total] = 1), under the stage's own schedule (`schedule.make_scheduler`, the same warmup). The controller
    counts time in it: K, the step count and the schedule then drop out of its gains (engine/dual.py)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(opt, cfg.scheduler, total, int(cfg.warmup_ratio * total))
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    budget = sum(lrs) or 1.0
    clock = [0.0]
    for lr in lrs:
        clock.append(clock[-1] + lr / budget)
    return clock


def report(keeper: Keeper, plan: "StagePlan", train_seconds: float, info: Callable[[str], None],
           warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Say what keeping cost and whether each constraint held at the end of the stage; returns the violations."""
    share = keeper.total_seconds / train_seconds if train_seconds > 0 else 0.0
    info(f"stage {plan.index} ({plan.dim}): keeping {', '.join(kd.target.dim for kd in keeper.kept)} cost "
         f"{keeper.total_seconds:.1f}s, {share:.0%} of the stage's training (measuring {keeper.seconds['measure']:.1f}s,"
         f" replay {keeper.seconds['replay']:.1f}s)")
    violations = []
    for dim, s in keeper.summary().items():
        f = s["final"]
        said = (f"{dim}: margin {f['margin']:.3f} vs bound {s['threshold']:.3f} ({s['fraction']:g} x "
                f"{s['start']['margin']:.3f} at the end of stage {s['own_stage']}), accuracy {f['accuracy']:.2f} "
                f"(was {s['start']['accuracy']:.2f}), multiplier {f['multiplier']:.3g}")
        if f["satisfied"]:
            info(f"stage {plan.index} ({plan.dim}): constraint held, {said}")
        else:
            warn(f"stage {plan.index} ({plan.dim}) ended with its constraint on {dim} VIOLATED: {said}")
            violations.append({"stage": plan.index, "dim": plan.dim, "kept": dim, "margin": f["margin"],
                               "threshold": s["threshold"], "accuracy": f["accuracy"], "multiplier": f["multiplier"]})
    return violations


def table_cell(kept: dict[str, dict[str, Any]] | None) -> str:
    """The end-of-run table's cell for a stage: 'helpful 1.02>=0.95 mu 0.4' per kept dimension."""
    if not kept:
        return ""
    return "; ".join(f"{d} {k['margin']:.3g}{'>=' if k['satisfied'] else '<'}{k['threshold']:.3g} mu {k['multiplier']:.2g}"
                     + ("" if k["satisfied"] else " VIOLATED") for d, k in kept.items())
