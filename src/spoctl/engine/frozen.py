"""The frozen log-prob pass: summed completion log-probs of chosen and rejected under a frozen model.

Computed once per (model, data) before a stage trains, in inference mode with a larger batch than training, and
cached as safetensors beside the prepared data, keyed by the data hash, the model fingerprint and the dtype: a
re-run, a resume, or a later stage that needs the same numbers reads them back instead of recomputing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .batching import TokenPair, collate_pairs, inference_batches
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


# Each cache file carries the sha256 of its tensors' bytes in its safetensors header, so a flipped bit, a truncated
# write or an edited file is found when it is read (the file is then recomputed, never trained on).
CACHE_FORMAT = "spoctl-logps-2"


def _digest(value: FrozenLogps) -> str:
    h = hashlib.sha256()
    for t in (value.chosen, value.rejected):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_cached(path: Path) -> tuple[FrozenLogps | None, str | None]:
    """(the cached log-probs, None), or (None, why not): missing, unreadable or failing its checksum."""
    if not path.exists():
        return None, "missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            value = FrozenLogps(f.get_tensor("chosen"), f.get_tensor("rejected"))
    except Exception as err:  # safetensors raises its own errors for truncated or garbled files
        return None, f"unreadable ({type(err).__name__})"
    if "format" not in meta:
        return None, "outdated"  # written by an earlier spoctl, before cache files carried a checksum
    if meta.get("format") != CACHE_FORMAT or meta.get("sha256") != _digest(value):
        return None, "its checksum does not match its contents"
    return value, None


def save_cached(path: Path, value: FrozenLogps) -> None:
    value = FrozenLogps(value.chosen.contiguous(), value.rejected.contiguous())
    with atomic_file(path) as tmp:
        save_file({"chosen": value.chosen, "rejected": value.rejected}, str(tmp),
                  metadata={"format": CACHE_FORMAT, "sha256": _digest(value)})


class LogpsCache:
    """Frozen log-probs of pi_k on (dim, split), from memory or the on-disk cache. One class for align's frozen
    passes and eval's scorecard, so both key the files alike and a pass one of them makes is free for the other."""

    def __init__(self, cache_dir: Path, prepared: Any, fingerprint: Callable[[int], str], dtype: torch.dtype,
                 warn: Callable[[str], None] | None = None):
        self.cache_dir, self.prepared, self.fingerprint, self.dtype = cache_dir, prepared, fingerprint, dtype
        self.warn = warn or (lambda message: None)
        self.memo: dict[tuple[int, str, str], FrozenLogps] = {}

    def path(self, k: int, dim: str, split: str) -> Path:
        return cache_file(self.cache_dir, dim, split, self.prepared.data_hash(dim, split), self.fingerprint(k),
                          self.dtype)

    def has(self, k: int, dim: str, split: str) -> bool:
        """Whether usable log-probs exist: in memory, or in a cache file that passes its checksum. Not memoised:
        under several processes `memo` must hold the same keys on every process (align decides on it whether to
        enter a barrier), and only the main process computes."""
        if (k, dim, split) in self.memo:
            return True
        path = self.path(k, dim, split)
        value, why = load_cached(path)
        if value is None and why not in ("missing", "outdated"):
            self.warn(f"frozen log-prob cache {path} is damaged ({why}); computing it again")
        return value is not None

    def put(self, k: int, dim: str, split: str, value: FrozenLogps) -> None:
        save_cached(self.path(k, dim, split), value)

    def get(self, k: int, dim: str, split: str) -> FrozenLogps:
        key = (k, dim, split)
        if key not in self.memo:
            value, why = load_cached(self.path(k, dim, split))
            if value is None:
                raise RuntimeError(f"log-probs of pi_{k} on {dim}/{split} are not usable ({why})")
            self.memo[key] = value
        return self.memo[key]


@torch.inference_mode()
def compute_logps(model: nn.Module, pairs: Sequence[TokenPair], *, batch_size: int, pad_token_id: int, chunk_size: int,
                  device: torch.device, layout: str = "auto") -> FrozenLogps:
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
    return FrozenLogps(chosen, rejected)
