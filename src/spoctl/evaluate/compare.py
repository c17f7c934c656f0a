"""`spoctl compare RUN RUN...`: several runs' models on the same held-out pairs -- did SPO, `--keep` or a
replay mix help over a plain sequential DPO, on the user's own data?

For each run and each compared dimension d, with Delta_k = log(pi_k/pi_0)(y_w) - log(pi_k/pi_0)(y_l) per held-out
pair (pi_0 the run's base model, y_w chosen, y_l rejected; the eval scorecard's `vs_base`):

  final       accuracy (share of pairs with Delta_K > 0) and mean margin (mean Delta_K) of the run's final model;
  retention   after each stage k, the same two numbers on every dimension trained at an earlier stage j < k, beside
              their values after stage j: how much of an earlier dimension each later stage kept;
  vs first    final accuracy and mean margin minus the first run's, on the same pairs, with a paired bootstrap 95%
              interval: the pairs are resampled with replacement `bootstrap_resamples` times (seeded, the same
              resamples for every run and metric), the difference recomputed on each resample, and the 2.5th and
              97.5th percentiles reported. Pairing removes the pair-to-pair variance that both runs share.

The runs must hold the same held-out pairs for every compared dimension (the same prompt, chosen and rejected
texts under the same pair ids, in any order): otherwise the numbers would measure different questions, and the
comparison is refused naming the first difference. Runs may differ in everything else -- method, order of the
dimensions, base model, tokenizer -- but a different base model changes what Delta measures, so it is warned
about. Where every run's latest complete `spoctl eval` judged the same prompts with the same judge, the final
stage's judged win rates are shown beside (their intervals are each run's own Wilson intervals, not paired: the
report keeps no per-prompt verdicts).

Seeds: a RUN may be a comma-separated group of runs, the same method on several seeds (`s0/dpo,s1/dpo`), each seed
with held-out pairs of its own. Every group then has one run per seed, in the same seed order; runs at the same
position must hold the same held-out pairs, and the numbers pool every seed's pairs: accuracy and margin over all of
them, intervals from a stratified paired bootstrap (each seed's pairs resampled within that seed).

Scoring goes through one call (`score_run`) to the eval scorecard's log-prob store, so passes `spoctl align` or
`spoctl eval` already made are reused from the run's cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import CompareConfig, EvalConfig
from ..console import Output, percent
from ..errors import UsageError
from ..fsutil import read_json
from ..rundir import RunDir


# ------------------------------------------------------------------------------------------------ pure math
def paired_bootstrap(first: torch.Tensor, other: torch.Tensor, n_resamples: int, seed: int) -> dict[str, float]:
    """Difference mean(other) - mean(first) of two per-pair statistics of the same pairs, with its paired
    percentile-bootstrap 95% interval. Resamples are drawn from a generator seeded with `seed` alone, so every
    call with the same number of pairs uses the same resamples. One stratum of `stratified_paired_bootstrap`."""
    if first.shape != other.shape or first.ndim != 1 or first.numel() == 0:
        raise ValueError("paired_bootstrap needs two equally long, non-empty 1-d tensors")
    return stratified_paired_bootstrap([first], [other], n_resamples, seed)


def stratified_paired_bootstrap(first: list[torch.Tensor], other: list[torch.Tensor], n_resamples: int,
                                seed: int) -> dict[str, float]:
    """`paired_bootstrap` over several strata at once (one per seed of a study, each with its own held-out pairs):
    the difference of means over all pairs together, with a percentile 95% interval whose resamples draw every
    stratum's pairs with replacement from that stratum alone, so that what separates the strata (one seed's easier
    pairs) does not widen it."""
    if len(first) != len(other) or not first or any(a.shape != b.shape or a.ndim != 1 or a.numel() == 0
                                                    for a, b in zip(first, other)):
        raise ValueError("stratified_paired_bootstrap needs, per stratum, two equally long, non-empty 1-d tensors")
    diffs = [b.double() - a.double() for a, b in zip(first, other)]
    total = sum(d.numel() for d in diffs)
    g = torch.Generator().manual_seed(seed)
    sums = torch.zeros(n_resamples, dtype=torch.float64)
    for d in diffs:
        for start in range(0, n_resamples, 256):  # bounded memory, as in paired_bootstrap
            idx = torch.randint(d.numel(), (min(256, n_resamples - start), d.numel()), generator=g)
            sums[start:start + idx.shape[0]] += d[idx].sum(dim=1)
    low, high = torch.quantile(sums / total, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": float(torch.cat(diffs).mean()), "low": low, "high": high}


def metrics(margins: torch.Tensor) -> dict[str, float]:
    """Accuracy (share of margins > 0) and mean margin."""
    return {"accuracy": float((margins > 0).double().mean()), "margin": float(margins.double().mean())}


def pareto_front(points: dict[str, list[float]]) -> list[str]:
    """Names of the points no other point dominates (at least as high everywhere, higher somewhere)."""
    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [name for name, p in points.items() if not any(dominates(q, p) for o, q in points.items() if o != name)]


# ------------------------------------------------------------------------------------------------ held-out pairs
@dataclass
class HeldOut:
    """A dimension's eval pairs in one run: `order` puts the split's rows in a run-independent order (by pair id
    and texts), `fingerprint` identifies the pairs, `rows` are their (pair_id, prompt, chosen, rejected)."""

    rows: list[tuple[str, str, str, str]]
    order: list[int]
    fingerprint: str


def held_out(prepared: Any, dim: str) -> HeldOut:
    ds = prepared.split(dim, "eval").select_columns(["pair_id", "prompt", "chosen", "rejected"])
    rows = [(str(r["pair_id"]), r["prompt"], r["chosen"], r["rejected"]) for r in ds]
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    h = hashlib.sha256()
    for i in order:
        h.update("\0".join(rows[i]).encode() + b"\1")
    return HeldOut(rows, order, h.hexdigest())


def difference(a: HeldOut, b: HeldOut) -> str:
    """The first difference between two dimensions' held-out pairs, in words."""
    if len(a.rows) != len(b.rows):
        return f"{len(a.rows)} pairs against {len(b.rows)}"
    ids_a, ids_b = {r[0] for r in a.rows}, {r[0] for r in b.rows}
    if ids_a != ids_b:
        only = sorted(ids_a - ids_b)[:3] or sorted(ids_b - ids_a)[:3]
        side = "first" if ids_a - ids_b else "second"
        return f"pair ids only in the {side}: {', '.join(only)}"
    by_id = {r[0]: r for r in b.rows}
    for r in sorted(a.rows):
        other = by_id[r[0]]
        for name, x, y in zip(("prompt", "chosen", "rejected"), r[1:], other[1:]):
            if x != y:
                return f"pair {r[0]}: its {name} text differs"
    return "the same pairs appear a different number of times"


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class ScoredRun:
    root: Path
    name: str
    base_model: str
    dims: list[str]  # the run's own dimensions, in stage order (completed stages)
    margins: dict[tuple[int, str], torch.Tensor]  # (k, compared dim) -> Delta_k per pair, in HeldOut.order


