"""The `rules` judge: the built-in demo task's exact rule scores (spoctl.demo.task.rule_score), compared pairwise.

Exact, free and noiseless, so the demo's win rates measure the models and not the judge.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .base import Judge, JudgeContext, JudgeUnavailable, Matchup, score_from_values


def load_rule_score() -> Callable[[str, str, str], float]:
    try:
        from ...demo.task import rule_score  # the demo task owns its rules; we only call them
    except ImportError as err:
        raise JudgeUnavailable(
            f"the rules judge needs the built-in demo task (spoctl.demo.task.rule_score), which cannot be imported"
            f" ({err}); choose another judge with --judge embedding|reward-model|openai:MODEL") from None
    return rule_score


class RulesJudge(Judge):
    name = "rules"

    def __init__(self) -> None:
        self._score: Callable[[str, str, str], float] | None = None

    @classmethod
    def from_settings(cls, settings: Any, context: JudgeContext) -> "RulesJudge":
        from . import DEMO_FIELD, OTHER_JUDGES, is_demo_run

        if not is_demo_run(context.manifest):
            # Its rules score the demo task's prompts only; on other prompts every response would tie.
            raise JudgeUnavailable("--judge rules scores the built-in demo task only, and this run is not a demo run"
                                   f" (its manifest has no '{DEMO_FIELD}' field); use {OTHER_JUDGES}")
        return cls()

    def prepare(self, dims: Sequence[str]) -> None:
        self._score = load_rule_score()

    def compare(self, items: Sequence[Matchup]) -> list[float]:
        if self._score is None:
            self.prepare([])
        assert self._score is not None
        return [score_from_values(float(self._score(m.dim, m.prompt, m.a)), float(self._score(m.dim, m.prompt, m.b)))
                for m in items]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": "spoctl.demo.task.rule_score"}
