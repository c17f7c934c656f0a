"""`spoctl export`: a stage of a run as a model users can ship (weights, tokenizer, card, lineage), verified."""

from __future__ import annotations

from .pipeline import export_model

__all__ = ["export_model"]
