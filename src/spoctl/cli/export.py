"""`spoctl export`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import ExportConfig
from .common import CommonOptions, command, execute


@command(examples=[
    "spoctl export --run runs/hh --out exports/hh",
    "spoctl export --run runs/hh --stage helpful --out exports/hh-stage1 --dtype fp32",
    "spoctl export --run runs/hh --adapter-only --out exports/hh-adapters",
    "spoctl export --run runs/hh --out exports/hh --push-to-hub me/smollm2-hh   # after `hf auth login`",
])
def export(
    run: Optional[Path] = typer.Option(None, "--run", "-r", help="Run directory (from spoctl align)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="last (default), a stage number, or a dimension."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder to write the model to."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="LoRA runs: PEFT adapters instead of merged weights."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Largest safetensors shard (default 2GB)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 (default) | fp16 | fp32."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Also upload to this Hub repo; the token"
                                               " (HF_TOKEN, else `hf auth login`'s) is checked before exporting."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export at --out (a folder holding"
                               " spoctl_lineage.json); nothing else is ever replaced."),
    *,
    opts: CommonOptions,
) -> None:
    """Write one stage of a run as a standalone Hugging Face model folder, checked against the checkpoint."""
    out = opts.output

    def build() -> ExportConfig:
        flags = {
            "run": str(run) if run else None,
            "stage": stage,
            "out": str(out_dir) if out_dir else None,
            "adapter_only": True if adapter_only else None,
            "max_shard_size": max_shard_size,
            "dtype": dtype,
            "push_to_hub": push_to_hub,
            "force": True if force else None,
        }
        return opts.resolve(ExportConfig, "export", flags)

    def act(cfg: ExportConfig) -> dict:
        from ..export import export_model

        return export_model(cfg, out)

    execute(opts, build, "export", act)
