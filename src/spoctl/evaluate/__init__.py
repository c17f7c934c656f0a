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

from typing import Any

__all__ = ["evaluate"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the runner needs torch, while `spoctl.config` reads the judge registry from this
    # package and must stay importable without it.
    if name == "evaluate":
        from .runner import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
