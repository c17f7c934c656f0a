"""The judges `spoctl eval --judge NAME[:ARG]` knows: the one list that the configuration's allowed values
(`config.JudgeSettings.name`), the `--judge` help and the error messages are derived from.

Only names, one-line descriptions and where each class lives are kept here -- no imports beyond the standard
library -- so that `spoctl.config` can read the names without importing torch. The class itself is imported
when a judge is made (`judge_class`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

AUTO = "auto"


@dataclass(frozen=True)
class JudgeInfo:
    name: str
    target: str  # "module:Class"; a module starting with "." is relative to spoctl.evaluate.judges
    summary: str  # one line: what compares the responses, and what it needs
    arg: str | None = None  # what ARG means in NAME:ARG, when the judge takes one

    @property
    def spec(self) -> str:
        """How the judge is named on the command line: `rules`, `openai:MODEL`."""
        return f"{self.name}:{self.arg}" if self.arg else self.name


JUDGES: dict[str, JudgeInfo] = {j.name: j for j in (
    JudgeInfo("rules", ".rules:RulesJudge",
              "the built-in demo task's exact rules (demo runs only)"),
    JudgeInfo("reward-model", ".reward_model:RewardModelJudge",
              "a sequence-classification reward model per dimension (--judge-model DIM=PATH)"),
    JudgeInfo("embedding", ".embedding:EmbeddingJudge",
              "MiniLM sentence embeddings with a linear head per dimension fitted on its train pairs (offline, noisy)"),
    JudgeInfo("openai", ".openai:OpenAIJudge",
              "an OpenAI-compatible chat-completions endpoint, both orders, a rubric per dimension (--judge-url)",
              arg="MODEL"),
)}
JUDGE_NAMES: tuple[str, ...] = tuple(JUDGES)  # the built-in ones


def register(info: JudgeInfo) -> None:
    """Add a judge (e.g. a plugin's, or a test's): `info.target` may name any importable module, absolute
    ("my_pkg.judges:MyJudge") or relative to this package (".rules:RulesJudge"). The configuration, the
    `--judge` choices and `make_judge` read `JUDGES`, so nothing else has to change."""
    if info.name in JUDGES or info.name == AUTO:
        raise ValueError(f"a judge named {info.name!r} is already registered")
    JUDGES[info.name] = info


def judge_class(name: str) -> Any:
    """The Judge subclass registered as `name` (imported now: most judges need torch)."""
    module, _, cls = JUDGES[name].target.partition(":")
    return getattr(importlib.import_module(module, __package__), cls)


def choices() -> str:
    """'rules | reward-model | embedding | openai:MODEL', for help and error messages."""
    return " | ".join(j.spec for j in JUDGES.values())


def help_text() -> str:
    """The --judge help: every judge with its one-line summary."""
    return "; ".join(f"{j.spec}: {j.summary}" for j in JUDGES.values()) + f"; {AUTO}: the best available for the run."
