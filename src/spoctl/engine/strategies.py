"""The distributed strategies by their `align.distributed` value. A new one (DeepSpeed ZeRO-3, tensor parallel) is a
`Distributed` subclass and an entry here (and the value in config.AlignConfig.distributed)."""

from __future__ import annotations

from typing import Any

from .distributed import DDP, Distributed, Strategy
from .sharding import FSDP2

STRATEGIES: dict[str, type[Distributed]] = {"ddp": DDP, "fsdp": FSDP2}


def start_strategy(accelerator: Any, strategy: Strategy, precision: str) -> Distributed:
    """The run-time object of `strategy` (`close()` it when the run ends)."""
    return STRATEGIES[strategy.name](accelerator, strategy, precision)
