"""`spoctl compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import CompareConfig
from .common import CommonOptions, command, execute
from .flags import Flag


COMPARE_FLAGS = [
    Flag("dims", ("--dims",), "list", metavar="DIM,DIM,..."),
    Flag("plot", ("--plot",)),
    Flag("seed", ("--seed",)),
]


@command(config=CompareConfig, flags=COMPARE_FLAGS, examples=[
    "spoctl compare runs/dpo runs/spo runs/keep            # differences from the first run, with 95% intervals",
    "spoctl compare runs/dpo runs/spo --json > compare.json",
    "spoctl compare runs/dpo runs/spo --plot pareto.png --set bootstrap_resamples=10000",
    "spoctl compare s0/dpo,s1/dpo s0/spo,s1/spo            # two seeds pooled (stratified intervals)",
])
def compare(
    runs: Optional[list[Path]] = typer.Argument(None, metavar="RUN RUN...", help="Run directories made by spoctl align; the first is the"
                                                " one the others are compared with. A,B: one method's runs on"
                                                " several seeds, pooled (each RUN lists its seeds in the same"
                                                " order)."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Skip the PNG plot."),  # plot: null, which no flag value says
    *,
    opts: CommonOptions,
) -> None:
    """Compare runs' models on the same held-out pairs: accuracy and mean margin of log(pi/pi_0) per dimension,
    retention of earlier dimensions, and paired bootstrap 95% intervals of each run's difference from the first.

    Exit codes: 0 ok, 2 usage error (among them: runs whose held-out pairs differ, named)."""
    out = opts.output

    def build() -> CompareConfig:
        cfg = opts.resolve(CompareConfig, "compare", {"runs": [str(r) for r in runs] if runs else None})
        return cfg.model_copy(update={"plot": None}) if no_plot else cfg

    def act(cfg: CompareConfig) -> dict:
        from ..evaluate.compare import compare_runs

        return compare_runs(cfg, out)

    execute(opts, build, "compare", act)
