"""What a launcher (torchrun, `accelerate launch`, Slurm's srun through them) tells this process in its
environment: its rank and how many processes the command runs on. Read from the variables alone, which exist
before torch.distributed or accelerate is set up -- and before torch is imported, so `signals` can ask too."""

from __future__ import annotations

import os
from typing import Mapping


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process should talk to people: the global main process of a distributed launch (RANK 0; without
    RANK, LOCAL_RANK 0), or a plain single process, so the first lines are already printed once."""
    env = os.environ if env is None else env
    for name in ("RANK", "LOCAL_RANK"):
        value = env.get(name, "").strip()
        if value:
            return value == "0"
    return True


def world_size(env: Mapping[str, str] | None = None) -> int:
    """How many processes the launcher started (WORLD_SIZE); 1 without a launcher. An empty or unreadable value
    counts as 1 -- a launcher always sets a number, and an empty WORLD_SIZE left in a shell must not fail a
    single-process command."""
    value = (os.environ if env is None else env).get("WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1
