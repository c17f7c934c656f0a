"""One precision vocabulary for every command: the names users write (`fp32`, `bf16`, `fp16`), the torch dtype
each stands for, and the name accelerate gives it. Manifests record these names.

torch is imported only where a dtype is needed, so configuration stays quick to load.
"""

from __future__ import annotations

from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
# accelerate's `mixed_precision` calls full precision "no"; manifests written before spoctl 0.2 recorded that name.
_ACCELERATE_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def dtype_of(name: str) -> Any:
    """The torch dtype of a precision name (accepts the legacy "no" for fp32)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[normalize(name)]


def normalize(name: str | None) -> str:
    """A recorded precision as one of PRECISIONS: "no" (accelerate's word, older manifests) and None are fp32."""
    if name in (None, "no"):
        return "fp32"
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    return name


def accelerate_mixed_precision(name: str) -> str:
    """What `accelerate.Accelerator(mixed_precision=...)` takes for a precision name."""
    return _ACCELERATE_NAMES[normalize(name)]


def resolve(setting: str) -> str:
    """`auto` -> bf16 on a CUDA GPU that supports it, else fp32; an explicit name is kept."""
    if setting != "auto":
        return normalize(setting)
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
