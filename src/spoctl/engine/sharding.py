"""FSDP2 for spoctl's scorers: which modules become FSDP units, and how weights read by one process reach all.

The recipe is torchtune's and torchtitan's: every transformer block is one unit (`fully_shard`), then the whole
`SequenceScorer` is the root unit, which holds what is left (embeddings, final norm, LM head). The head thus runs
inside the root's forward -- several checkpointed chunks per step -- and its gradients are reduced with the root's
at the end of the backward, as DDP syncs them because the scorer is what it wraps.

Loading: only the main process reads weights; the others build the same model on the meta device
(`models.causal_lm_skeleton`). After sharding, each process receives its shard of every tensor from the main
process (one scatter per tensor), so no process but the main one ever holds the whole model in host memory.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UsageError
from ..models import tied_aliases
from .distributed import Distributed, Strategy
from .processes import Processes


def block_classes(model: nn.Module, strategy: Strategy) -> set[str]:
    names = set(strategy.wrap) or set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise UsageError(f"FSDP: {type(model).__name__} does not name its transformer blocks (_no_split_modules); "
                         "set align.fsdp.wrap to their class name, e.g. [LlamaDecoderLayer]")
    return names


def shard(scorer: nn.Module, strategy: Strategy, procs: Processes, *, param_dtype: torch.dtype | None,
          training: bool) -> None:
    """Make every transformer block of `scorer.model`, then `scorer` itself, an FSDP2 unit (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(procs.device.type, (procs.world,))
    # Compute in `precision`, reduce gradients in float32, keep float32 master weights (the optimizer's).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if strategy.cpu_offload else OffloadPolicy()
    common = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}
    names = block_classes(scorer.model, strategy)
    blocks = [m for m in scorer.modules() if type(m).__name__ in names]
    if not blocks:
        raise UsageError(f"FSDP: no module of {type(scorer.model).__name__} is a {' or '.join(sorted(names))}; set "
                         "align.fsdp.wrap to the class name of its transformer blocks")
    # A frozen model only runs forwards: free every block's gathered weights as soon as it is done.
    reshard_blocks = strategy.reshard_after_forward or not training
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_blocks, **common)
    # The root keeps its (embedding, head) weights gathered from forward to backward while training (torch's
    # default for a root); a frozen pass frees them after each forward.
    fully_shard(scorer, reshard_after_forward=None if training else True, **common)


def shard_and_fill(scorer: nn.Module, strategy: Strategy, procs: Processes, *, param_dtype: torch.dtype | None,
                   training: bool) -> None:
    """Shard `scorer` and give every process its part of the main process's weights. On the main process
    `scorer` holds the real model; elsewhere the same architecture with parameters on the meta device."""
    _check_same_model(scorer, procs)
    full = dict(scorer.state_dict()) if procs.main else {}
    shard(scorer, strategy, procs, param_dtype=param_dtype, training=training)
    fill_from_main(scorer, full, procs, offload=strategy.cpu_offload)
    del full


def _check_same_model(scorer: nn.Module, procs: Processes) -> None:
    """Every process must have built the same parameters, or the first collective would fail obscurely."""
    mine = [(name, tuple(p.shape), str(p.dtype), p.requires_grad) for name, p in scorer.named_parameters()]
    theirs = procs.broadcast(mine)
    if mine != theirs:
        diff = next(((a, b) for a, b in zip(mine, theirs) if a != b), (len(mine), len(theirs)))
        raise RuntimeError(f"process {procs.rank} built another model than the main process ({diff})")


