"""`spoctl export`: a stage of a run as a model users can ship (weights, tokenizer, card, lineage), verified."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import ExportConfig
    from ..console import Output

__all__ = ["export_model"]


def export_model(cfg: ExportConfig, out: Output) -> dict[str, Any]:
    """Export one stage of the run in `cfg.run` (see pipeline.export_model). The run is read before the exporter,
    which needs torch, is imported: a mistyped --run is told at once."""
    from .stage import read_run

    read_run(cfg.run)
    from .pipeline import export_model as export

    return export(cfg, out)
