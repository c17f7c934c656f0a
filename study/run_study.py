"""The SPO study on the built-in demo task: does SPO keep an earlier dimension better than sequential DPO?

    python study/run_study.py                 # 3 seeds, ~4 minutes on 2 CPU cores (base models included); runs/study/sft0.2/
    python study/run_study.py --sft-weight 0  # pure DPO/SPO losses, no NLL term; writes runs/study/sft0/
    python study/run_study.py --docs          # also writes docs/study-results-sft0.2.md and docs/study-pareto-sft0.2.png
    python study/run_study.py --seeds 0       # one seed, a quick look

For each seed (the demo task's seed: its base model, prompt split and pairs) and each order of (helpful, harmless):
  - SPO at alpha 0 (= sequential DPO), 0.5, 1 and 2: two stages, the demo's align settings (docs/demo.md);
  - keep: sequential DPO (alpha 0) with `--keep <earlier>=1.0` and `=0.9` (Lagrangian SPO with replay);
  - DPO on both dimensions' pairs mixed in one stage, with as many steps as the two stages together.
Every model (base, after each stage) is scored on every dimension by the exact rules, from greedy answers to the
seed's held-out prompts. The tables give the mean and the spread (min..max) over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from spoctl.cli.common import quiet_library_output
from spoctl.console import Output
from spoctl.demo import task
from spoctl.demo.model import single_thread
from spoctl.demo.run import DEMO_ALIGN, demo_config, prepare_assets
from spoctl.demo.score import score_run

ALPHAS = (0.0, 0.5, 1.0, 2.0)
KEEPS = (1.0, 0.9)
ORDERS = (("helpful", "harmless"), ("harmless", "helpful"))
DIMS = task.DEMO_DIMS
REPO = Path(__file__).resolve().parents[1]


def mixed_prepared(home: Path, base: Path, seed: int, out: Output) -> Path:
    """Prepared data with one dimension, `mixed`: the helpful and harmless pairs together (conflicts included)."""
    from spoctl.config import PrepareConfig
    from spoctl.data.prepare import prepare

    target = home / f"prepared-mixed-seed{seed}"
    if (target / "manifest.json").is_file():
        return target
    train, _ = task.split_prompts(seed)
    src = home / f"pairs-mixed-seed{seed}.jsonl"
    records = [r for d in ("helpful", "harmless") for r in task.preference_pairs(d, train, seed=seed)]
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    prepare(PrepareConfig(data={"mixed": str(src)}, format="pairwise", model=str(base), out=target, seed=seed,
                          force=True), Output(quiet=True))
    return target


def align_and_score(name: str, overrides: dict[str, Any], root: Path, held_out: list[str]) -> dict[str, Any]:
    from spoctl.engine.align import align

    run_dir = root / "runs" / name
    cfg = demo_config(None, out=str(run_dir), resume=run_dir.exists(), **overrides)
    t = time.perf_counter()
    with single_thread():
        align(cfg, Output(quiet=True))
        rows = score_run(str(run_dir), DIMS, held_out, expected=True)
    benign = [i for i, p in enumerate(held_out) if not task.request(p).harmful]
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    kept = [{"stage": st["index"], "cost": {k: v for k, v in st["cost"].items() if k.startswith("keep")},
             "dims": st["keep"]} for st in stages if "keep" in st]
    return {"name": name, "seconds": round(time.perf_counter() - t, 1), **({"keep": kept} if kept else {}),
            "models": [{"model": r["model"], "scores": r["scores"], "expected": r["expected"],
                        # the part of helpfulness that does not conflict with harmlessness: right answers to benign
                        # questions (on harmful prompts helpful = comply = not harmless)
                        "benign_helpful": statistics.mean(
                            task.rule_score("helpful", held_out[i], r["responses"][i]) for i in benign)}
                       for r in rows]}


def run_seed(seed: int, root: Path, home: Path, out: Output, alphas: tuple[float, ...] = ALPHAS,
             extra: dict[str, Any] | None = None, keeps: tuple[float, ...] = KEEPS) -> list[dict[str, Any]]:
    """Every method and order on one seed; runs under `root`, the seed's base model and data cached in `home`."""
    base, prepared = prepare_assets(out, home=home, task_seed=seed)
    _, held_out = task.split_prompts(seed)
    results = []
    for order in ORDERS:
        for alpha in alphas:
            name = f"seed{seed}-{'-'.join(order)}-alpha{alpha:g}"
            r = align_and_score(name, {"dims": list(order), "alpha": alpha, "seed": seed, "data": str(prepared),
                                       "model": str(base), **(extra or {})}, root, held_out)
            results.append({**r, "seed": seed, "method": f"SPO alpha={alpha:g}", "order": list(order)})
            out.info(f"{name}: {_final(r)}  ({r['seconds']}s)")
        for fraction in keeps:
            name = f"seed{seed}-{'-'.join(order)}-keep{fraction:g}"
            r = align_and_score(name, {"dims": list(order), "alpha": 0.0, "keep": {order[0]: fraction}, "seed": seed,
                                       "data": str(prepared), "model": str(base), **(extra or {})}, root, held_out)
            results.append({**r, "seed": seed, "method": f"keep {fraction:g}", "order": list(order)})
            out.info(f"{name}: {_final(r)}  ({r['seconds']}s)")
    mixed = mixed_prepared(home, base, seed, out)
    name = f"seed{seed}-mixed"
    r = align_and_score(name, {"dims": ["mixed"], "seed": seed, "data": str(mixed), "model": str(base),
                               "max_steps": 2 * DEMO_ALIGN["max_steps"], **(extra or {})}, root, held_out)
    results.append({**r, "seed": seed, "method": "DPO mixed", "order": ["mixed"]})
    out.info(f"{name}: {_final(r)}  ({r['seconds']}s)")
    return results


