"""`spoctl demo`: the built-in demo end to end -- align the tiny demo model on the synthetic task, then show every
dimension's rule-judged score for the base model and after each stage."""

from __future__ import annotations

from typing import Any

import typer

from ..config import AlignConfig
from .align import ALIGN_FLAGS
from .common import CommonOptions, command, execute
from .flags import pick


# The demo's share of align's flags, with what differs for the demo.
DEMO_FLAGS = pick(ALIGN_FLAGS, "dims", "out", "alpha", "beta", "learning_rate", "max_steps", "seed",
                  dims={"help": "Demo dimensions in stage order (default: helpful,harmless,concise)."},
                  learning_rate={"help": "Peak learning rate (default: the demo's, docs/demo.md)."},
                  max_steps={"help": "Optimizer steps per stage (default: the demo's, docs/demo.md)."})


@command(config=AlignConfig, flags=DEMO_FLAGS, examples=[
    "spoctl demo",
    "spoctl demo --dims harmless,helpful --alpha 0    # other order, sequential DPO",
])
def demo(
    task_seed: int = typer.Option(0, "--task-seed", help="Seed of the demo task and its base model."),
    with_eval: bool = typer.Option(True, "--eval/--no-eval", help="Also run `spoctl eval` with the rules judge."),
    *,
    opts: CommonOptions,
) -> None:
    """Run the built-in demo: align, then score every stage with the demo's exact rules (docs/demo.md)."""
    from ..demo.run import demo_config, run_demo_and_score

    def build() -> AlignConfig:
        # The demo's own settings under what the user set, so --print-config shows what will run.
        return demo_config(opts.resolve(AlignConfig, "align"))

    def act(cfg: AlignConfig) -> dict[str, Any]:
        return run_demo_and_score(opts.output, cfg, task_seed=task_seed, with_eval=with_eval)

    execute(opts, build, "align", act)
