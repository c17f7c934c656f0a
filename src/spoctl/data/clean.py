"""Pair identity, removal of ties and duplicates, the seeded cap and train/eval split, and length statistics.

Selection is by a seeded hash of each pair's id rather than by shuffling positions, so it is deterministic for a
seed and stable: adding or removing other pairs does not move a pair between train and eval.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Sequence, TypeVar

from .formats import TextPair

T = TypeVar("T")


def pair_id(pair: TextPair) -> str:
    """sha256 of the raw prompt messages, chosen and rejected text (the system prompt is not part of the data)."""
    payload = json.dumps([pair.prompt, pair.chosen, pair.rejected], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def remove_ties_and_duplicates(pairs: Sequence[TextPair], dropped: Counter) -> list[tuple[str, TextPair]]:
    """(pair_id, pair) for each pair kept; ties (same text up to surrounding whitespace) and repeats are counted."""
    seen: set[str] = set()
    kept = []
    for p in pairs:
        if p.chosen.strip() == p.rejected.strip():
            dropped["tie"] += 1
            continue
        pid = pair_id(p)
        if pid in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(pid)
        kept.append((pid, p))
    return kept


def rank(seed: int, purpose: str, pid: str) -> str:
    return hashlib.sha256(f"{seed}:{purpose}:{pid}".encode()).hexdigest()


def selection_order(ids: Sequence[str], max_pairs: int | None, seed: int) -> list[int]:
    """Indices in the order pairs are considered: file order, or with a cap a seeded order.

    With a cap, the first `max_pairs` pairs that survive the length policy are kept, which is a seeded sample of all
    survivors; the rest need never be tokenized.
    """
    if max_pairs is None or len(ids) <= max_pairs:
        return list(range(len(ids)))
    return sorted(range(len(ids)), key=lambda i: rank(seed, "cap", ids[i]))


def eval_count(n: int, fraction: float) -> int:
    """Pairs held out: round(n * fraction), but at least one eval and one train pair when there are two or more."""
    if n < 2:
        return 0
    return min(max(1, round(n * fraction)), n - 1)


def prompt_key(pair: TextPair) -> str:
    """sha256 of the raw prompt messages: pairs with the same key share a prompt."""
    return hashlib.sha256(json.dumps(pair.prompt, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def split_ids(rows: Sequence[tuple[str, str]], fraction: float, seed: int) -> set[str]:
    """The pair ids that go to eval, from (pair_id, prompt_key) rows.

    Whole prompts are held out, so no eval prompt is seen in training; the rank depends only on the prompt and the
    seed, so dimensions built from one file (PKU-SafeRLHF) hold out the same prompts. With a single prompt,
    pairs are split individually instead.
    """
    target = eval_count(len(rows), fraction)
    groups: dict[str, list[str]] = {}
    for pid, key in rows:
        groups.setdefault(key, []).append(pid)
    if len(groups) < 2:
        return set(sorted((pid for pid, _ in rows), key=lambda i: rank(seed, "eval", i))[:target])
    held: set[str] = set()
    for key in sorted(groups, key=lambda k: rank(seed, "eval", k)):
        if len(held) >= target:
            break
        if len(held) + len(groups[key]) < len(rows):  # never leave train empty
            held.update(groups[key])
    return held


def length_stats(values: Sequence[int]) -> dict[str, float]:
    """min, mean, median, p95, max of token lengths (linear-interpolated percentiles, like numpy's default)."""
    if not values:
        return {"min": 0, "mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0}
    s = sorted(values)

    def pct(q: float) -> float:
        pos = (len(s) - 1) * q
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {
        "min": s[0],
        "mean": round(sum(s) / len(s), 2),
        "median": round(pct(0.5), 2),
        "p95": round(pct(0.95), 2),
        "max": s[-1],
    }
