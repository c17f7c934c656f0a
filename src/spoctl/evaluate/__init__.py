"""`spoctl eval`: per-dimension scorecards, judged win rates, and a CI gate, callable from Python.

    from spoctl.config import EvalConfig
    from spoctl.console import Output
    from spoctl.evaluate import evaluate

    report = evaluate(EvalConfig(run="runs/hh"), Output(quiet=True))   # the dict written to eval/<id>/report.json

Modules: runinfo (open a run), scorecard (implicit rewards, no generation), generate (responses; vllm_backend on
a GPU), judges/ (registry, rules, reward-model, embedding, openai), winrate (counts and intervals), gate (CI
bounds), report (files), runner (the whole evaluation, with a partial report kept on failure), compare (several
runs on the same held-out pairs: `spoctl compare`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import EvalConfig
    from ..console import Output

__all__ = ["evaluate"]


def evaluate(cfg: EvalConfig, out: Output) -> dict[str, Any]:
    """Evaluate the run `cfg` names (see runner.evaluate). The run is found and its manifest read before the runner,
    which needs torch, is imported: `spoctl.config` reads the judge registry from this package and must stay
    importable without torch, and a mistyped RUN_DIR is told at once."""
    from .runinfo import find_run

    find_run(cfg)
    from .runner import evaluate as evaluate_run

    return evaluate_run(cfg, out)
