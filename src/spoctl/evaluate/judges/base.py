"""What every judge is: given one dimension and pairs of responses to the same prompt, say which is better.

A verdict is the score of response A against B: 1 (A better), 0.5 (tie), 0 (B better); a judge that asks in
both orders may return the average of its two verdicts (0.25, 0.75). Win/tie/loss counting treats > 0.5 as a
win and == 0.5 as a tie.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ...errors import UsageError

if TYPE_CHECKING:
    from ...config import JudgeSettings


class JudgeUnavailable(UsageError):
    """The judge cannot be used (missing package, model, key, or endpoint): exit 2, partial report kept."""


@dataclass(frozen=True)
class Matchup:
    """One comparison: the same prompt, two responses."""

    dim: str
    prompt: str  # the last user message: what the rule judges and the rubric prompts quote
    a: str
    b: str
    messages: tuple[dict[str, str], ...] = field(default=(), compare=False)  # the whole conversation, if known


def last_user_text(messages_json: str, fallback: str = "") -> str:
    """The text of the last user message of a prepared row's `prompt_messages` (JSON list of messages)."""
    try:
        messages = json.loads(messages_json) if messages_json else []
    except json.JSONDecodeError:
        return fallback
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content", ""))
    return fallback


def parse_messages(messages_json: str) -> tuple[dict[str, str], ...]:
    try:
        messages = json.loads(messages_json) if messages_json else []
    except json.JSONDecodeError:
        return ()
    return tuple({"role": str(m.get("role")), "content": str(m.get("content", ""))} for m in messages
                 if isinstance(m, dict))


def conversation_text(m: Matchup, response: str) -> str:
    """A plain transcript of the prompt and a response, for judges with their own tokenizer."""
    turns = [f"{t['role']}: {t['content']}" for t in m.messages] or [f"user: {m.prompt}"]
    return "\n\n".join([*turns, f"assistant: {response}"])


def score_from_values(a: float, b: float) -> float:
    """Pairwise verdict from two scalar scores: the higher wins; equal scores tie."""
    return 1.0 if a > b else 0.0 if a < b else 0.5


@dataclass(frozen=True)
class JudgeContext:
    """What a judge may need from the run it judges, beside its settings."""

    manifest: dict[str, Any]  # the run's manifest
    pairs: Any  # PairSource: a dimension's training pairs (judges that fit something on them)
    cache_dir: Path | None  # where a judge may keep its verdicts between runs
    trust_remote_code: bool = False


class Judge(ABC):
    """Subclasses set `name`, implement `compare` and `from_settings`; `prepare` loads or fits what they need, once.
    A judge is one module with one such class, registered by one `JudgeInfo` line in `registry.JUDGES` (or
    `registry.register`)."""

    name: str = "judge"

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: "JudgeSettings", context: JudgeContext) -> "Judge":
        """The judge as `eval.judge` configures it, checked against the run (JudgeUnavailable if it cannot judge
        this run); nothing loaded yet."""

    def prepare(self, dims: Sequence[str]) -> None:
        """Load models / fit heads for these dimensions before any comparison (errors surface early)."""

    @abstractmethod
    def compare(self, items: Sequence[Matchup]) -> list[float]:
        """One verdict per matchup (score of A: 1, 0.5, 0, or an average of verdicts)."""

    def describe(self) -> dict[str, Any]:
        """What went into the verdicts (settings, held-out accuracies); saved in the report. Never secrets."""
        return {"name": self.name}

    def close(self) -> None:
        """Free models and connections."""
