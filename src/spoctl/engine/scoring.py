"""One service for "log-probs of this model on these pairs", without gradients: training's frozen passes, the
forgetting view during a stage, `--keep`'s constraint measurement, `spoctl eval`'s scorecard and export's numerical
check all call `Scoring.score`.

One precision path: a `Scoring` holds the run's precision name (spoctl.precision) and runs every pass under the
autocast that name stands for (none for fp32), the same autocast accelerate applies to training's forwards. One
sharding path: under several processes each process scores a disjoint, length-balanced share of the pairs and every
process gets all of them back in pair order (`frozen.score_pairs`); a scorer whose forward is collective (FSDP)
makes every process run the same number of batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..console import Output
from .batching import TokenPair
from .frozen import FrozenLogps, score_pairs
from .logprobs import SequenceScorer
from .processes import Processes


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast of a precision name on a device: none for fp32 (and for fp16 on a CPU, which has no fp16
    autocast path: a CPU pass then runs in float32)."""
    from ..precision import dtype_of, normalize

    name = normalize(precision)
    if name == "fp32" or (name == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype_of(name))


@dataclass
class Scoring:
    """How no-grad passes run in one command: device, precision, processes, batch size, layout, head chunk."""

    device: torch.device
    pad_token_id: int
    precision: str = "fp32"
    procs: Processes = field(default_factory=Processes)
    batch_size: int = 16
    layout: str = "auto"
    chunk_size: int = 256
    collective: bool = False  # a forward needs every process (FSDP)
    out: Output | None = None  # where progress shows (main process only); None: silent

    def scorer(self, model: nn.Module) -> nn.Module:
        """`model` as a scorer: a causal LM is wrapped in a `SequenceScorer`; a scorer (possibly sharded or
        DDP-unwrapped) is used as it is."""
        return model if isinstance(model, SequenceScorer) else SequenceScorer(model, chunk_size=self.chunk_size)

    def announce(self, message: str) -> None:
        """Say what a pass is about to do and its size, before it starts (main process, not under --quiet)."""
        if self.out is not None:
            self.out.info(message)

    def score(self, model: nn.Module, pairs: Sequence[TokenPair], *, label: str | None = None) -> FrozenLogps:
        """Summed completion log-probs of every pair under `model`, in pair order, on every process. With a
        `label`, the pass shows progress as `label` (pairs of the whole pass, all processes together)."""
        scorer = self.scorer(model)
        progress = (self.out.progress(label, total=len(pairs), unit="pairs") if self.out is not None and label
                    else contextlib.nullcontext())
        with progress as bar, autocast(self.device, self.precision):
            advance = (lambda n: bar.advance(n * self.procs.world)) if bar is not None else None
            return score_pairs(scorer, pairs, batch_size=self.batch_size, pad_token_id=self.pad_token_id,
                               device=self.device, layout=self.layout, procs=self.procs, collective=self.collective,
                               advance=advance)

    def with_(self, **changes: Any) -> "Scoring":
        """A copy with some settings changed (another batch size or layout for one kind of pass)."""
        from dataclasses import replace

        return replace(self, **changes)


def run_scoring(dist: Any, cfg: Any, pad_token_id: int, out: Output | None = None) -> Scoring:
    """The scoring of an `align` run (`dist`: engine.distributed.Distributed, `cfg`: its AlignConfig): the run's
    device, precision and processes, its frozen-pass batch size, layout and head chunk."""
    return Scoring(device=dist.accelerator.device, pad_token_id=pad_token_id, precision=dist.precision,
                   procs=dist.procs, batch_size=cfg.frozen_batch_size, layout=cfg.layout,
                   chunk_size=cfg.logprob_chunk, collective=dist.collective_forward, out=out)
