"""This process's place among a command's processes (torchrun, `accelerate launch`), and the few collectives
spoctl uses, all no-ops alone. Every decision that depends on files is made on the main process and shared
(`Processes.share`): processes on other nodes need not see the same files, and two processes that decide
differently wait forever in different collectives.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

from .. import errors
from ..errors import SpoctlError
from ..launcher import check_environment, world_size

T = TypeVar("T")


class Processes:
    """This process's place among the run's processes, and the collectives spoctl uses (all no-ops alone)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")

    @classmethod
    def current(cls, device: torch.device | None = None) -> "Processes":
        """The processes of the initialised process group, else this process alone."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(device=device)

    @classmethod
    def from_launcher(cls, device: torch.device) -> "Processes":
        """For commands without an Accelerator of their own (`spoctl eval`): join the process group a launcher
        (torchrun, accelerate launch) asked for in the environment, through accelerate, as `align` does."""
        import torch.distributed as dist

        check_environment()
        if world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
            from accelerate import PartialState

            PartialState(cpu=device.type == "cpu")
        return cls.current(device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: T) -> T:
        """The main process's `value` on every process (any picklable object; small ones)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the main process only and give its result to every process. When it raises, every process
        raises: a spoctl error with the same message (so each ends with the same exit code), anything else as a
        RuntimeError naming it, while the main process keeps its own exception and traceback."""
        result, failure = None, None
        if self.main:
            try:
                result = fn()
            except SpoctlError as err:
                failure = (type(err).__name__, str(err), True, getattr(err, "signum", None))
                if self.world == 1:
                    raise
            except errors.Stopped as err:  # a signal: every process stops with it, not only this one
                if self.world == 1:
                    raise
                failure = ("Interrupted", str(err.as_error()), True, err.signum)
            except Exception as err:
                if self.world == 1:
                    raise
                self.broadcast((None, (type(err).__name__, str(err), False, None)))
                raise
        result, failure = self.broadcast((result, failure))
        if failure is not None:
            name, message, ours, signum = failure
            if ours:
                kind = getattr(errors, name, SpoctlError)
                # An interruption keeps its signal, so every rank exits as the main one does (143 or 129).
                raise kind(message, signum) if signum is not None else kind(message)
            raise RuntimeError(f"the main process failed ({name}: {message})")
        return result

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the processes (on this process's device, as NCCL needs)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        tensor = tensor.to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, value: T) -> list[T]:
        """Every process's `value`, in rank order, on every process."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()
