"""`spoctl demo`: the built-in demo end to end -- align the tiny demo model on the synthetic task, then show every
dimension's rule-judged score for the base model and after each stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..config import AlignConfig
from .common import CommonOptions, comma_list, command, execute


@command(examples=[
    "spoctl demo",
    "spoctl demo --dims harmless,helpful --alpha 0    # other order, sequential DPO",
])
def demo(
    dims: Optional[str] = typer.Option(None, "--dims", metavar="DIM,DIM,...",
                                       help="Demo dimensions in stage order (default: helpful,harmless,concise)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<timestamp>)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="SPO weight of earlier dimensions; 0 = sequential DPO."),
    beta: Optional[float] = typer.Option(None, "--beta", help="KL strength of every stage."),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps per stage."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of batch order."),
    task_seed: int = typer.Option(0, "--task-seed", help="Seed of the demo task and its base model."),
    with_eval: bool = typer.Option(True, "--eval/--no-eval", help="Also run `spoctl eval` with the rules judge."),
    *,
    opts: CommonOptions,
) -> None:
    """Run the built-in demo: align, then score every stage with the demo's exact rules (docs/demo.md)."""
    from ..demo.run import demo_config, run_demo_and_score

    def build() -> AlignConfig:
        flags = {
            "dims": comma_list(dims),
            "out": str(out_dir) if out_dir else None,
            "alpha": alpha,
            "beta": beta,
            "learning_rate": learning_rate,
            "max_steps": max_steps,
            "seed": seed,
        }
        # The demo's own settings under what the user set, so --print-config shows what will run.
        return demo_config(opts.resolve(AlignConfig, "align", flags))

    def act(cfg: AlignConfig) -> dict[str, Any]:
        return run_demo_and_score(opts.output, cfg, task_seed=task_seed, with_eval=with_eval)

    execute(opts, build, "align", act)
