"""Pair ids, ties and duplicates, the seeded cap, the prompt-grouped train/eval split, and length statistics."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from spoctl.data import clean
from spoctl.data.formats import TextPair
from spoctl.data.sources import Where

W = Where("f.jsonl", "line", 1)


def pair(prompt="q", chosen="a", rejected="b"):
    return TextPair([{"role": "user", "content": prompt}], chosen, rejected, W)


def test_pair_id_is_a_content_hash():
    assert clean.pair_id(pair()) == clean.pair_id(TextPair([{"role": "user", "content": "q"}], "a", "b", Where("g", "record", 9)))
    assert len(clean.pair_id(pair())) == 64
    assert clean.pair_id(pair()) != clean.pair_id(pair(chosen="b", rejected="a"))
    assert clean.pair_id(pair()) != clean.pair_id(pair(prompt="q2"))


def test_ties_and_duplicates_are_removed_and_counted():
    dropped = Counter()
    kept = clean.remove_ties_and_duplicates([pair(), pair(chosen="x", rejected=" x\n"), pair(), pair(prompt="z")], dropped)
    assert [p.prompt[0]["content"] for _, p in kept] == ["q", "z"]
    assert [pid for pid, _ in kept] == [clean.pair_id(pair()), clean.pair_id(pair(prompt="z"))]
    assert dropped == {"tie": 1, "duplicate": 1}


def test_selection_order_is_file_order_or_a_seeded_permutation():
    ids = [f"id{i}" for i in range(50)]
    assert clean.selection_order(ids, None, 0) == list(range(50)) == clean.selection_order(ids, 50, 0)
    a, b, c = (clean.selection_order(ids, 10, seed) for seed in (0, 0, 1))
    assert a == b and sorted(a) == list(range(50)) and a != list(range(50)) and a[:10] != c[:10]
    # The order depends on the ids, not on their positions: a pair keeps its priority when the file is reordered.
    rev = list(reversed(ids))
    assert [rev[i] for i in clean.selection_order(rev, 10, 0)] == [ids[i] for i in a]


@pytest.mark.parametrize("n, frac, expected", [(0, 0.1, 0), (1, 0.5, 0), (2, 0.01, 1), (2, 0.99, 1), (10, 0.1, 1), (100, 0.1, 10), (1000, 0.25, 250)])
def test_eval_count(n, frac, expected):
    assert clean.eval_count(n, frac) == expected


def test_split_is_deterministic_stable_and_keeps_prompts_together():
    rows = [(f"p{i}", f"k{i // 2}") for i in range(40)]  # two pairs per prompt
    held = clean.split_ids(rows, 0.2, seed=3)
    assert held == clean.split_ids(rows, 0.2, seed=3)
    assert len(held) == 8
    groups = {k: {pid in held for pid, kk in rows if kk == k} for _, k in rows}
    assert all(len(sides) == 1 for sides in groups.values())
    # The split depends on the pairs and the seed, not on their order in the file.
    assert clean.split_ids(list(reversed(rows)), 0.2, seed=3) == held
    assert clean.split_ids(rows, 0.2, seed=4) != held


def test_split_never_empties_train_and_handles_one_prompt():
    rows = [("a", "k1"), ("b", "k1"), ("c", "k1"), ("d", "k2")]
    held = clean.split_ids(rows, 0.9, seed=0)
    assert held and len(held) < 4
    one_prompt = [(f"p{i}", "same") for i in range(10)]
    assert len(clean.split_ids(one_prompt, 0.2, seed=0)) == 2
    assert clean.split_ids([("only", "k")], 0.5, seed=0) == set()


def test_length_stats_match_numpy():
    values = [5, 1, 9, 3, 7, 2, 8, 100]
    s = clean.length_stats(values)
    assert s["min"] == 1 and s["max"] == 100
    assert s["mean"] == pytest.approx(np.mean(values), abs=0.01)
    assert s["median"] == pytest.approx(np.median(values))
    assert s["p95"] == pytest.approx(np.percentile(values, 95), abs=0.01)
    assert clean.length_stats([])["max"] == 0
