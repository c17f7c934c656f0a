"""Resumable state within a stage: trainable weights, optimizer, scheduler, RNG, data position.

A checkpoint folder is written under a temporary name and renamed into place when complete, so any
`step-NNNNNN` folder that exists is whole. Tensors are loaded with `weights_only=True` (no arbitrary pickle).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..fsutil import atomic_directory

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "optimizer_rng.pt"
META_FILE = "trainer_state.json"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes: all weights for full fine-tuning, the adapter weights for LoRA."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    meta: dict[str, Any], keep_last: int = 2) -> None:
    with atomic_directory(folder, replace=True) as tmp:
        save_file(trainable_state(model), str(tmp / TRAINABLE_FILE))
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    # Older checkpoints only cost disk: keep the newest few.
    siblings = sorted(p for p in folder.parent.iterdir() if p.name.startswith("step-") and p.is_dir())
    for old in siblings[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    weights = load_file(str(folder / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"{folder}: checkpoint does not match the model (unknown parameter {missing[0]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return json.loads((folder / META_FILE).read_text(encoding="utf-8"))
