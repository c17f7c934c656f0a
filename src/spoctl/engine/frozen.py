"""The frozen log-prob pass: summed completion log-probs of chosen and rejected under a frozen model.

Computed once per (model, data) before a stage trains, in inference mode with a larger batch than training, and
cached as safetensors beside the prepared data, keyed by the data hash, the model fingerprint and the dtype: a
re-run, a resume, or a later stage that needs the same numbers reads them back instead of recomputing.

Under several processes every process scores a disjoint, length-balanced shard of the pairs; the results are
summed back into pair order on every process and the main process alone writes the cache file, the same file a
single process writes (to float rounding: a pair's batch companions differ).
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
from .processes import Processes
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
    passes and eval's scorecard, so both key the files alike and a pass one of them makes is free for the other.

    Under several processes `memo` holds the same keys on every process: `lookup` and `put` are collective and
    update it everywhere, and only the main process touches the files (whether to run a pass is decided from what
    the main process found, so no process can skip a collective pass the others enter)."""

    def __init__(self, cache_dir: Path, prepared: Any, fingerprint: Callable[[int], str], dtype: torch.dtype,
                 warn: Callable[[str], None] | None = None, procs: Processes | None = None):
        self.cache_dir, self.prepared, self.fingerprint, self.dtype = cache_dir, prepared, fingerprint, dtype
        self.warn = warn or (lambda message: None)
        self.procs = procs or Processes()
        self.memo: dict[tuple[int, str, str], FrozenLogps] = {}

    def path(self, k: int, dim: str, split: str) -> Path:
        return cache_file(self.cache_dir, dim, split, self.prepared.data_hash(dim, split), self.fingerprint(k),
                          self.dtype)

    def lookup(self, k: int, requests: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (dim, split) of `requests` that have no usable log-probs of pi_k; every other one is in `memo`
        afterwards, on every process. Collective: the main process reads the files (a damaged one is reported and
        counts as missing) and sends their contents to the others, which need not see the same files."""

        def read() -> tuple[dict[tuple[str, str], FrozenLogps], list[tuple[str, str]]]:
            found, missing = {}, []
            for dim, split in dict.fromkeys(requests):
                if (k, dim, split) in self.memo:
                    continue
                path = self.path(k, dim, split)
                value, why = load_cached(path)
                if value is None:
                    if why not in ("missing", "outdated"):
                        self.warn(f"frozen log-prob cache {path} is damaged ({why}); computing it again")
                    missing.append((dim, split))
                else:
                    found[(dim, split)] = value
            return found, missing

        found, missing = self.procs.share(read)
        for (dim, split), value in found.items():
            self.memo[(k, dim, split)] = value
        return missing

    def put(self, k: int, dim: str, split: str, value: FrozenLogps) -> None:
        """Keep `value` (which every process has) in memory everywhere; the main process writes the file."""
        self.memo[(k, dim, split)] = value
        if self.procs.main:
            save_cached(self.path(k, dim, split), value)

    def get(self, k: int, dim: str, split: str) -> FrozenLogps:
        key = (k, dim, split)
        if key not in self.memo:
            if self.lookup(k, [(dim, split)]):
                raise RuntimeError(f"log-probs of pi_{k} on {dim}/{split} are not usable (missing or damaged)")
        return self.memo[key]


def balanced_shards(lengths: Sequence[int], world: int) -> list[list[int]]:
    """Disjoint shards of the pair indices, one per process, together all of them: sizes differ by at most one,
    and the longest pairs are dealt first, each to the shard with the fewest tokens so far, so every process has
    about the same work. Each shard is in index order (one process: 0..N-1, exactly the single-process pass)."""
    n = len(lengths)
    if world == 1:
        return [list(range(n))]
    room = [n // world + (1 if r < n % world else 0) for r in range(world)]
    shards: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        r = min((r for r in range(world) if len(shards[r]) < room[r]), key=lambda r: (load[r], r))
        shards[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in shards]


def score_pairs(scorer: nn.Module, pairs: Sequence[TokenPair], *, batch_size: int, pad_token_id: int,
                device: torch.device, layout: str = "auto", procs: Processes | None = None,
                collective: bool = False, advance: Callable[[int], None] | None = None) -> FrozenLogps:
    """Summed completion log-probs of every pair under `scorer` (a `SequenceScorer`, possibly sharded), in pair
    order, on every process; each process scores its shard (`balanced_shards`). `collective`: the scorer's forward
    needs every process (FSDP), so each runs the same number of batches, padding with a repeated short one.
    `advance(n)`: called after each batch with the pairs this process scored in it (progress display).
    Callers go through `scoring.Scoring`, which adds the precision's autocast and the progress display."""
    procs = procs or Processes()
    model = getattr(scorer, "model", scorer)
    layout, window = resolve_layout(layout, model), attention_window(model)
    shards = balanced_shards([p.sort_length for p in pairs], procs.world)
    mine = shards[procs.rank]
    batches = [[mine[j] for j in b] for b in inference_batches([pairs[i].sort_length for i in mine], batch_size)]
    real = len(batches)
    if collective and pairs:
        most = max(-(-len(s) // batch_size) for s in shards)
        shortest = min(range(len(pairs)), key=lambda i: pairs[i].sort_length)
        batches += [[shortest]] * (most - real)
    scored = torch.zeros(3, len(pairs), dtype=torch.float32)  # chosen, rejected, how often scored
    # An FSDP forward gathers parameters into tensors that must not be inference tensors.
    with torch.no_grad() if collective else torch.inference_mode():
        for j, idx in enumerate(batches):
            group = [pairs[i] for i in idx]
            batch = collate_pairs(group, pad_token_id, batch_layout(layout, group, window)).to(device)
            c, r, _, _ = score_batch(scorer, batch)
            if j < real:
                scored[0, idx] = c.float().cpu()
                scored[1, idx] = r.float().cpu()
                scored[2, idx] += 1
                if advance is not None:
                    advance(len(idx))
    if procs.world > 1:
        # Each pair is scored by one process and zero elsewhere, so the sum is exact.
        scored = procs.sum(scored).cpu()
    if not torch.equal(scored[2], torch.ones(len(pairs))):
        raise RuntimeError("frozen pass: a pair was scored by no process or by several")
    return FrozenLogps(scored[0].clone(), scored[1].clone())


def compute_logps(model: nn.Module, pairs: Sequence[TokenPair], *, batch_size: int, pad_token_id: int, chunk_size: int,
                  device: torch.device, layout: str = "auto") -> FrozenLogps:
    """Log-probs of every pair under a plain (unsharded) model, by this process alone."""
    return score_pairs(SequenceScorer(model, chunk_size=chunk_size), pairs, batch_size=batch_size,
                       pad_token_id=pad_token_id, device=device, layout=layout)
