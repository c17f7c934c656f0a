"""Resumable state within a stage: trainable weights, optimizer state, scheduler, every process's RNG, the step.

    step-000050/
      state/*.safetensors         trainable parameters and optimizer state as safetensors, one file per process:
                                  its shards (FSDP, written by torch.distributed.checkpoint: DCP) or its share of
                                  the replicated tensors (one process, DDP: plain safetensors files DCP reads)
      rng/rank-00000.safetensors  each process's RNG state
      trainer_state.json          step, stage, total, processes, strategy, scheduler state, optimizer settings
      checksums.json              size and sha256 of every other file, recorded when it was written

Safetensors and JSON only: nothing is unpickled on resume. DCP reshards when it loads, so a checkpoint written by
N processes resumes on M (DDP or FSDP alike); on the same N it resumes bit for bit (the data position follows from
the step). The folder is written under a temporary name and renamed into place by the main process once every
process has written its part, so a `step-N` folder that exists was whole; anything that happens to it later (a
flipped bit, a truncated file) is found on resume by `intact_checkpoint`, which falls back to an older one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..console import Output
from ..fsutil import atomic_directory, sha256_file
from ..models import tensor_bytes, tied_aliases
from .chain import hash_problems, size_problems
from .frozen import balanced_shards
from .processes import Processes

STATE_DIR = "state"
RNG_DIR = "rng"
META_FILE = "trainer_state.json"
CHECKSUMS_FILE = "checksums.json"
FORMAT = "spoctl-checkpoint-2"


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / RNG_DIR / f"rank-{rank:05d}.safetensors"


def _flat_state(scorer: nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable parameters and the optimizer state as one flat name -> tensor dict (sharded tensors under
    FSDP), keyed by parameter names, so any process layout can read it back; and the optimizer state dict whose
    tensors are those of the flat dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(scorer, getattr(optimizer, "optimizer", optimizer),
                                        options=StateDictOptions(ignore_frozen_params=True))
    # A tied parameter (input embedding = output head: tie_word_embeddings) appears under each of its names;
    # safetensors refuses to write one storage twice. Only its first name is stored: loading fills that tensor,
    # which the other names share in the live model, so the tie holds after a resume as it did before.
    aliases = tied_aliases(scorer)
    flat = {f"model/{name}": t for name, t in model_sd.items() if name not in aliases}
    for name, state in optim_sd["state"].items():
        for key, value in state.items():
            flat[f"optim/{name}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat, optim_sd


def save_checkpoint(folder: Path, *, procs: Processes, scorer: nn.Module, optimizer: Any, scheduler: Any,
                    meta: dict[str, Any], keep_last: int = 2, out: Output | None = None) -> None:
    """Write the state of every process into `folder` (collective: every process calls it). With `out`, the write
    shows as a step of its own (size, then time): full fine-tuning writes the weights and twice their size in Adam
    moments, seconds to minutes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    flat, optim_sd = _flat_state(scorer, optimizer)
    shown = (out.writing(f"writing checkpoint {folder.name}", tensor_bytes(flat.values()),
                         "trainable weights and optimizer state, then their checksums")
             if out is not None else contextlib.nullcontext())
    with shown, atomic_directory(folder, replace=True) if procs.main else contextlib.nullcontext() as made:
        tmp = Path(procs.broadcast(str(made) if procs.main else None))
        if _sharded(flat):
            with _single_process_quietly(), _unwrapped_failures():
                dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / STATE_DIR), save_distributed=True),
                         no_dist=_alone())
        else:
            _write_share(flat, tmp / STATE_DIR, procs)
        rng = _rng_file(tmp, procs.rank)
        rng.parent.mkdir(parents=True, exist_ok=True)
        save_file(_rng_state(), str(rng))
        procs.barrier()
        # Every process hashes a share of the files (a 70B model's optimizer state is hundreds of GB).
        names = procs.share(lambda: sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()))
        mine = {n: {"size": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
                for n in names[procs.rank::procs.world]}
        records = procs.gather(mine)
        if procs.main:
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optim_sd["param_groups"]]
            (tmp / META_FILE).write_text(json.dumps({
                "format": FORMAT, **meta, "processes": procs.world, "scheduler": scheduler.state_dict(),
                "optimizer": groups}, indent=2) + "\n", encoding="utf-8")
            files = {n: info for part in records for n, info in part.items()}
            files[META_FILE] = {"size": (tmp / META_FILE).stat().st_size, "sha256": sha256_file(tmp / META_FILE)}
            (tmp / CHECKSUMS_FILE).write_text(json.dumps({"format": FORMAT, "files": files}, indent=2) + "\n",
                                              encoding="utf-8")
    if procs.main:  # older checkpoints only cost disk: keep the newest few
        siblings = sorted(p for p in folder.parent.iterdir() if p.name.startswith("step-") and p.is_dir())
        for old in siblings[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    procs.barrier()


def _sharded(flat: dict[str, torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in flat.values())


def _write_share(flat: dict[str, torch.Tensor], folder: Path, procs: Processes) -> None:
    """Replicated state (one process, DDP): each process writes its share of the tensors, balanced by bytes as the
    frozen pass balances pairs by tokens (`balanced_shards`: the same shares on every process), as one safetensors
    file named as DCP names its own; DCP's reader reads it back on any process layout (a tensor without DCP's
    offsets is a whole one). dcp.save took 4.5 times as long for the same state (SmolLM2's full fine-tuning, 1.6 GB:
    14.3 s against 3.3 s on 2 CPU cores, benchmarks/checkpoint_write.py): it serialises every tensor into bytes in
    memory before it writes them."""
    names = sorted(flat)
    share = balanced_shards([flat[n].numel() * flat[n].element_size() for n in names], procs.world)[procs.rank]
    mine = {names[i]: flat[names[i]].contiguous() for i in share}
    if mine:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(mine, str(folder / f"shard-{procs.rank + 1:05d}-model-00001-of-00001.safetensors"))


@contextlib.contextmanager
def _unwrapped_failures() -> Iterator[None]:
    """DCP reports a failed write or read as a CheckpointException (a BaseException, so no `except Exception` sees
    it) that wraps each rank's exception: re-raise the one that says what happened (a full disk is an OSError like
    any other), so the command's error handler can name it."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as err:
        failures = [exc for exc, _ in err.failures.values()]
        cause = next((e for e in failures if isinstance(e, OSError)), failures[0] if failures else None)
        if cause is None:
            raise
        raise cause from None


def _alone() -> bool:
    """No process group: DCP then reads and writes as one process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _single_process_quietly() -> Any:
    """DCP warns on every call without a process group that it assumes one process: that is what spoctl means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def verify_checkpoint(folder: Path, procs: Processes) -> list[str]:
    """What is wrong with `folder` against its checksums.json (empty: intact). Collective: sizes are checked by the
    main process, the hashing is shared out."""

    def recorded() -> tuple[list[str], dict[str, dict[str, Any]]]:
        try:
            files = json.loads((folder / CHECKSUMS_FILE).read_text(encoding="utf-8"))["files"]
        except FileNotFoundError:
            return [f"{folder / CHECKSUMS_FILE} is missing (the checkpoint was not written by this spoctl)"], {}
        except (OSError, ValueError, KeyError, TypeError) as err:
            return [f"{folder / CHECKSUMS_FILE} is unreadable ({type(err).__name__})"], {}
        return size_problems(folder, files), files

    problems, files = procs.share(recorded)
    if problems:
        return problems
    mine = hash_problems(folder, files, sorted(files)[procs.rank::procs.world])
    return [p for part in procs.gather(mine) for p in part]


def intact_checkpoint(candidates: Callable[[], list[tuple[int, Path]]], procs: Processes,
                      warn: Callable[[str], None]) -> tuple[int, Path] | None:
    """The newest of the checkpoints `candidates()` lists (newest first; called on the main process) whose files
    are as written. Newer damaged ones are named in a warning and removed (they can never be resumed from); None
    when none is intact. Collective."""
    found = procs.share(lambda: [(step, str(path)) for step, path in candidates()])
    for n, (step, path) in enumerate(found):
        problems = verify_checkpoint(Path(path), procs)
        if not problems:
            return step, Path(path)
        fallback = (f"resuming from the previous checkpoint (step {found[n + 1][0]})" if n + 1 < len(found)
                    else "no intact checkpoint is left: the stage starts again from its beginning")
        warn(f"checkpoint {path} is damaged ({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}); "
             f"it is removed, {fallback}")
        if procs.main:
            shutil.rmtree(path, ignore_errors=True)
        procs.barrier()
    return None


def load_checkpoint(folder: Path, *, procs: Processes, scorer: nn.Module, optimizer: Any,
                    scheduler: Any) -> dict[str, Any]:
    """Restore the state `save_checkpoint` wrote into an equally built scorer and optimizer (collective). Returns
    trainer_state.json. Another process count than the checkpoint's is resharded by DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    meta = procs.share(lambda: json.loads((folder / META_FILE).read_text(encoding="utf-8")))
    flat, optim_sd = _flat_state(scorer, optimizer)
    with _single_process_quietly(), _unwrapped_failures():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(folder / STATE_DIR)), no_dist=_alone())
    for group, saved in zip(optim_sd["param_groups"], meta["optimizer"]):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    for name, state in optim_sd["state"].items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                state[key] = type(value)(flat[f"optim/{name}/{key}"].item())
    set_state_dict(scorer, getattr(optimizer, "optimizer", optimizer),
                   model_state_dict={k.removeprefix("model/"): v for k, v in flat.items() if k.startswith("model/")},
                   optim_state_dict=optim_sd, options=StateDictOptions(ignore_frozen_params=True, strict=False))
    scheduler.load_state_dict(meta["scheduler"])
    own = _rng_file(folder, procs.rank)
    # Resharded onto more processes than wrote it: the extra ones continue rank 0's stream.
    _set_rng_state(load_file(str(own if own.is_file() else _rng_file(folder, 0))))
    return meta