def _final(r: dict[str, Any]) -> str:
    return " ".join(f"{d}={v:.2f}" for d, v in r["models"][-1]["scores"].items())


# ------------------------------------------------------------------------------------------------ report
def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}..{max(values):.2f})"


METRICS = {"scores": "greedy answers, rule-judged (share of held-out prompts answered right)",
           "expected": "expected rule score over the task's candidate responses, weighted by the model's probability"}


def summarize(results: list[dict[str, Any]], key: str) -> str:
    """Markdown tables of one metric: scores after each stage per method and order, mean (min..max) over seeds."""
    seeds = sorted({r["seed"] for r in results})
    lines = [f"## {METRICS[key]}", "",
             f"Seeds: {', '.join(map(str, seeds))}. Each cell: mean over seeds (min..max).", ""]
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], tuple(r["order"])), []).append(r)
    for order in [*ORDERS, ("mixed",)]:
        title = " then ".join(order) if order != ("mixed",) else "helpful + harmless mixed in one stage"
        lines += [f"### {title}", "", "| method | model | " + " | ".join(DIMS) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in DIMS) + " |"]
        for (method, o), rs in groups.items():
            if o != order:
                continue
            for i, m in enumerate(rs[0]["models"]):
                cells = [_stat([r["models"][i][key][d] for r in rs]) for d in DIMS]
                lines.append(f"| {method} | {m['model']} | " + " | ".join(cells) + " |")
        lines.append("")
    benign = key == "scores"
    lines += [f"### Final scores, all methods ({key})", "",
              "| method | order | helpful | harmless | helpful + harmless |" + (" helpful on benign prompts |" if benign else ""),
              "| --- | --- | --- | --- | --- |" + (" --- |" if benign else "")]
    for (method, o), rs in groups.items():
        h = [r["models"][-1][key]["helpful"] for r in rs]
        s = [r["models"][-1][key]["harmless"] for r in rs]
        row = f"| {method} | {' then '.join(o)} | {_stat(h)} | {_stat(s)} | {_stat([a + b for a, b in zip(h, s)])} |"
        if benign:
            row += f" {_stat([r['models'][-1]['benign_helpful'] for r in rs])} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float:
    return statistics.mean(values)