def score_run(root: Path, dims: list[str], cfg: CompareConfig, out: Output) -> tuple[ScoredRun, dict[str, HeldOut]]:
    """The one place where compare scores models: the eval scorecard's log-prob store (cached passes reused),
    every completed stage's model and the base on `dims`' eval pairs."""
    from .. import losses
    from .runinfo import open_run
    from .runner import model_pass
    from .scorecard import EvalLogps

    ecfg = EvalConfig(run=root, batch_size=cfg.batch_size, logprob_chunk=cfg.logprob_chunk,
                      trust_remote_code=cfg.trust_remote_code, plot=False)
    er = open_run(ecfg, out)
    lacking = [d for d in dims if d not in er.prepared.dims]
    if lacking:
        raise UsageError(f"{root}: its prepared data ({er.prepared.path}) has no dimension '{lacking[0]}', so its"
                         f" models cannot be scored on that dimension's held-out pairs; pass --dims with dimensions"
                         f" every run has (this one has: {', '.join(er.prepared.dims)})")
    pairs = {d: held_out(er.prepared, d) for d in dims}
    run_dims = [st["dim"] for st in er.stages]
    er.dims = list(dims)  # score the compared dimensions, which need not be the run's own
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store = EvalLogps(er, ecfg, device)
    model_pass(er, ecfg, out, store, False, device)
    margins = {}
    for d in dims:
        order = torch.tensor(pairs[d].order, dtype=torch.long)
        base = store.get(0, d)
        for k in range(er.k_max + 1):
            cur = store.get(k, d)
            margins[(k, d)] = losses.log_ratio_margin(cur.chosen, cur.rejected, base.chosen, base.rejected)[order]
    return ScoredRun(root, root.name, str(er.manifest.get("base_model")), run_dims, margins), pairs


