"""Step 2 of prepare: one dimension's pairs -> cleaned, tokenized, length-fitted, capped and split rows."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..config import PrepareConfig
from ..console import Output
from ..errors import InputError
from . import clean
from .formats import Message, TextPair
from .reading import Sourced
from .render import Fitted, Renderer, fit_length
from .store import TOKEN_COLUMNS, split_hash
from .truncate import fit_prompt

TOKENIZE_CHUNK = 512
LENGTH_DROPS = ("prompt_too_long", "too_long", "tie_after_truncation")


@dataclass
class Row:
    """A kept pair: its id, the raw pair, the token ids after the length policy, and the prompt messages they render."""

    pid: str
    pair: TextPair
    fitted: Fitted
    messages: list[Message]


@dataclass
class Built:
    """One finished dimension: its rows per split and its manifest entry."""

    dim: str
    splits: dict[str, dict[str, list]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cuts:
    """What the length policy cut in one dimension (the manifest's counts.truncation)."""

    prompts: int = 0  # pairs whose prompt was shortened
    turns_dropped: int = 0  # whole turns removed from the start of prompts (keep-system-and-recent)
    messages_cut: int = 0  # last user messages whose start was cut (keep-system-and-recent)
    responses: int = 0  # pairs whose responses were cut to fit max_length

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def fit_pair(pair: TextPair, prompt: list[int], chosen: list[int], rejected: list[int], renderer: Renderer,
             cfg: PrepareConfig, cuts: Cuts) -> tuple[Fitted, list[Message]]:
    """Apply the length policy to one tokenized pair, counting what was cut."""
    policy = cfg.length
    messages = renderer.messages(pair.prompt)
    limit = policy.max_prompt_tokens
    fit = None
    if len(prompt) > limit and policy.overflow == "truncate" and policy.prompt_truncation == "keep-system-and-recent":
        fit = fit_prompt(renderer, messages, pair.where, limit)
        if fit.drop:
            return Fitted(prompt, chosen, rejected, drop=fit.drop), messages
        prompt, messages = fit.ids, fit.messages
    long_prompt = len(prompt) > limit  # keep-end: fit_length cuts it
    fitted = fit_length(prompt, chosen, rejected, policy)
    if fitted.drop is None:
        cuts.prompts += fit is not None or long_prompt
        cuts.turns_dropped += fit.turns_dropped if fit else 0
        cuts.messages_cut += fit.message_cut if fit else 0
        cuts.responses += (len(fitted.chosen), len(fitted.rejected)) != (len(chosen), len(rejected))
        fitted.truncated = fitted.truncated or fit is not None
    return fitted, messages


def build_dim(dim: str, s: Sourced, renderer: Renderer, cfg: PrepareConfig, out: Output) -> Built:
    """Clean, tokenize, apply the length policy, cap and split one dimension."""
    dropped = Counter(s.pairs.dropped)
    kept = clean.remove_ties_and_duplicates(s.pairs.pairs, dropped)
    order = clean.selection_order([pid for pid, _ in kept], cfg.max_pairs, cfg.seed)
    limit = cfg.max_pairs or len(kept)
    cuts = Cuts()
    rows: list[tuple[int, Row]] = []
    # Tokenize in chunks and stop once the cap is met: with --max-pairs only what is needed gets tokenized.
    for start in range(0, len(order), TOKENIZE_CHUNK):
        if len(rows) >= limit:
            break
        chunk = [(i, *kept[i]) for i in order[start : start + TOKENIZE_CHUNK]]
        chunk_pairs = [pair for _, _, pair in chunk]
        prompt_ids = renderer.prompt_ids(chunk_pairs)
        chosen_ids = renderer.completion_ids([p.chosen for p in chunk_pairs])
        rejected_ids = renderer.completion_ids([p.rejected for p in chunk_pairs])
        for (i, pid, pair), p, c, r in zip(chunk, prompt_ids, chosen_ids, rejected_ids):
            if len(rows) >= limit:
                break
            fitted, messages = fit_pair(pair, p, c, r, renderer, cfg, cuts)
            if fitted.drop:
                dropped[fitted.drop] += 1
            else:
                rows.append((i, Row(pid, pair, fitted, messages)))
    capped = len(kept) - len(rows) - sum(dropped[r] for r in LENGTH_DROPS)
    if capped:
        dropped["max_pairs"] += capped
    ordered = [row for _, row in sorted(rows, key=lambda item: item[0])]  # back to file order
    if not ordered:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())) or "none"
        raise InputError(
            f"dimension '{dim}' would keep no pairs ({s.pairs.candidates} candidates; dropped: {reasons});"
            " check the format and the length limits (--max-length, --max-prompt-tokens, --overflow)",
            path=s.source.location,
        )
    eval_ids = clean.split_ids([(r.pid, clean.prompt_key(r.pair)) for r in ordered], cfg.eval_fraction, cfg.seed)
    if not eval_ids:
        out.warn(f"{dim}: only {len(ordered)} pair, so no eval pair is held out")

    built = Built(dim)
    for name in ("train", "eval"):
        built.splits[name] = columns([r for r in ordered if (r.pid in eval_ids) == (name == "eval")], renderer)
    built.info = manifest_entry(dim, s, ordered, dropped, cuts, len(eval_ids), built.splits)
    return built


def manifest_entry(dim: str, s: Sourced, rows: list[Row], dropped: Counter, cuts: Cuts, n_eval: int,
                   splits: dict[str, dict[str, list]]) -> dict[str, Any]:
    fitted = [r.fitted for r in rows]
    return {
        "source": s.source.location,
        "source_kind": s.source.kind,
        "source_options": s.source.spec.model_dump(exclude_defaults=True, exclude={"source"}),
        "data_key": s.label,
        "format": s.fmt,
        "counts": {
            "read": s.records,
            "candidates": s.pairs.candidates,
            "kept": len(rows),
            "train": len(rows) - n_eval,
            "eval": n_eval,
            "dropped": dict(sorted(dropped.items())),
            "truncated": sum(f.truncated for f in fitted),
            "truncation": cuts.as_dict(),
        },
        "tokens": {
            "prompt": clean.length_stats([len(f.prompt) for f in fitted]),
            "chosen": clean.length_stats([len(f.chosen) for f in fitted]),
            "rejected": clean.length_stats([len(f.rejected) for f in fitted]),
            "total": clean.length_stats([len(f.prompt) + max(len(f.chosen), len(f.rejected)) for f in fitted]),
        },
        "hashes": {
            "source": s.source_hash,
            **{name: split_hash(*(cols[c] for c in ("pair_id", *TOKEN_COLUMNS))) for name, cols in splits.items()},
        },
        "source_complete": s.complete,
        "paths": {name: f"{dim}/{name}" for name in ("train", "eval")},
    }


def columns(rows: list[Row], renderer: Renderer) -> dict[str, list]:
    """The split's columns (see store.COLUMNS), rows in source order."""
    return {
        "pair_id": [r.pid for r in rows],
        "prompt_input_ids": [r.fitted.prompt for r in rows],
        "chosen_input_ids": [r.fitted.chosen for r in rows],
        "rejected_input_ids": [r.fitted.rejected for r in rows],
        "prompt": [renderer.decode(r.fitted.prompt) for r in rows],
        "chosen": [r.pair.chosen for r in rows],
        "rejected": [r.pair.rejected for r in rows],
        "prompt_messages": [json.dumps(r.messages, ensure_ascii=False) for r in rows],
    }