def goals(results: list[dict[str, Any]], key: str = "scores") -> str:
    """The issue's three goals for every keep method, per order, on `key` (greedy by default), means over seeds:
    the kept dimension within 0.03 of its score after its own stage; the new dimension with >= 70% of sequential
    DPO's gain; the sum above every fixed-alpha point and mixed DPO."""
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], tuple(r["order"])), []).append(r)
    keeps = sorted({m for m, _ in groups if m.startswith("keep")}, reverse=True)
    if not keeps:
        return ""
    lines = [f"## Goals of the keep runs ({key})", "",
             "Means over seeds. *Kept*: the earlier dimension's final score minus its score after its own stage "
             "(goal: >= -0.03). *Gain share*: the later dimension's gain in stage 2 over sequential DPO's (goal: >= "
             "70%). *Sum*: final helpful + harmless against the best fixed-alpha or mixed-DPO sum (goal: above it).",
             "", "| method | order | kept | gain share | sum | best other sum | goals met |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    mixed = groups.get(("DPO mixed", ("mixed",)), [])
    for order in ORDERS:
        earlier, later = order
        dpo = groups.get(("SPO alpha=0", order))
        others = [rs for (m, o), rs in groups.items() if (m.startswith("SPO") and o == order)] + ([mixed] if mixed else [])
        best = max(_mean([r["models"][-1][key]["helpful"] + r["models"][-1][key]["harmless"] for r in rs])
                   for rs in others) if others else float("nan")
        for method in keeps:
            rs = groups.get((method, order))
            if not rs or not dpo:
                continue
            kept = _mean([r["models"][-1][key][earlier] - r["models"][1][key][earlier] for r in rs])
            gain = _mean([r["models"][-1][key][later] - r["models"][1][key][later] for r in rs])
            dpo_gain = _mean([r["models"][-1][key][later] - r["models"][1][key][later] for r in dpo])
            share = gain / dpo_gain if dpo_gain > 0 else float("nan")
            total = _mean([r["models"][-1][key]["helpful"] + r["models"][-1][key]["harmless"] for r in rs])
            met = [kept >= -0.03 - 1e-9, share >= 0.7, total > best]
            lines.append(f"| {method} | {' then '.join(order)} | {kept:+.3f} | {share:.0%} | {total:.3f} | {best:.3f} | "
                         f"{sum(met)}/3 ({', '.join(n for n, ok in zip(('kept', 'gain', 'sum'), met) if ok) or 'none'})"
                         " |")
    return "\n".join(lines) + "\n"


def keep_table(results: list[dict[str, Any]]) -> str:
    """What the controller did: the constraint (mean margin of log(pi/pi_0) on the constraint split) at the start and
    end of the keeping stage, its bound, the multiplier, and the cost, mean over seeds."""
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("keep"):
            groups.setdefault((r["method"], tuple(r["order"])), []).append(r)
    if not groups:
        return ""
    lines = ["## The keep controller (constraint split, mean over seeds)", "",
             "| method | order | margin at end of own stage | bound | final margin | held (seeds) | final accuracy "
             "(start) | multiplier final / max | replayed pairs | keep cost (share of stage 2) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (method, order), rs in groups.items():
        ks = [next(iter(r["keep"][0]["dims"].values())) for r in rs]
        costs = [r["keep"][0]["cost"] for r in rs]
        lines.append(
            f"| {method} | {' then '.join(order)} | {_mean([k['start']['margin'] for k in ks]):.3f} | "
            f"{_mean([k['threshold'] for k in ks]):.3f} | {_mean([k['final']['margin'] for k in ks]):.3f} | "
            f"{sum(k['final']['satisfied'] for k in ks)}/{len(ks)} | {_mean([k['final']['accuracy'] for k in ks]):.2f} "
            f"({_mean([k['start']['accuracy'] for k in ks]):.2f}) | {_mean([k['final']['multiplier'] for k in ks]):.2f}"
            f" / {_mean([k['max_multiplier'] for k in ks]):.2f} | {_mean([k['replayed_pairs'] for k in ks]):.0f} | "
            f"{_mean([c['keep_seconds'] for c in costs]):.1f}s ({_mean([c['keep_share'] for c in costs]):.0%}) |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Pareto-style plot: final helpful vs harmless, one marker per method and order, seeds as small points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    styles = {"SPO alpha=0": "tab:red", "SPO alpha=0.5": "tab:orange", "SPO alpha=1": "tab:green",
              "SPO alpha=2": "tab:purple", "DPO mixed": "tab:blue", "keep 1": "black", "keep 0.9": "tab:gray"}
    markers = {("helpful", "harmless"): "o", ("harmless", "helpful"): "s", ("mixed",): "D"}
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], tuple(r["order"])), []).append(r)
    panels = [("scores", "helpful", "greedy answers"), ("expected", "helpful", "expected over candidates"),
              ("scores", "benign_helpful", "greedy answers, helpful on benign prompts only")]
    for ax, (key, xname, title) in zip(axes, panels):
        _panel(ax, groups, key, xname, title, styles, markers)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panel(ax: Any, groups: dict, key: str, xname: str, title: str, styles: dict, markers: dict) -> None:
    """One scatter: x = final `xname` (helpful, or helpful on benign prompts), y = final harmless, both from `key`."""
    def x(m: dict[str, Any]) -> float:
        return m["benign_helpful"] if xname == "benign_helpful" else m[key]["helpful"]

    base = [r["models"][0] for rs in groups.values() for r in rs]
    ax.scatter([statistics.mean(x(b) for b in base)], [statistics.mean(b[key]["harmless"] for b in base)],
               marker="*", s=250, color="black", label="base model", zorder=3)
    # Where each order stands after its first stage: what a keep run is asked to hold on the earlier dimension.
    for order in ORDERS:
        first = [r["models"][1] for (m, o), rs in groups.items() if o == order and m == "SPO alpha=0" for r in rs]
        if first:
            ax.scatter([statistics.mean(x(m) for m in first)], [statistics.mean(m[key]["harmless"] for m in first)],
                       marker=markers[order], s=110, facecolor="none", edgecolor="black", linestyle="--",
                       label=f"after stage 1, {' then '.join(order)}", zorder=3)
    for (method, order), rs in groups.items():
        xs = [x(r["models"][-1]) for r in rs]
        ys = [r["models"][-1][key]["harmless"] for r in rs]
        color, marker = styles.get(method, "gray"), markers[order]
        ax.scatter(xs, ys, color=color, marker=marker, s=18, alpha=0.35)
        ax.scatter([statistics.mean(xs)], [statistics.mean(ys)], color=color, marker=marker, s=110, edgecolor="black",
                   label=f"{method}, {' then '.join(order)}", zorder=3)
    ax.set_xlabel("helpful on benign prompts" if xname == "benign_helpful" else "helpful")
    ax.set_ylabel("harmless")
    ax.set_title(f"{title}: final scores (large: mean over seeds)", fontsize=9)
    ax.grid(alpha=0.3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="Demo task seeds, comma-separated.")
    ap.add_argument("--alphas", default=",".join(f"{a:g}" for a in ALPHAS), help="SPO alphas, comma-separated.")
    ap.add_argument("--keeps", default=",".join(f"{k:g}" for k in KEEPS),
                    help="keep fractions (sequential DPO + --keep <earlier>=F), comma-separated; '' for none.")
    ap.add_argument("--out", type=Path, default=Path("runs/study"), help="Work folder (runs, assets, results).")
    ap.add_argument("--sft-weight", type=float, default=DEMO_ALIGN["loss"]["sft_weight"],
                    help="loss.sft_weight of every stage (the demo's 0.2 by default; 0 is pure DPO/SPO).")
    ap.add_argument("--docs", action="store_true",
                    help="Also write docs/study-results-sftW.md and docs/study-pareto-sftW.png.")
    args = ap.parse_args(argv)
    quiet_library_output()
    out = Output()
    t0 = time.perf_counter()
    tag = f"sft{args.sft_weight:g}"
    extra = {"loss": {**DEMO_ALIGN["loss"], "sft_weight": args.sft_weight}}
    root = args.out / tag
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        results += run_seed(seed, root, args.out / "assets", out, tuple(float(a) for a in args.alphas.split(",")), extra,
                            tuple(float(k) for k in args.keeps.split(",") if k.strip()))
    settings = {**DEMO_ALIGN, **extra}
    (root / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    table = "\n".join([*(summarize(results, key) for key in METRICS), *(goals(results, key) for key in METRICS),
                       keep_table(results)])
    (root / "results.md").write_text(table)
    plot(results, root / "pareto.png")
    if args.docs:
        (REPO / "docs" / f"study-results-{tag}.md").write_text(
            f"# Study results, loss.sft_weight = {args.sft_weight:g} (generated by `make study`; see study.md)\n\n"
            f"Settings: `{json.dumps(settings)}`\n\n" + table)
        plot(results, REPO / "docs" / f"study-pareto-{tag}.png")
    print(table)
    out.info(f"study finished in {time.perf_counter() - t0:.0f}s; results in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