# ------------------------------------------------------------------------------------------------ the comparison
@dataclass
class Group:
    """One RUN argument: a run, or the same method's runs on several seeds (one per stratum, in seed order)."""

    name: str
    members: list[ScoredRun]

    @property
    def dims(self) -> list[str]:
        return self.members[0].dims

    def margins(self, k: int, d: str) -> list[torch.Tensor]:
        """Delta_k on d's held-out pairs, one tensor per seed."""
        return [m.margins[(k, d)] for m in self.members]

    def pooled(self, k: int, d: str) -> torch.Tensor:
        return torch.cat(self.margins(k, d))


def parse_groups(runs: list[Path]) -> list[list[Path]]:
    """Each RUN argument as its runs: `a` -> [a], `s0/dpo,s1/dpo` -> [s0/dpo, s1/dpo]."""
    return [[Path(p) for p in str(r).split(",") if p] for r in runs]


def _label(paths: list[Path]) -> str:
    """A group's name: a run's folder name; for several, what their folder names share at the end (`dpo` for
    seed0-dpo, seed1-dpo), else at the start, else the names joined by commas."""
    names = [p.name or str(p) for p in paths]
    if len(names) == 1:
        return names[0]
    tail = names[0]
    while tail and not all(n.endswith(tail) for n in names):
        tail = tail[1:]
    head = names[0]
    while head and not all(n.startswith(head) for n in names):
        head = head[:-1]
    for part in (tail.strip("-_. "), head.strip("-_. ")):
        if part:
            return part
    return ",".join(names)


def _names(groups: list[list[Path]]) -> list[str]:
    """Short, distinct labels: folder names (or what a group's share), else the arguments as given."""
    names = [_label(g) for g in groups]
    return names if len(set(names)) == len(names) else [",".join(str(p) for p in g) for g in groups]


