"""`spoctl demo`: the built-in demo end to end -- align the tiny demo model on the synthetic task, then show every
dimension's rule-judged score for the base model and after each stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..config import AlignConfig, resolve_config
from ..console import Output
from .common import ConfigOpt, JsonOpt, PrintConfigOpt, QuietOpt, SetOpt, VerboseOpt, execute, app


@app.command(
    epilog="Examples:\n\n  spoctl demo\n\n  spoctl demo --dims harmless,helpful --alpha 0    # other order, sequential DPO"
)
def demo(
    dims: Optional[str] = typer.Option(None, "--dims", help="Demo dimensions in stage order (default: helpful,harmless,concise)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<timestamp>)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="SPO weight of earlier dimensions; 0 = sequential DPO."),
    beta: Optional[float] = typer.Option(None, "--beta", help="KL strength of every stage."),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps per stage."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of batch order."),
    task_seed: int = typer.Option(0, "--task-seed", help="Seed of the demo task and its base model."),
    with_eval: bool = typer.Option(True, "--eval/--no-eval", help="Also run `spoctl eval` with the rules judge."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    print_config: bool = PrintConfigOpt,
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Run the built-in demo: align, then score every stage with the demo's exact rules (docs/demo.md)."""
    out = Output(json_mode=json_, quiet=quiet, verbose=verbose)

    def build() -> AlignConfig:
        flags = {
            "dims": [d.strip() for d in dims.split(",") if d.strip()] if dims else None,
            "out": str(out_dir) if out_dir else None,
            "alpha": alpha,
            "beta": beta,
            "learning_rate": learning_rate,
            "max_steps": max_steps,
            "seed": seed,
        }
        from ..demo.run import demo_config

        # The demo's own settings under what the user set, so --print-config shows what will run.
        return demo_config(resolve_config(AlignConfig, "align", config, set_, flags))

    def act(cfg: AlignConfig) -> dict[str, Any]:
        from ..demo.run import run_demo_and_score

        return run_demo_and_score(out, cfg, task_seed=task_seed, with_eval=with_eval)

    execute(out, build, "align", print_config, act)
