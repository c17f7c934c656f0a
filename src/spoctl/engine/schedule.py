"""The learning-rate schedule of a stage: one place, read by training (engine/train.py) and by `--keep`'s
controller, which counts its time in shares of the stage's learning-rate budget (engine/keep.py, `lr_clock`).

The schedules are those of transformers' `get_scheduler` (as HF Trainer and TRL use them), written out here: every
schedule warms up linearly from 0 first. Importing `transformers.optimization` for three lines of arithmetic cost
each `spoctl align` 2-3 s of start-up (it pulls in transformers' trainer utilities, peft and bitsandbytes);
tests/test_engine_invariants.py checks these factors against `get_scheduler`'s step by step."""

from __future__ import annotations

import math
from functools import partial

import torch

SCHEDULES = ("linear", "cosine", "constant")  # align.scheduler


def lr_factor(kind: str, step: int, *, total: int, warmup: int) -> float:
    """The share of the peak learning rate at `step` (0-based, counted before the step is taken)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule '{kind}' (one of: {', '.join(SCHEDULES)})")
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))  # cosine: half a wave, from 1 to 0


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total: int,
                   warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    # A partial (not a closure), as transformers builds it: LambdaLR then stores the same state in a checkpoint.
    # LambdaLR calls it once at construction, so an unknown `kind` is refused here, not at the first step.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, kind, total=total, warmup=warmup))