def judged_finals(groups: list[Group], dims: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """The final stage's judged win rates, when every run's latest complete eval judged the same prompts with
    the same judge; else (None, why not). Single runs only: the reports keep no per-prompt verdicts to pool."""
    if any(len(g.members) > 1 for g in groups):
        return None, "runs pooled over seeds (judged win rates are compared run by run)"
    runs = [g.members[0] for g in groups]  # each named as its group by compare_runs
    found = []
    for r in runs:
        files = RunDir(r.root).latest_eval(complete=True)
        report = read_json(files.report_path) if files is not None else None
        if not report or not report.get("win_rates") or not files.samples_path.is_file():
            return None, f"{r.root}: no complete judged `spoctl eval`"
        prompts: dict[str, set[str]] = {}
        for line in files.samples_path.read_text(encoding="utf-8").splitlines():
            s = json.loads(line)
            if s["k"] == 0:
                prompts.setdefault(s["dim"], set()).add(str(s["pair_id"]))
        found.append((report, prompts))
    first_report, first_prompts = found[0]
    for r, (report, prompts) in zip(runs[1:], found[1:]):
        if report["judge"]["name"] != first_report["judge"]["name"]:
            return None, f"{r.root}: judged by {report['judge']['name']}, the first run by {first_report['judge']['name']}"
        for d in dims:
            if prompts.get(d) != first_prompts.get(d):
                return None, f"{r.root}: its eval judged other '{d}' prompts than the first run's"
    table = {}
    for r, (report, _) in zip(runs, found):
        last = report["win_rates"][-1]["dims"]
        table[r.name] = {d: {k: last[d][k] for k in ("win_rate", "ci_low", "ci_high", "n")} for d in dims if d in last}
    return {"judge": first_report["judge"]["name"], "runs": table}, None


def compare_runs(cfg: CompareConfig, out: Output) -> dict[str, Any]:
    """The comparison as a dict (what `--json` prints); writes the Pareto plot when `cfg.plot` is set."""
    groups_paths = parse_groups(cfg.runs)
    if len(groups_paths) < 2:
        raise UsageError("spoctl compare needs at least two runs: spoctl compare RUN RUN [RUN...]")
    roots = [p for g in groups_paths for p in g]
    if len(set(p.resolve() for p in roots)) != len(roots):
        raise UsageError("spoctl compare: a run is given twice; give each run once")
    seeds = len(groups_paths[0])
    for g in groups_paths:
        if len(g) != seeds:
            raise UsageError(f"spoctl compare: {','.join(map(str, g))} is {len(g)} run{'s' * (len(g) != 1)}, "
                             f"{','.join(map(str, groups_paths[0]))} {seeds}: a group of runs has one run per "
                             "seed, and every group the same seeds in the same order")
    for root in roots:
        if not RunDir(root).exists():
            raise UsageError(f"{root}: not a spoctl run directory (no manifest.json); give folders made by"
                             " `spoctl align`")
    if not cfg.dims:
        first = RunDir(roots[0]).read_manifest()
        dims = [st["dim"] for st in first.get("stages", [])] or list(first.get("dims") or [])
    else:
        dims = list(cfg.dims)
    names = _names(groups_paths)
    pooled = f", {seeds} seeds pooled" if seeds > 1 else ""
    out.info(f"comparing {len(groups_paths)} runs{pooled} on the held-out pairs of {', '.join(dims)}: every stage's"
             f" model and the base of each run ({cfg.bootstrap_resamples} paired bootstrap resamples)")
    groups: list[Group] = []
    first_pairs: list[dict[str, HeldOut]] = []
    for paths, name in zip(groups_paths, names):
        members = []
        for i, root in enumerate(paths):
            scored, pairs = score_run(root, dims, cfg, out)
            scored.name = name
            if not groups:
                first_pairs.append(pairs)
            else:
                for d in dims:
                    if pairs[d].fingerprint != first_pairs[i][d].fingerprint:
                        raise UsageError(f"{root} and {groups_paths[0][i]}: the held-out pairs of '{d}' differ"
                                         f" ({difference(first_pairs[i][d], pairs[d])}); compare runs prepared from"
                                         " the same held-out split (the same --data and prepare settings)"
                                         + (", the runs of each seed at the same place in every group"
                                            if seeds > 1 else ""))
            if members and scored.dims != members[0].dims:
                raise UsageError(f"{root}: its stages ({' > '.join(scored.dims)}) are not those of {paths[0]}"
                                 f" ({' > '.join(members[0].dims)}); a group holds one method's runs on several"
                                 " seeds")
            members.append(scored)
        groups.append(Group(name, members))
    warnings = []
    bases = {r.base_model for g in groups for r in g.members}
    if len(bases) > 1:
        warnings.append(f"the runs start from different base models ({', '.join(sorted(bases))}): log(pi/pi_0) is"
                        " measured against each run's own base")
    for w in warnings:
        out.warn(w)

    first = groups[0]
    result_runs = []
    for g in groups:
        k_max = len(g.dims)
        final = {d: metrics(g.pooled(k_max, d)) for d in dims}
        stages = [{"k": k, "dim": g.dims[k - 1], "dims": {d: metrics(g.pooled(k, d)) for d in dims}}
                  for k in range(1, k_max + 1)]
        retention = []
        for j, d in enumerate(g.dims, start=1):
            if d not in dims:
                continue
            own = metrics(g.pooled(j, d))
            for k in range(j + 1, k_max + 1):
                now = metrics(g.pooled(k, d))
                retention.append({"dim": d, "own_stage": j, "after_stage": k, **now,
                                  "own_accuracy": own["accuracy"], "own_margin": own["margin"]})
        vs_first = None
        if g is not first:
            fk = len(first.dims)
            vs_first = {}
            for d in dims:
                a, b = first.margins(fk, d), g.margins(k_max, d)
                vs_first[d] = {
                    "accuracy": stratified_paired_bootstrap([(x > 0).double() for x in a],
                                                            [(x > 0).double() for x in b], cfg.bootstrap_resamples,
                                                            cfg.seed),
                    "margin": stratified_paired_bootstrap(a, b, cfg.bootstrap_resamples, cfg.seed)}
        entry = {"name": g.name, "run_dir": str(g.members[0].root), "base_model": g.members[0].base_model,
                 "stages_order": g.dims, "pairs": {d: int(g.pooled(0, d).numel()) for d in dims}, "final": final,
                 "stages": stages, "retention": retention, "vs_first": vs_first}
        if seeds > 1:
            entry["run_dirs"] = [str(r.root) for r in g.members]
        result_runs.append(entry)
    judged, judged_note = judged_finals(groups, dims)
    front = pareto_front({r["name"]: [r["final"][d]["accuracy"] for d in dims] for r in result_runs})
    result: dict[str, Any] = {
        "dims": dims, "runs": result_runs, "first": first.name, "pareto": front, "judged": judged,
        "judged_note": judged_note, "warnings": warnings,
        "bootstrap": {"resamples": cfg.bootstrap_resamples, "seed": cfg.seed, "interval": "percentile, 95%",
                      "seeds_pooled": seeds, "stratified": seeds > 1},
        "plot": None,
    }
    if cfg.plot is not None:
        if plot(result, Path(cfg.plot)):
            result["plot"] = str(cfg.plot)
        else:
            out.warn("no plot written: matplotlib is not installed (pip install matplotlib)")
    print_tables(result, out)
    return result


# ------------------------------------------------------------------------------------------------ output
def _interval(c: dict[str, float], scale: float, fmt: str) -> str:
    return f"{c['diff'] * scale:+{fmt}} [{c['low'] * scale:+{fmt}}, {c['high'] * scale:+{fmt}}]"


def print_tables(result: dict[str, Any], out: Output) -> None:
    dims = result["dims"]
    front = set(result["pareto"])
    out.table("final model: accuracy / mean margin of log(pi/pi_0) on each dimension's held-out pairs"
              " (* on the Pareto front of the accuracies)",
              ["run", "order", *dims],
              [[r["name"] + (" *" if r["name"] in front else ""), " > ".join(r["stages_order"]),
                *(f"{percent(r['final'][d]['accuracy'])} / {r['final'][d]['margin']:.3f}" for d in dims)]
               for r in result["runs"]])
    rows = [[r["name"], *(f"{_interval(r['vs_first'][d]['accuracy'], 100, '.1f')} pts /"
                          f" {_interval(r['vs_first'][d]['margin'], 1, '.3f')}" for d in dims)]
            for r in result["runs"] if r["vs_first"] is not None]
    boot = result["bootstrap"]
    how = f"stratified over {boot['seeds_pooled']} seeds, " if boot.get("stratified") else ""
    out.table(f"difference from {result['first']}: accuracy (points) / mean margin, paired bootstrap 95% interval"
              f" ({how}{boot['resamples']} resamples)", ["run", *dims], rows)
    rows = [[r["name"], t["dim"], f"{t['own_stage']} -> {t['after_stage']}",
             f"{percent(t['own_accuracy'])} -> {percent(t['accuracy'])}", f"{t['own_margin']:.3f} -> {t['margin']:.3f}"]
            for r in result["runs"] for t in r["retention"]]
    if rows:
        out.table("retention: an earlier dimension after its own stage -> after each later stage",
                  ["run", "dim", "stages", "accuracy", "mean margin"], rows)
    if result["judged"]:
        j = result["judged"]
        out.table(f"judged win rate of the final stage vs its base ({j['judge']}), 95% Wilson interval (not paired)",
                  ["run", *dims], [[name, *(f"{percent(c[d]['win_rate'])} [{percent(c[d]['ci_low'])},"
                                            f" {percent(c[d]['ci_high'])}]" if d in c else "-" for d in dims)]
                                   for name, c in j["runs"].items()])
    elif result["judged_note"]:
        out.detail(f"judged win rates not compared: {result['judged_note']}")
    if result.get("plot"):
        out.info(f"Pareto plot: {result['plot']}")


def plot(result: dict[str, Any], path: Path) -> bool:
    """Each run's final accuracies, one panel per pair of dimensions (one axis per dimension for a single one),
    the Pareto front marked. False (and nothing written) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display; must precede pyplot
        import matplotlib.pyplot as plt

        from .report import save_figure
    except ImportError:
        return False
    dims = result["dims"]
    pairs = [(a, b) for i, a in enumerate(dims) for b in dims[i + 1:]][:6] or [(dims[0], None)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    front = set(result["pareto"])
    for ax, (dx, dy) in zip(axes[0], pairs):
        at: dict[tuple[float, float], list[str]] = {}  # runs at the same point get one label, their names joined
        for i, r in enumerate(result["runs"]):
            x = r["final"][dx]["accuracy"]
            y = r["final"][dy]["accuracy"] if dy else i
            on = r["name"] in front
            ax.scatter([x], [y], s=70 if on else 40, marker="*" if on else "o", zorder=3)
            at.setdefault((x, y), []).append(r["name"])
        for (x, y), names in at.items():
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if dy:
            pts = sorted((r["final"][dx]["accuracy"], r["final"][dy]["accuracy"]) for r in result["runs"]
                         if r["name"] in front)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="grey", lw=0.8, ls="--", zorder=2)
            ax.set_ylabel(f"{dy}: accuracy of log(pi/pi_0)")
            ax.set_ylim(-0.02, 1.02)
        else:
            ax.set_yticks(range(len(result["runs"])), [r["name"] for r in result["runs"]])
        ax.set_xlabel(f"{dx}: accuracy of log(pi/pi_0)")
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle("final models on the same held-out pairs (* Pareto front)")
    save_figure(fig, path)
    return True