def fill_from_main(module: nn.Module, full: dict[str, torch.Tensor], procs: Processes, *, offload: bool) -> None:
    """Copy each process's shard of the main process's `full` state into the sharded `module` (in place, so tied
    weights stay tied). Processes whose parameters are on the meta device get real storage first."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    device = torch.device("cpu") if offload else procs.device
    if any(t.is_meta for t in module.state_dict().values()):
        # to_empty gives every tensor fresh storage, the buffers the model computed itself (rotary frequencies,
        # not in the state dict) included: keep those.
        keep = {name: b.clone() for name, b in module.named_buffers() if not b.is_meta}
        module.to_empty(device=device)
        with torch.no_grad():
            for name, value in keep.items():
                module.get_buffer(name).copy_(value)
    with torch.no_grad():
        for name, target in module.state_dict().items():  # the same names in the same order on every process
            if isinstance(target, DTensor):
                mesh = target.device_mesh
                src = (full[name].to(mesh.device_type, target.dtype) if procs.main
                       else torch.empty(target.shape, dtype=target.dtype, device=mesh.device_type))
                part = distribute_tensor(src, mesh, target.placements, src_data_rank=0)
                target.to_local().copy_(part.to_local())
            else:
                value = full[name].to(procs.device, target.dtype) if procs.main else \
                    torch.empty(target.shape, dtype=target.dtype, device=procs.device)
                if procs.world > 1:
                    dist.broadcast(value, src=0)
                target.copy_(value)


def reshard(module: nn.Module) -> None:
    """Free every gathered parameter (a root that trained or evaluated last keeps its weights gathered)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state_dict(module: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The unsharded state of a sharded module on the main process's CPU ({} on the others), as `save_pretrained`
    writes it: a tied parameter under its first name only (the gathered copies are separate tensors, which
    `save_pretrained` would write twice, `lm_head.weight` beside `embed_tokens.weight`). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=trainable_only))
    aliases = tied_aliases(module)
    return {name: t for name, t in state.items() if name not in aliases}


class FSDP2(Distributed):
    """FSDP2 (`fully_shard`, ZeRO-3): every transformer block and the root are sharded over the processes. Only the
    main process reads weights; the others receive their shards from it. It needs a process group even alone (one
    process on one GPU runs the same code path as eight), and makes one when the launcher did not."""

    name = "fsdp"
    loads_on_main_only = True
    collective_forward = True
    frozen_model_is_policy = False  # FSDP prepares the policy anew from the unsharded model

    def __init__(self, accelerator: Any, strategy: Strategy | None = None, precision: str | None = None):
        import torch.distributed as dist

        self._own_group = False
        if not dist.is_initialized():
            backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_group = True
        super().__init__(accelerator, strategy, precision)

    @property
    def parameter_device(self) -> torch.device:
        """The host under CPU offload."""
        return torch.device("cpu") if self.strategy.cpu_offload else self.accelerator.device

    def close(self) -> None:
        if self._own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._own_group = False

    def prepare_training(self, scorer: nn.Module,
                         make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> tuple[Any, Any]:
        shard_and_fill(scorer, self.strategy, self.procs, param_dtype=self._param_dtype(), training=True)
        return scorer, make_optimizer(scorer.model)

    def prepare_frozen(self, model: nn.Module, chunk_size: int) -> nn.Module:
        from .logprobs import SequenceScorer

        model.requires_grad_(False)
        scorer = SequenceScorer(model, chunk_size=chunk_size)
        shard_and_fill(scorer, self.strategy, self.procs, param_dtype=self._param_dtype(), training=False)
        return scorer

    def no_sync(self, scorer: Any) -> contextlib.AbstractContextManager:
        """FSDP reduces every micro-batch's gradients to shards as they come, so that no process ever holds whole
        gradients (deferring would keep them unsharded until the step: the memory FSDP is there to save)."""
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def evaluation_scorer(self, scorer: Any) -> Any:
        """The sharded scorer itself (its forward is collective)."""
        return scorer

    def trained_model(self, scorer: Any) -> nn.Module:
        """Resharded, ready for its state to be gathered."""
        reshard(scorer)
        return scorer.model

    def full_state(self, model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """Gathered on the main process's CPU ({} on the others). Collective."""
        return full_state_dict(model, trainable_only=trainable_only)
