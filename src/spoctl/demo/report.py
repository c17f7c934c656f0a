"""The demo's at-a-glance report: every dimension's rule-judged score for the base model and after each stage,
and the places where a stage cost a dimension aligned before it."""

from __future__ import annotations

from typing import Any, Sequence

from ..console import Output, percent, points

# A drop smaller than one held-out prompt's worth is noise in greedy decoding, not a cost.
NOISE = 1e-9


def costs(rows: list[dict[str, Any]], dims: Sequence[str]) -> list[dict[str, Any]]:
    """For each stage, each dimension aligned at an EARLIER stage whose score went down: {stage, by, dim, before,
    after}. `rows` are score_run's rows (base first, then stage 1, 2, ...)."""
    found = []
    aligned: list[str] = []
    for prev, row in zip(rows, rows[1:]):
        for d in aligned:
            if d in dims and row["scores"][d] < prev["scores"][d] - NOISE:
                found.append({"stage": row["stage"], "by": row["dim"], "dim": d, "before": prev["scores"][d],
                              "after": row["scores"][d]})
        aligned.append(row["dim"])
    return found


def table_rows(rows: list[dict[str, Any]], dims: Sequence[str]) -> list[list[str]]:
    """One row per model; each cell is the score, and its change from the row above in percentage points."""
    out = []
    for i, row in enumerate(rows):
        cells = [row["model"] if i == 0 else f"after {row['stage']} {row['dim']}"]
        for d in dims:
            v = row["scores"][d]
            delta = v - rows[i - 1]["scores"][d] if i else 0.0
            cells.append(f"{percent(v)} ({points(delta)})" if abs(delta) > NOISE else percent(v))
        out.append(cells)
    return out


def disagreements(rows: list[dict[str, Any]], win_rates: list[dict[str, Any]],
                  dims: Sequence[str]) -> list[dict[str, Any]]:
    """Stage and dimension where the rule-judged score and the judged win rate (both against the base model) point
    different ways: {stage, model, dim, change, win_rate, n}. `win_rates`: an eval report's rows (stage k >= 1)."""
    def sign(x: float) -> int:
        return 0 if abs(x) <= NOISE else (1 if x > 0 else -1)

    found = []
    for w in win_rates:
        row = next((r for r in rows[1:] if r["stage"] == w["k"]), None)
        for d in dims:
            cell = w["dims"].get(d)
            if row is None or not cell or not cell.get("n"):
                continue
            change = row["scores"][d] - rows[0]["scores"][d]
            if sign(change) != sign(cell["win_rate"] - 0.5):
                found.append({"stage": w["k"], "model": row["dim"], "dim": d, "change": change,
                              "win_rate": cell["win_rate"], "n": cell["n"]})
    return found


def print_report(out: Output, rows: list[dict[str, Any]], dims: Sequence[str], n_prompts: int,
                 win_rates: list[dict[str, Any]] | None = None) -> None:
    """The rule-judged table and the costs it shows; with the eval's `win_rates` (its judged table, printed
    before), a note on every cell where the two tables disagree, and why they can."""
    out.table(f"rule-judged scores (share of {n_prompts} held-out demo prompts answered right; greedy decoding;"
              " change from the row above in percentage points)", ["model", *dims], table_rows(rows, dims))
    found = costs(rows, dims)
    for c in found:
        out.info(f"stage {c['stage']} ({c['by']}) cost {c['dim']}: {percent(c['before'])} -> {percent(c['after'])}"
                 f" ({points(c['after'] - c['before'])})")
    if not found and len(rows) > 2:
        out.info("no stage lowered a dimension aligned before it")
    differ = disagreements(rows, win_rates or [], dims)
    if differ:
        cells = "; ".join(f"after {x['stage']} {x['model']}, {x['dim']}: rule score {points(x['change'])} vs base,"
                          f" win rate vs base {percent(x['win_rate'])} on {x['n']} prompts" for x in differ)
        out.info(f"note: the judged win rates above and this table disagree on {cells}. They measure different"
                 f" things: a win rate compares each stage's answer with the base model's on the same prompt (ties"
                 f" count half), on a few prompts of that dimension's eval split; this table is the share of all"
                 f" {n_prompts} held-out demo prompts, the same for every dimension, answered right. On so few"
                 " prompts one answer moves a win rate by several points (see its interval).")
