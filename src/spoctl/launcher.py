"""What a launcher (torchrun, `accelerate launch`, Slurm's srun through them) tells this process in its
environment: its rank and how many processes the command runs on. Read from the variables alone, which exist
before torch.distributed or accelerate is set up -- and before torch is imported, so `signals` can ask too (this
module imports only `errors`, which imports only the standard library)."""

from __future__ import annotations

import os
from typing import Mapping

from .errors import UsageError


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
    counts as 1 here, where a signal handler asks; the commands that start processes refuse it first
    (`check_environment`)."""
    value = (os.environ if env is None else env).get("WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def check_environment(env: Mapping[str, str] | None = None) -> None:
    """A launcher's variable set to something that is not a number -- most often an empty `WORLD_SIZE=` left in a
    shell or a job script: accelerate and torch.distributed stop on it with a bare ValueError deep in their setup,
    after the model is loaded. Here it is an input error that names the variable and what to do."""
    env = os.environ if env is None else env
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        value = env.get(name)
        if value is not None and not value.strip().isdigit():
            raise UsageError(f"the environment variable {name} is {value!r}, not a number: launchers (torchrun, "
                             f"accelerate launch) set it for each process; `unset {name}` to run one process, or "
                             "start spoctl through the launcher")
