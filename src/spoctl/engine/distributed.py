"""Several processes (torchrun, `accelerate launch`): which strategy trains -- DDP or FSDP2 -- and the few
collectives the engine needs.

spoctl runs on torch.distributed through accelerate: accelerate reads the launcher's environment, builds the
process group and puts each process on its device, and `accelerator.prepare` wraps a DDP policy. FSDP2 is applied
with torch's own `fully_shard` (engine/sharding.py, as torchtune's distributed recipes do) rather than by
`accelerator.prepare`, which in accelerate 1.15 needs a model and an optimizer together (frozen models have no
optimizer), gives the LM head an FSDP unit of its own (spoctl's head runs in several checkpointed chunks per step)
and does not shard at all on CPUs. An `accelerate launch` FSDP config is read from the environment accelerate sets
for it, so the configs users already have work (configs/accelerate/).

Every decision that depends on files -- is a cache file usable, which checkpoint is intact, what the run directory
holds -- is made once, on the main process, and shared with the others (`Processes.share`): processes on other
nodes need not see the same files, and two processes that decide differently wait forever in different collectives.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch

from ..config import AlignConfig
from ..errors import UsageError
from .processes import Processes

__all__ = ["DDP", "Distributed", "Processes", "Strategy", "resolve_strategy"]


# ------------------------------------------------------------------------------------------------- strategy
@dataclass(frozen=True)
class Strategy:
    """How the policy is split over the processes, resolved from `align.distributed` / `align.fsdp` and the
    launcher's accelerate config."""

    name: str = "ddp"  # ddp | fsdp
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    wrap: tuple[str, ...] = ()
    gradient_checkpointing: bool = False
    source: str = "default"  # where the choice came from: default, align.distributed, accelerate config

    @property
    def fsdp(self) -> bool:
        return self.name == "fsdp"

    def applied_to(self, cfg: AlignConfig) -> AlignConfig:
        """`cfg` with this strategy's settings written in: what an accelerate launch config decided becomes the
        run's configuration (so training reads it, and config.yaml reproduces the run under any launcher)."""
        fsdp = cfg.fsdp.model_copy(update={"cpu_offload": self.cpu_offload,
                                           "reshard_after_forward": self.reshard_after_forward,
                                           "wrap": list(self.wrap)})
        return cfg.model_copy(update={"distributed": self.name, "fsdp": fsdp,
                                      "gradient_checkpointing": self.gradient_checkpointing})

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d["wrap"] = list(self.wrap)
        if not self.fsdp:
            for key in ("cpu_offload", "reshard_after_forward", "wrap"):
                d.pop(key)
        return d


ACCELERATE_CONFIG = "the `accelerate launch` config"
FSDP_HELP = ("use FSDP2 instead, which shards the same state (ZeRO-3): `accelerate launch --config_file "
             "configs/accelerate/fsdp2.yaml -m spoctl align ...`, or `--set distributed=fsdp` under torchrun")
# The accelerate config keys that spoctl reads (through the environment variables `accelerate launch` sets), the
# align setting each one corresponds to, and the value each has when the config does not mention it.
_LAUNCHER_SETTINGS = (
    ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params", "fsdp.cpu_offload", False),
    ("FSDP_RESHARD_AFTER_FORWARD", "fsdp_reshard_after_forward", "fsdp.reshard_after_forward", True),
    ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing", "gradient_checkpointing", False),
)


