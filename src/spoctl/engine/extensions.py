"""The stage extensions spoctl knows, in the order they act within a step (engine/extension.py describes the
protocol). A new extension is a module with its kind, plan and runtime object, and one entry here."""

from __future__ import annotations

from typing import Any

from .keep_extension import KeepKind
from .replay import ReplayKind

KINDS: tuple[Any, ...] = (KeepKind(), ReplayKind())
