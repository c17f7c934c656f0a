"""The SPO study on the built-in demo task: does SPO keep an earlier dimension better than sequential DPO?

    python study/run_study.py                 # 3 seeds, ~4 minutes on 2 CPU cores (base models included); runs/study/sft0.2/
    python study/run_study.py --sft-weight 0  # pure DPO/SPO losses, no NLL term; writes runs/study/sft0/
    python study/run_study.py --docs          # also writes docs/study-results-sft0.2.md and docs/study-pareto-sft0.2.png
    python study/run_study.py --seeds 0       # one seed, a quick look

For each seed (the demo task's seed: its base model, prompt split and pairs) and each order of (helpful, harmless):
  - SPO at alpha 0 (= sequential DPO), 0.5, 1 and 2: two stages, the demo's align settings (docs/demo.md);
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
    return {"name": name, "seconds": round(time.perf_counter() - t, 1),
            "models": [{"model": r["model"], "scores": r["scores"], "expected": r["expected"],
                        # the part of helpfulness that does not conflict with harmlessness: right answers to benign
                        # questions (on harmful prompts helpful = comply = not harmless)
                        "benign_helpful": statistics.mean(
                            task.rule_score("helpful", held_out[i], r["responses"][i]) for i in benign)}
                       for r in rows]}


def run_seed(seed: int, root: Path, home: Path, out: Output, alphas: tuple[float, ...] = ALPHAS,
             extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
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


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Pareto-style plot: final helpful vs harmless, one marker per method and order, seeds as small points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    styles = {"SPO alpha=0": "tab:red", "SPO alpha=0.5": "tab:orange", "SPO alpha=1": "tab:green",
              "SPO alpha=2": "tab:purple", "DPO mixed": "tab:blue"}
    markers = {("helpful", "harmless"): "o", ("harmless", "helpful"): "s", ("mixed",): "D"}
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], tuple(r["order"])), []).append(r)
    panels = [("scores", "helpful", "greedy answers"), ("expected", "helpful", "expected over candidates"),
              ("scores", "benign_helpful", "greedy answers, helpful on benign prompts only")]
    for ax, (key, xname, title) in zip(axes, panels):
        _panel(ax, groups, key, xname, title, styles, markers)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panel(ax: Any, groups: dict, key: str, xname: str, title: str, styles: dict, markers: dict) -> None:
    """One scatter: x = final `xname` (helpful, or helpful on benign prompts), y = final harmless, both from `key`."""
    def x(m: dict[str, Any]) -> float:
        return m["benign_helpful"] if xname == "benign_helpful" else m[key]["helpful"]

    base = [r["models"][0] for rs in groups.values() for r in rs]
    ax.scatter([statistics.mean(x(b) for b in base)], [statistics.mean(b[key]["harmless"] for b in base)],
               marker="*", s=250, color="black", label="base model", zorder=3)
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
        results += run_seed(seed, root, args.out / "assets", out, tuple(float(a) for a in args.alphas.split(",")), extra)
    settings = {**DEMO_ALIGN, **extra}
    (root / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    table = "\n".join(summarize(results, key) for key in METRICS)
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
