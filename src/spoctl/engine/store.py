"""Frozen log-probs of a run by (model k, dimension, split): from memory, the on-disk cache, or one no-grad pass per
model that serves every request of the stages still to come, so no frozen model is loaded twice in a run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import AlignConfig
from ..console import Output
from ..precision import dtype_of as precision_dtype
from .batching import TokenPair, pairs_from_split
from .chain import ModelChain
from .distributed import Distributed
from .frozen import FrozenLogps, LogpsCache
from .logprobs import compile_backbone
from .scoring import Scoring


class FrozenStore:
    """Frozen log-probs by (model k, dimension, split): from memory, the on-disk cache, or a no-grad pass."""

    def __init__(self, chain: ModelChain, prepared: Any, cfg: AlignConfig, dist: Distributed, scoring: Scoring,
                 cache_dir: Path, out: Output):
        self.chain, self.prepared, self.cfg, self.dist, self.scoring = chain, prepared, cfg, dist, scoring
        self.out = out
        self.cache = LogpsCache(cache_dir, prepared, chain.fingerprint, precision_dtype(scoring.precision),
                                warn=out.warn, procs=dist.procs)
        self.pairs: dict[tuple[str, str], list[TokenPair]] = {}
        self._held: tuple[int, Any] | None = None  # the last model loaded for a pass, for reuse as a policy
        self.pairs_scored = 0  # pairs run through a frozen model, all processes together (cache hits not counted)

    def split_pairs(self, dim: str, split: str) -> list[TokenPair]:
        if (dim, split) not in self.pairs:
            self.pairs[(dim, split)] = pairs_from_split(self.prepared.split(dim, split))
        return self.pairs[(dim, split)]

    def load_model(self, k: int) -> Any:
        """pi_k on this process: the model (verified once, on the main process, which shares a failure), or
        under FSDP on the other processes its skeleton on the meta device (its shards come from the main one)."""
        procs = self.dist.procs
        procs.share(lambda: self.chain.verify(k))
        if self.dist.loads_on_main_only and not procs.main:
            return self.chain.load(k, empty=True)
        return self.chain.load(k, verify=False)

    def ensure(self, k: int, requests: list[tuple[str, str]]) -> None:
        """Make sure pi_k's log-probs exist for every (dim, split); one model load and pass for all missing ones.
        Every process takes part (the decision to run the pass is the main process's, shared)."""
        missing = self.cache.lookup(k, requests)
        if not missing:
            return
        t = time.perf_counter()
        size = sum(len(self.split_pairs(d, s)) for d, s in missing)
        self.scoring.announce(f"frozen pass: pi_{k} ({self.chain.describe(k)}) on "
                              f"{', '.join(f'{d}/{s}' for d, s in missing)}: {size} pairs")
        self._held = None  # at most one frozen model in memory
        model = self.load_model(k)
        if self.cfg.compile:
            compile_backbone(model)
        scorer = self.dist.prepare_frozen(model, self.cfg.logprob_chunk)
        n = 0
        for dim, split in missing:
            pairs = self.split_pairs(dim, split)
            value = self.scoring.score(scorer, pairs, label=f"frozen pass pi_{k} {dim}/{split}")
            self.cache.put(k, dim, split, value)
            n += len(pairs)
        self.pairs_scored += n
        if self.dist.frozen_model_is_policy:
            self._held = (k, scorer.model)
        self.out.detail(f"frozen pass: {n} pairs in {time.perf_counter() - t:.1f}s")

    def ensure_all(self, needs: dict[int, list[tuple[str, str]]], what: str) -> None:
        """Every pass `needs` asks for (model k -> its (dim, split) requests), after saying how many passes over how
        many pairs that is (what the cache holds excluded). Collective, like `ensure`."""
        missing = {k: m for k, m in ((k, self.cache.lookup(k, reqs)) for k, reqs in sorted(needs.items())) if m}
        pairs = sum(len(self.split_pairs(d, s)) for m in missing.values() for d, s in m)
        self.scoring.announce(f"{what}: {len(missing)} frozen passes ({', '.join(f'pi_{k}' for k in missing)}) over "
                              f"{pairs} pairs" if missing else f"{what}: every frozen log-prob is cached")
        for k, reqs in sorted(needs.items()):
            self.ensure(k, reqs)

    def take_model(self, k: int) -> Any:
        """pi_k if the last frozen pass loaded it (saves loading it again as the next policy), else None."""
        held, self._held = self._held, None
        return held[1] if held is not None and held[0] == k else None

    def get(self, k: int, dim: str, split: str) -> FrozenLogps:
        if (k, dim, split) not in self.cache.memo:
            self.ensure(k, [(dim, split)])  # every process asks for the same keys in the same order
        return self.cache.get(k, dim, split)
