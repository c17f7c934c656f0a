"""`spoctl align`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import AlignConfig, resolve_config
from ..console import Output
from .common import ConfigOpt, JsonOpt, PrintConfigOpt, QuietOpt, SetOpt, VerboseOpt, app, execute, parse_assignments

@app.command(
    epilog="Examples:\n\n  spoctl align --dims helpful,harmless --data prepared/ --model ./smollm2 --lora --out runs/hh\n\n"
    "  spoctl align --dims helpful,harmless --data prepared/ --alpha 0    # sequential DPO baseline\n\n"
    "  spoctl align --dims helpful,harmless --data prepared/ --keep helpful=0.95   # harmless may cost 5% of helpful\n\n"
    "  spoctl align --dims helpful,harmless --data prepared/ --out runs/hh --resume"
)
def align(
    dims: Optional[str] = typer.Option(None, "--dims", help="Dimensions in stage order, comma-separated."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Prepared-data directory (from spoctl prepare)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: folder, .gguf or Hub id (default: the data's)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<timestamp>)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="previous (one alpha) | all (a weight per earlier dimension)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="SPO weight of earlier dimensions; 0 = sequential DPO."),
    weight: Optional[list[str]] = typer.Option(None, "--weight", help="All mode: DIM=W, weight of an earlier dimension (repeatable)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="KL strength of every stage."),
    keep: Optional[list[str]] = typer.Option(None, "--keep", help="DIM=FRACTION: later stages must hold DIM's implicit"
                                             " reward at >= FRACTION of its value after its own stage (repeatable)."),
    lora: Optional[bool] = typer.Option(None, "--lora/--full", help="Train LoRA adapters or all weights."),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs per stage."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Pairs per optimizer step (all processes)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap on optimizer steps per stage."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of batch order and adapter init."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run in --out."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    print_config: bool = PrintConfigOpt,
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Run one SPO stage per dimension, in order, checkpointing after each."""
    out = Output(json_mode=json_, quiet=quiet, verbose=verbose)

    def build() -> AlignConfig:
        flags = {
            "dims": [d.strip() for d in dims.split(",") if d.strip()] if dims else None,
            "data": str(data) if data else None,
            "model": model,
            "out": str(out_dir) if out_dir else None,
            "mode": mode,
            "alpha": alpha,
            "weights": parse_assignments(weight, "--weight", "helpful=0.5", float),
            "beta": beta,
            "keep": parse_assignments(keep, "--keep", "helpful=0.95", float),
            "lora.enabled": lora,
            "learning_rate": learning_rate,
            "epochs": epochs,
            "batch_size": batch_size,
            "max_steps": max_steps,
            "seed": seed,
            "resume": True if resume else None,
        }
        return resolve_config(AlignConfig, "align", config, set_, flags)

    def act(cfg: AlignConfig) -> dict:
        if cfg.data is None and cfg.model is None:
            # Nothing to align was given: run the built-in demo end to end (docs/demo.md).
            from ..demo.run import run_demo

            return run_demo(out, cfg)
        from ..engine.align import align as run_align

        return run_align(cfg, out)

    execute(out, build, "align", print_config, act)
