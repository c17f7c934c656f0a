"""`spoctl align`.

With neither `--data` nor `--model` (nor `align.data` / `align.model` from `--config` or `--set`: the options that
name the user's own data and model), `spoctl align` runs the built-in demo (`spoctl.demo.run`), says so, and
`--print-config` shows the demo's settings. `--dims` is not one of them: the demo has dimensions too, and a
dimension it lacks is an error that points to `--data`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from ..config import AlignConfig
from ..errors import Interrupted
from .common import CommonOptions, comma_list, command, execute, parse_assignments


@command(examples=[
    "spoctl align --dims helpful,harmless --data prepared/ --model ./smollm2 --lora --out runs/hh",
    "spoctl align --dims helpful,harmless --data prepared/ --alpha 0    # sequential DPO baseline",
    "spoctl align --dims helpful,harmless --data prepared/ --keep helpful=0.95   # harmless may cost 5% of helpful",
    "spoctl align --dims helpful,harmless --data prepared/ --out runs/hh --resume",
    "spoctl align --dims helpful,harmless --data prepared/ --lora --quantize 4bit --report-to tensorboard",
    "spoctl align --dims helpful,harmless    # no --data and no --model: the built-in demo",
])
def align(
    dims: Optional[str] = typer.Option(None, "--dims", metavar="DIM,DIM,...",
                                       help="Dimensions in stage order, comma-separated."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Prepared-data directory (from spoctl prepare)."
                                        " Without --data and --model: the built-in demo."),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="MODEL",
                                        help="Base model: folder, .gguf or Hub id (default: the data's)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<timestamp>)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="previous (one alpha) | all (a weight per earlier dimension)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="SPO weight of earlier dimensions; 0 = sequential DPO."),
    weight: Optional[list[str]] = typer.Option(None, "--weight", help="All mode: DIM=W, weight of an earlier dimension (repeatable)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="KL strength of every stage."),
    keep: Optional[list[str]] = typer.Option(None, "--keep", help="DIM=FRACTION: later stages must hold DIM's implicit"
                                             " reward at >= FRACTION of its value after its own stage (repeatable)."),
    lora: Optional[bool] = typer.Option(None, "--lora/--full", help="Train LoRA adapters or all weights."),
    quantize: Optional[str] = typer.Option(None, "--quantize", metavar="none|4bit",
                                           help="QLoRA: 4bit loads the base in 4 bits under the adapters (needs --lora)."),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs per stage."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Pairs per optimizer step (all processes)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap on optimizer steps per stage."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of batch order and adapter init."),
    report_to: Optional[str] = typer.Option(None, "--report-to", metavar="TRACKER,...",
                                            help="Experiment trackers, comma-separated: tensorboard, wandb, mlflow, ..."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run in --out."),
    *,
    opts: CommonOptions,
) -> None:
    """Run one SPO stage per dimension, in order, checkpointing after each."""
    from ..demo.run import DEMO_VIA_ALIGN, demo_for_align, runs_demo

    out = opts.output

    def build() -> AlignConfig:
        flags = {
            "dims": comma_list(dims),
            "data": str(data) if data else None,
            "model": model,
            "out": str(out_dir) if out_dir else None,
            "mode": mode,
            "alpha": alpha,
            "weights": parse_assignments(weight, "--weight", "helpful=0.5", float),
            "beta": beta,
            "keep": parse_assignments(keep, "--keep", "helpful=0.95", float),
            "lora.enabled": lora,
            "quantize": quantize,
            "learning_rate": learning_rate,
            "epochs": epochs,
            "batch_size": batch_size,
            "max_steps": max_steps,
            "seed": seed,
            "report_to": comma_list(report_to),
            "resume": True if resume else None,
        }
        # Without data or model of the user's: the demo's settings, so --print-config shows what will run.
        return demo_for_align(opts.resolve(AlignConfig, "align", flags))

    def act(cfg: AlignConfig) -> dict:
        if runs_demo(cfg):
            from ..demo.run import run_demo

            out.info(DEMO_VIA_ALIGN)
            return run_demo(out, cfg)
        from ..engine.align import align as run_align

        try:
            return run_align(cfg, out)
        except Interrupted as err:  # SIGTERM / SIGHUP: a checkpoint is saved; say how to go on
            again = [*opts.argv, *([] if "--resume" in opts.argv else ["--resume"])]
            raise Interrupted(f"{err}; continue the run with the same command and --resume: "
                              f"{shlex.join(['spoctl', *again])}", err.signum) from None

    result = execute(opts, build, "align", act, header=lambda cfg: DEMO_VIA_ALIGN if runs_demo(cfg) else None)
    if result is not None:
        out.info(f"next: spoctl eval --run {shlex.quote(result['run_dir'])}")
