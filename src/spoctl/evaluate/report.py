"""Writing what `spoctl eval` found: report.json (everything), report.md, the PNG plot, generated samples
(JSON lines and alpaca_eval's list of {instruction, output, generator}), and the terminal tables.

Every file is written atomically, so a report that exists is whole -- including a partial report written when
an evaluation stopped half-way (its "complete" is false and "error" says why).
"""

from __future__ import annotations

import json
from typing import Any

from ..console import Output, percent
from ..fsutil import write_json_atomic, write_text_atomic
from ..rundir import EvalFiles


def _label(row: dict[str, Any]) -> str:
    return "base" if row["k"] == 0 else f"{row['k']} {row['model']}"


def scorecard_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows: models; cells: accuracy of log(pi_k / pi_0) (and, for k >= 1, of stage k's implicit reward)."""
    dims = report["dims"]
    rows = []
    for r in report.get("scorecard") or []:
        cells = []
        for d in dims:
            c = r["dims"][d]
            cells.append(f"logp {percent(c['logp']['accuracy'])}" if r["k"] == 0 else
                         f"{percent(c['vs_base']['accuracy'])} (r {percent(c['implicit_reward']['accuracy'])})")
        rows.append([_label(r), *cells])
    return ["model", *dims], rows


def winrate_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows: stages; cells: win rate vs base, its interval, wins/ties/losses. Each dimension's header says on how
    many prompts (what was generated: fewer than --num-prompts when its eval split has fewer)."""
    dims = report["dims"]
    rows = []
    for r in report.get("win_rates") or []:
        rows.append([_label(r), *(f"{percent(c['win_rate'])} [{percent(c['ci_low'])}, {percent(c['ci_high'])}]"
                                  f" {c['wins']}/{c['ties']}/{c['losses']}" for c in (r["dims"][d] for d in dims))])
    first = (report.get("win_rates") or [{"dims": {}}])[0]["dims"]
    return ["stage vs base", *(f"{d} ({first[d]['n']} prompts)" if d in first else d for d in dims)], rows


def calibration_table(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per dimension: the judge's agreement with human pairs, and its own held-out accuracy when it has one."""
    judge = report.get("judge") or {}
    cal = judge.get("calibration") or {}
    own = judge.get("dims") or {}  # the embedding judge's per-dimension head info
    cols = ["dim", "agreement", "pairs"] + (["head held-out accuracy"] if own else [])
    rows = [[d, percent(v["agreement"]), v["pairs"], *([percent((own.get(d) or {}).get("heldout_accuracy"))] if own else [])]
            for d, v in cal.items()]
    return cols, rows


def print_tables(report: dict[str, Any], out: Output) -> None:
    cols, rows = scorecard_table(report)
    if rows:
        out.table("scorecard: accuracy of log(pi_k/pi_0) on each dimension's eval pairs (r: stage k's implicit reward)",
                  cols, rows)
    cols, rows = winrate_table(report)
    if rows:
        out.table(f"judged win rate vs base ({report['judge']['name']}), 95% Wilson interval, wins/ties/losses",
                  cols, rows)
    cols, rows = calibration_table(report)
    if rows:
        out.table("judge agreement with the held-out human preferences", cols, rows)
    gate = report.get("gate")
    if gate and gate.get("checks"):
        out.info(f"gate ({gate['score']}): " + ("passed" if gate["passed"] else f"FAILED: {gate['reason']}")
                 + (" (on the completed stages of an unfinished run: --allow-incomplete)"
                    if gate.get("incomplete_allowed") else ""))


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# spoctl eval: {report['run_dir']}", "",
             f"- created: {report['created']}  ", f"- complete: {report['complete']}  "]
    if report.get("error"):
        lines.append(f"- stopped: {report['error']}  ")
    for w in report.get("warnings") or []:
        lines.append(f"- warning: {w}  ")
    lines.append("")

    def table(cols: list[str], rows: list[list[str]]) -> None:
        lines.extend(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)])
        lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        lines.append("")

    cols, rows = scorecard_table(report)
    if rows:
        lines += ["## Implicit-reward scorecard", "",
                  "Accuracy of log(pi_k / pi_0) on each dimension's held-out pairs (the forgetting matrix); in"
                  " brackets, r = accuracy of stage k's implicit reward (the method's per-dimension reward). The base row shows the"
                  " base model's own likelihood preference.", ""]
        table(cols, rows)
    cols, rows = winrate_table(report)
    if rows:
        j = report["judge"]
        lines += [f"## Judged win rates vs the base model ({j['name']})", "",
                  "Win rate = (wins + ties/2) / n, with a 95% Wilson score interval; then wins/ties/losses.", ""]
        table(cols, rows)
        cols, rows = calibration_table(report)
        if rows:
            lines += ["### Judge calibration", "",
                      "Agreement of the judge with the held-out human preferences (chosen vs rejected), ties"
                      " counting half; for the embedding judge also its accuracy on the whole eval split.", ""]
            table(cols, rows)
    gate = report.get("gate")
    if gate and gate.get("checks"):
        lines += ["## Gate", "", f"Score checked: {gate['score']}. " +
                  ("Passed." if gate["passed"] else f"**Failed**: {gate['reason']}") +
                  (" The run is not finished; its completed stages were gated (`--allow-incomplete`)."
                   if gate.get("incomplete_allowed") else ""), ""]
        table(["check", "dim", "bound", "value", "passed"],
              [[c["kind"], c["dim"] or "-", "-" if c["bound"] is None else f"{c['bound']:g}",
                "-" if c["value"] is None else f"{c['value']:.4f}", c["passed"]] for c in gate["checks"]])
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Any) -> bool:
    """Every dimension's score across the models: scorecard accuracy, and win rate with its interval when judged.
    Returns False (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sc = report.get("scorecard") or []
    wr = report.get("win_rates") or []
    panels = 1 + bool(wr)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    xs = [_label(r) for r in sc]
    for d in report["dims"]:
        ys = [r["dims"][d]["vs_base"]["accuracy"] if r["k"] else 0.5 for r in sc]
        ax.plot(xs, ys, marker="o", label=d)
    ax.set_title("accuracy of log(pi_k/pi_0) (base drawn at 0.5)")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend()
    if wr:
        ax = axes[0][1]
        xs = [_label(r) for r in wr]
        for d in report["dims"]:
            c = [r["dims"][d] for r in wr]
            ys = [x["win_rate"] for x in c]
            err = [[y - x["ci_low"] for y, x in zip(ys, c)], [x["ci_high"] - y for y, x in zip(ys, c)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=d)
        ax.set_title(f"win rate vs base ({report['judge']['name']}), 95% CI")
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.legend()
    save_figure(fig, path)
    return True


def save_figure(fig: Any, path: Any) -> None:
    """Write a matplotlib figure as a PNG atomically (a temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_samples(files: EvalFiles, samples: list[dict[str, Any]], run_name: str) -> None:
    write_text_atomic(files.samples_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    alpaca = [{"instruction": s["prompt"], "output": s["response"], "generator": f"{run_name}/{s['model']}",
               "dataset": s["dim"]} for s in samples]
    write_json_atomic(files.alpaca_path, alpaca)


def write_judge_settings(files: EvalFiles, judge: dict[str, Any], generation: dict[str, Any]) -> None:
    """judge.json: how the evaluation's responses were made and judged, beside them."""
    write_json_atomic(files.judge_settings_path, {"judge": judge, "generation": generation})


def write_report(files: EvalFiles, report: dict[str, Any], *, with_plot: bool) -> None:
    """report.json, report.md and (when asked and possible) the plot; the paths are recorded in the report."""
    paths = {"report": str(files.report_path), "markdown": str(files.markdown_path)}
    if report.get("samples_written"):
        paths.update(samples=str(files.samples_path), alpaca=str(files.alpaca_path),
                     judge=str(files.judge_settings_path))
    if with_plot and report.get("scorecard") and plot(report, files.plot_path):
        paths["plot"] = str(files.plot_path)
    report["files"] = paths
    write_text_atomic(files.markdown_path, markdown(report))
    write_json_atomic(files.report_path, report)
