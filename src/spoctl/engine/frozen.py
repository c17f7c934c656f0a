"""The frozen log-prob pass: summed completion log-probs of chosen and rejected under a frozen model.

Computed once per (model, data) before a stage trains, in inference mode with a larger batch than training, and
cached as safetensors beside the prepared data, keyed by the data hash, the model fingerprint and the dtype: a
re-run, a resume, or a later stage that needs the same numbers reads them back instead of recomputing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .batching import Pair, collate_pairs, inference_batches
from ..fsutil import atomic_file
from ..rundir import RunDir
from .logprobs import SequenceScorer, attention_window, batch_layout, resolve_layout, score_batch


@dataclass(frozen=True)
class FrozenLogps:
    chosen: torch.Tensor  # [N] float32, in the dataset's row order
    rejected: torch.Tensor


def logps_cache_dir(prepared_root: Path, run: RunDir) -> Path:
    """Beside the prepared data when that folder is writable (shared by every run on that data), else in the run."""
    target = Path(prepared_root) / "cache" / "logps"
    try:
        target.mkdir(parents=True, exist_ok=True)
        if os.access(target, os.W_OK):
            return target
    except OSError:
        pass
    return run.cache_dir / "logps"


def cache_file(cache_dir: Path, dim: str, split: str, data_hash: str, model_fp: str, dtype: torch.dtype) -> Path:
    dt = str(dtype).removeprefix("torch.")
    return cache_dir / f"{dim}-{split}-{data_hash[:16]}-{model_fp[:16]}-{dt}.safetensors"


def load_cached(path: Path) -> FrozenLogps | None:
    if not path.exists():
        return None
    t = load_file(str(path))
    return FrozenLogps(t["chosen"], t["rejected"])


def save_cached(path: Path, value: FrozenLogps) -> None:
    with atomic_file(path) as tmp:
        save_file({"chosen": value.chosen.contiguous(), "rejected": value.rejected.contiguous()}, str(tmp))


@torch.inference_mode()
def compute_logps(model: nn.Module, pairs: Sequence[Pair], *, batch_size: int, pad_token_id: int, chunk_size: int,
                  device: torch.device, layout: str = "auto",
                  on_batch: Callable[[int], None] | None = None) -> FrozenLogps:
    scorer = SequenceScorer(model, chunk_size=chunk_size)
    layout, window = resolve_layout(layout, model), attention_window(model)
    chosen = torch.empty(len(pairs), dtype=torch.float32)
    rejected = torch.empty(len(pairs), dtype=torch.float32)
    for idx in inference_batches([p.sort_length for p in pairs], batch_size):
        group = [pairs[i] for i in idx]
        batch = collate_pairs(group, pad_token_id, batch_layout(layout, group, window)).to(device)
        c, r, _, _ = score_batch(scorer, batch)
        chosen[idx] = c.float().cpu()
        rejected[idx] = r.float().cpu()
        if on_batch:
            on_batch(len(idx))
    return FrozenLogps(chosen, rejected)
