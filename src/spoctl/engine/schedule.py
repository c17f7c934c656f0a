"""The learning-rate schedule of a stage: one place, read by training (engine/train.py) and by `--keep`'s
controller, which counts its time in shares of the stage's learning-rate budget (engine/keep.py, `lr_clock`)."""

from __future__ import annotations

from typing import Any

import torch

# align.scheduler -> transformers' schedule name; every schedule warms up linearly first, as in TRL and HF Trainer.
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total: int, warmup: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[kind], optimizer, num_warmup_steps=warmup, num_training_steps=total)