def _flag(value: str, what: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{ACCELERATE_CONFIG}: {what} is {value!r}; expected true or false")


def _explicit(cfg: AlignConfig, dotted: str) -> bool:
    """Whether a setting was given (config file, --set, flag) rather than left at its default."""
    node: Any = cfg
    *parents, last = dotted.split(".")
    for name in parents:
        if name not in node.model_fields_set:
            return False
        node = getattr(node, name)
    return last in node.model_fields_set


def _setting(cfg: AlignConfig, dotted: str) -> Any:
    node: Any = cfg
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def resolve_strategy(cfg: AlignConfig, environ: Mapping[str, str] | None = None) -> Strategy:
    """DDP or FSDP2 and its settings. An `accelerate launch` FSDP or DeepSpeed config speaks through the environment
    (ACCELERATE_USE_FSDP, FSDP_*, ACCELERATE_USE_DEEPSPEED). A launcher setting that differs from its default and
    an align setting given explicitly that says otherwise are a conflict: an error naming both."""
    env = os.environ if environ is None else environ
    if _flag(env.get("ACCELERATE_USE_DEEPSPEED", "false"), "use_deepspeed"):
        raise UsageError(f"{ACCELERATE_CONFIG} asks for DeepSpeed (distributed_type: DEEPSPEED), which spoctl does "
                         f"not support: it is not installed or tested with spoctl (it needs CUDA); {FSDP_HELP}")
    if cfg.precision == "fp16" and (cfg.distributed == "fsdp" or _flag(env.get("ACCELERATE_USE_FSDP", "false"), "")):
        raise UsageError("precision fp16 with FSDP is not supported (it would need a sharded gradient scaler); "
                         "use bf16 (or fp32)")
    if not _flag(env.get("ACCELERATE_USE_FSDP", "false"), "use_fsdp"):
        source = "align.distributed" if _explicit(cfg, "distributed") else "default"
        strategy = Strategy(cfg.distributed, cfg.fsdp.cpu_offload, cfg.fsdp.reshard_after_forward,
                            tuple(cfg.fsdp.wrap), cfg.gradient_checkpointing, source)
        _check_combinations(cfg, strategy)
        return strategy

    version = env.get("FSDP_VERSION", "1")
    if version.strip() != "2":
        raise UsageError(f"{ACCELERATE_CONFIG} uses FSDP version {version}; spoctl runs FSDP2: set fsdp_version: 2 "
                         "in its fsdp_config (see configs/accelerate/fsdp2.yaml)")
    if _explicit(cfg, "distributed") and cfg.distributed != "fsdp":
        raise UsageError(f"align.distributed is {cfg.distributed}, but {ACCELERATE_CONFIG} asks for FSDP "
                         "(distributed_type: FSDP): remove one of the two (launch with a DDP config such as "
                         "configs/accelerate/ddp.yaml, or drop align.distributed)")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy not in ("TRANSFORMER_BASED_WRAP", ""):
        raise UsageError(f"{ACCELERATE_CONFIG} sets fsdp_auto_wrap_policy: {policy}; spoctl wraps each transformer "
                         "block (TRANSFORMER_BASED_WRAP): set that, or leave the key out")
    values: dict[str, Any] = {}
    for var, key, setting, default in _LAUNCHER_SETTINGS:
        mine = _setting(cfg, setting)
        theirs = _flag(env[var], key) if var in env else default
        if theirs != default and _explicit(cfg, setting) and mine != theirs:
            raise UsageError(f"align.{setting} is {str(mine).lower()}, but {ACCELERATE_CONFIG} sets {key}: "
                             f"{str(theirs).lower()}: remove one of the two")
        values[setting] = theirs if theirs != default else mine
    wrap = tuple(cfg.fsdp.wrap)
    named = tuple(w.strip() for w in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if w.strip())
    if named:
        if _explicit(cfg, "fsdp.wrap") and set(named) != set(wrap):
            raise UsageError(f"align.fsdp.wrap is {list(wrap)}, but {ACCELERATE_CONFIG} sets "
                             f"fsdp_transformer_layer_cls_to_wrap: {','.join(named)}: remove one of the two")
        wrap = named
    strategy = Strategy("fsdp", values["fsdp.cpu_offload"], values["fsdp.reshard_after_forward"], wrap,
                        values["gradient_checkpointing"], "accelerate config")
    _check_combinations(cfg, strategy)
    return strategy


def _check_combinations(cfg: AlignConfig, strategy: Strategy) -> None:
    if not strategy.fsdp:
        return
    if cfg.quantize != "none":
        raise UsageError("quantize 4bit (QLoRA) does not run under FSDP in spoctl (not tested); use distributed: ddp "
                         "on one process, or LoRA without --quantize")
    if cfg.compile:
        raise UsageError("align.compile with FSDP is not tested in spoctl; leave compile off with distributed: fsdp")


# ------------------------------------------------------------------------------------------------- at run time
class Distributed:
    """A strategy at run time: how policies and frozen models are prepared, kept in sync and gathered back. One
    subclass per strategy (`DDP` here, `FSDP2` in engine/sharding.py), chosen by `align.distributed` through
    engine/strategies.py: a new strategy is one subclass and one config value, and no caller branches on which."""

    name = ""
    # Only the main process reads weights; the others build the model on the meta device and receive their part
    # from it (a node then holds one full copy in host memory, not one per process).
    loads_on_main_only = False
    # A forward pass needs every process (FSDP gathers each block's parameters from all of them).
    collective_forward = False
    # A frozen model's scorer can serve as the next stage's policy (a sharded frozen model is no policy).
    frozen_model_is_policy = True

    def __init__(self, accelerator: Any, strategy: Strategy | None = None, precision: str | None = None):
        from ..precision import normalize

        # Not given: the accelerator's mixed precision (accelerate's "no" is fp32).
        self.accelerator = accelerator
        self.precision = precision or normalize(getattr(accelerator, "mixed_precision", None))
        self.strategy = strategy or Strategy(self.name)
        self.procs = Processes.current(accelerator.device)

    @property
    def parameter_device(self) -> torch.device:
        """Where the trained parameters (and so the optimizer's work) live."""
        return self.accelerator.device

    def close(self) -> None:
        """Release what the strategy set up for itself (a process group of its own)."""

    def _param_dtype(self) -> torch.dtype | None:
        from ..precision import dtype_of

        return None if self.precision == "fp32" else dtype_of(self.precision)

    # ---- preparing models ------------------------------------------------------------------------------
    def prepare_training(self, scorer: torch.nn.Module,
                         make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> tuple[Any, Any]:
        """(the scorer as it trains, its optimizer). The optimizer is made over the parameters as they are after
        preparing (FSDP replaces them with shards)."""
        raise NotImplementedError

    def prepare_frozen(self, model: torch.nn.Module, chunk_size: int) -> torch.nn.Module:
        """A scorer of a frozen model for a no-grad pass."""
        raise NotImplementedError

    # ---- during training -------------------------------------------------------------------------------
    def no_sync(self, scorer: Any) -> contextlib.AbstractContextManager:
        """For micro-batches before the last of a step."""
        raise NotImplementedError

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip to `max_norm` (inf: only measure) and return the norm of the whole, unsharded gradient."""
        raise NotImplementedError

    def evaluation_scorer(self, scorer: Any) -> Any:
        """The scorer an evaluation pass (and a checkpoint) calls."""
        raise NotImplementedError

    def trained_model(self, scorer: Any) -> torch.nn.Module:
        """The trained causal LM inside the scorer, ready for `full_state`."""
        raise NotImplementedError

    def full_state(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """The whole (trainable) state on the main process, where the model is not whole there already (None
        then: save the model itself). Every process must call it."""
        raise NotImplementedError


class DDP(Distributed):
    """DistributedDataParallel through accelerate (also one process alone): every process holds the whole model."""

    name = "ddp"

    def prepare_training(self, scorer: torch.nn.Module,
                         make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> tuple[Any, Any]:
        optimizer = make_optimizer(scorer.model)
        return self.accelerator.prepare(scorer, optimizer)

    def prepare_frozen(self, model: torch.nn.Module, chunk_size: int) -> torch.nn.Module:
        from .logprobs import SequenceScorer

        return SequenceScorer(model.to(self.accelerator.device), chunk_size=chunk_size)

    def no_sync(self, scorer: Any) -> contextlib.AbstractContextManager:
        """Accumulate locally, all-reduce once, at the step's last micro-batch."""
        return self.accelerator.no_sync(scorer)

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def evaluation_scorer(self, scorer: Any) -> Any:
        """The replica without the DDP wrapper (whose forward may communicate)."""
        return self.accelerator.unwrap_model(scorer)

    def trained_model(self, scorer: Any) -> torch.nn.Module:
        return self.accelerator.unwrap_model(scorer).model

    def full_state(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        return None  # whole on every process already
