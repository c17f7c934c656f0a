"""The demo's at-a-glance report: every dimension's rule-judged score for the base model and after each stage,
and the places where a stage cost a dimension aligned before it."""

from __future__ import annotations

from typing import Any, Sequence

from ..console import Output

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
    """One row per model; each cell is the score, and its change from the row above."""
    out = []
    for i, row in enumerate(rows):
        cells = [row["model"] if i == 0 else f"after {row['stage']} {row['dim']}"]
        for d in dims:
            v = row["scores"][d]
            if i == 0:
                cells.append(f"{v:.2f}")
            else:
                delta = v - rows[i - 1]["scores"][d]
                cells.append(f"{v:.2f} ({delta:+.2f})" if abs(delta) > NOISE else f"{v:.2f}")
        out.append(cells)
    return out


def print_report(out: Output, rows: list[dict[str, Any]], dims: Sequence[str], n_prompts: int) -> None:
    out.table(f"rule-judged scores (share of {n_prompts} held-out demo prompts answered right; greedy decoding)",
              ["model", *dims], table_rows(rows, dims))
    found = costs(rows, dims)
    for c in found:
        out.info(f"stage {c['stage']} ({c['by']}) cost {c['dim']}: {c['before']:.2f} -> {c['after']:.2f}"
                 f" ({c['after'] - c['before']:+.2f})")
    if not found and len(rows) > 2:
        out.info("no stage lowered a dimension aligned before it")
