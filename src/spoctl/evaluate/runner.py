"""The whole evaluation: scorecard, then (with a judge) generation, judging and calibration, then the gate.

Every evaluation writes its own folder under RUN_DIR/eval/ (`RunDir.new_eval`), and the pointer eval/latest.json
moves to it once its report is written: no evaluation replaces another's files. The pre-flight checks (the run,
the gate's dimensions, every model's files against the run's record, the generation backend, a judge that must
start: its model, its key, its endpoint) come
before the folder exists, so a failed pre-flight writes nothing. Whatever is finished after that is kept: if a
later step fails (a judge failing half-way, a missing model), the report so far -- marked incomplete, with the
error -- is saved atomically before the error propagates.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .. import __version__
from ..config import EvalConfig
from ..console import Output
from ..errors import SpoctlError, UsageError
from ..rundir import EvalFiles, now_iso
from . import gate as gate_mod
from . import report as report_mod
from .generate import generate_for_model, prompt_rows, seeded_sample
from .judges import make_judge
from .judges.base import Judge, Matchup, last_user_text
from .runinfo import EvalRun, open_run
from .scorecard import EvalLogps, gate_scores
from .winrate import agreement, summarize


def _pair_source(er: EvalRun):
    """(dim, split) -> [(last user message, chosen, rejected)] from the prepared data, read once."""
    memo: dict[tuple[str, str], list[tuple[str, str, str]]] = {}

    def pairs(dim: str, split: str) -> list[tuple[str, str, str]]:
        if (dim, split) not in memo:
            ds = er.prepared.split(dim, split).select_columns(["prompt", "prompt_messages", "chosen", "rejected"])
            memo[(dim, split)] = [(last_user_text(r["prompt_messages"], r["prompt"]), r["chosen"], r["rejected"])
                                  for r in ds]
        return memo[(dim, split)]

    return pairs


def _check_gate_dims(cfg: EvalConfig, dims: list[str]) -> None:
    """Fail on a misspelt gate dimension before any expensive work."""
    for flag, bounds in (("--fail-under", cfg.gate.fail_under), ("--max-regression", cfg.gate.max_regression)):
        for d in bounds:
            if d not in dims:
                raise UsageError(f"{flag} {d}=...: '{d}' is not evaluated (evaluated: {', '.join(dims)})")


def model_pass(er: EvalRun, cfg: EvalConfig, out: Output, store: EvalLogps, generate: bool,
               device: torch.device) -> list[dict[str, Any]]:
    """Load each model pi_k once and do everything that needs it: the scorecard's log-probs not yet cached and,
    with a judge, its responses. Returns the samples (empty without a judge)."""
    gen = cfg.generation
    rows = {d: prompt_rows(er, d, gen.num_prompts, gen.seed) for d in er.dims} if generate else {}
    n_prompts = sum(len(v) for v in rows.values())
    if generate:
        decoding = "greedy" if gen.temperature == 0 else f"sampled at temperature {gen.temperature:g}"
        # The prompts really generated: a dimension whose eval split has fewer distinct prompts than asked gives
        # all it has, and its win rates rest on that many.
        per_dim = ", ".join(f"{d} {len(v)}" for d, v in rows.items())
        out.info(f"generation: {er.k_max + 1} models x {n_prompts} prompts ({per_dim}: each dimension's distinct"
                 f" eval prompts, at most --num-prompts {gen.num_prompts}), up to --max-new-tokens"
                 f" {gen.max_new_tokens} tokens each, {decoding}, {gen.backend} backend")
    samples: list[dict[str, Any]] = []
    for k in range(er.k_max + 1):
        # Before any of pi_k's numbers are used, cached or not: the files pi_k is built from must be the ones its
        # run saved (the cache is keyed by the fingerprint the manifest recorded, not by what is on disk now).
        er.chain.verify(k)
        missing = store.missing(k)
        if not missing and not generate:
            continue
        t = time.perf_counter()
        model = er.chain.load(k).to(device)
        if missing:
            out.info(f"log-probs: {er.label(k)} on {', '.join(f'{d}/eval' for d in missing)}")
            store.compute(model, k, missing, out)
        if generate:
            label = (f"generating: {er.label(k)} (--num-prompts {gen.num_prompts},"
                     f" --max-new-tokens {gen.max_new_tokens})")
            with out.progress(label, total=n_prompts, unit="prompts") as bar:
                if gen.backend == "vllm":
                    from .vllm_backend import model_folder

                    with model_folder(model.cpu(), er.tokenizer, er.run.cache_dir) as folder:
                        del model
                        samples += generate_for_model(er, folder, k, rows, gen, device, bar)
                else:
                    samples += generate_for_model(er, model, k, rows, gen, device, bar)
        out.detail(f"{er.label(k)}: {time.perf_counter() - t:.1f}s")
        model = None
    return samples


JUDGE_CHUNK = 32  # matchups per judge call: a progress step, large enough to keep a judge's requests in flight


def judged(judge: Judge, matchups: list[Matchup], out: Output, label: str) -> list[float]:
    """The judge's verdicts on `matchups`, asked in chunks so that a progress bar can follow them."""
    verdicts: list[float] = []
    with out.progress(label, total=len(matchups), unit="matchups") as bar:
        for start in range(0, len(matchups), JUDGE_CHUNK):
            chunk = matchups[start:start + JUDGE_CHUNK]
            verdicts += judge.compare(chunk)
            bar.advance(len(chunk))
    return verdicts


def judge_samples(er: EvalRun, cfg: EvalConfig, out: Output, judge: Judge, samples: list[dict[str, Any]],
                  pairs: Any, report: dict[str, Any]) -> None:
    """Each stage's response against the base model's, per dimension; then the judge against human pairs."""
    base = {(s["dim"], s["index"]): s for s in samples if s["k"] == 0}
    keys, matchups = [], []
    for s in samples:
        if s["k"] > 0:
            keys.append((s["k"], s["dim"]))
            matchups.append(Matchup(dim=s["dim"], prompt=s["prompt"], a=s["response"],
                                    b=base[(s["dim"], s["index"])]["response"], messages=tuple(s["messages"])))
    verdicts = judged(judge, matchups, out, f"judging: each stage's responses against the base model's"
                                            f" ({judge.name} judge)")
    report["win_rates"] = [
        {"k": k, "model": er.stages[k - 1]["dim"],
         "dims": {d: summarize([v for key, v in zip(keys, verdicts) if key == (k, d)]) for d in er.dims}}
        for k in range(1, er.k_max + 1)]

    calibration = {}
    if cfg.judge.calibration_pairs:
        for d in er.dims:
            # A seeded sample, like the prompts: the eval split's rows are in source order.
            chosen = seeded_sample(er.prepared.split(d, "eval")["pair_id"], cfg.judge.calibration_pairs,
                                   cfg.judge.seed)
            human = [pairs(d, "eval")[i] for i in chosen]
            v = judged(judge, [Matchup(dim=d, prompt=p, a=c, b=r) for p, c, r in human], out,
                       f"judge calibration: {d} human pairs")
            calibration[d] = {"agreement": agreement(v), "pairs": len(v)}
    report["judge"] = {**judge.describe(), "calibration": calibration}


def evaluate(cfg: EvalConfig, out: Output) -> dict[str, Any]:
    """Evaluate a run; returns the report (also written to RUN_DIR/eval/<id>/report.json, which the pointer
    eval/latest.json then names). Raises UsageError (exit 2) for a bad run or an unusable judge -- before writing
    anything when the pre-flight checks fail, after saving the partial report otherwise -- and never raises for a
    failed gate: the caller reads report["gate"]["passed"] (see `gate_failure`)."""
    er = open_run(cfg, out)
    _check_gate_dims(cfg, er.dims)
    if cfg.judge.name is not None and cfg.generation.backend == "vllm":
        from .vllm_backend import check_vllm

        check_vllm()
    report: dict[str, Any] = {
        "run_dir": str(er.run.root), "eval_id": None, "created": now_iso(), "spoctl_version": __version__,
        "complete": False, "error": None, "dims": er.dims,
        "stages": [{"index": st["index"], "dim": st["dim"], "status": st.get("status"),
                    "beta": (st.get("plan") or {}).get("beta"), "weights": st.get("weights")}
                   for st in er.manifest.get("stages", [])],
        "warnings": er.warnings, "scorecard": None, "judge": None, "generation": None, "win_rates": None,
        "gate": None,
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store = EvalLogps(er, cfg, device)
    for k in range(er.k_max + 1):  # every model's files as the run saved them (hashed once per process)
        er.chain.verify(k)
    pairs = _pair_source(er)
    judge = start_judge(er, cfg, pairs) if cfg.judge.name is not None else None
    try:
        if judge is not None:
            report["judge"] = judge.describe()
        # Under several processes (torchrun -m spoctl eval) the main one makes the folder and writes the files.
        files = er.run.new_eval() if store.procs.main else None
        report["eval_id"] = store.procs.broadcast(files.eval_id if files is not None else None)
        _measure(er, cfg, out, store, judge, pairs, files, report)
    finally:
        if judge is not None:
            judge.close()
    if files is not None:
        report_mod.write_report(files, report, with_plot=cfg.plot)
        er.run.point_to_eval(files, complete=True)
        if cfg.plot and "plot" not in report["files"]:
            out.warn("no plot written: matplotlib is not installed (pip install matplotlib)")
        out.info(f"report: {files.report_path}")
    report_mod.print_tables(report, out)
    return report


def start_judge(er: EvalRun, cfg: EvalConfig, pairs: Any) -> Judge:
    """The pre-flight of the judge: built and prepared (a missing key or model, an endpoint that does not answer
    fails here), before minutes of generation and before anything is written."""
    judge = make_judge(cfg.judge, manifest=er.manifest, pairs=pairs, cache_dir=er.run.judge_cache_dir,
                       trust_remote_code=cfg.trust_remote_code)
    try:
        judge.prepare(er.dims)
    except BaseException:
        judge.close()
        raise
    return judge


def _measure(er: EvalRun, cfg: EvalConfig, out: Output, store: EvalLogps, judge: Judge | None, pairs: Any,
             files: EvalFiles | None, report: dict[str, Any]) -> None:
    """Everything after the pre-flight, filling `report`; on an error the partial report is written to `files`
    (and the pointer names it as the latest evaluation) before the error propagates. `files` is None on the
    processes of a launch that write nothing."""
    try:
        samples = model_pass(er, cfg, out, store, judge is not None, device=store.device)
        report["scorecard"] = store.scorecard()
        if judge is not None:
            report["generation"] = cfg.generation.model_dump(mode="json")
            if files is not None:
                report_mod.write_samples(files, samples, er.run.root.name)
                report_mod.write_judge_settings(files, judge.describe(), report["generation"])
            report["samples_written"] = True
            judge_samples(er, cfg, out, judge, samples, pairs, report)
        judged_scores = report["win_rates"] is not None
        scores = ({d: [r["dims"][d]["win_rate"] for r in report["win_rates"]] for d in er.dims} if judged_scores
                  else {d: gate_scores(report["scorecard"], d) for d in er.dims})
        report["gate"] = gate_mod.check(scores, cfg.gate.fail_under, cfg.gate.max_regression,
                                        "judged win rate" if judged_scores else "accuracy of log(pi_k/pi_0)",
                                        keep=gate_mod.keep_constraints(er.stages) if cfg.gate.keep else None,
                                        unfinished=er.unfinished, allow_incomplete=cfg.gate.allow_incomplete)
        report["complete"] = True
    except SpoctlError as err:
        report["error"] = str(err)
        if files is not None:
            report_mod.write_report(files, report, with_plot=cfg.plot)
            er.run.point_to_eval(files, complete=False)
            out.warn(f"partial report kept: {files.report_path}")
        raise
    except BaseException:
        # A bug or an interrupt: no report to keep. An evaluation folder with nothing in it is removed; one with
        # samples stays (they cost minutes), and the pointer still names the last evaluation that has a report.
        if files is not None and files.root.is_dir() and not any(files.root.iterdir()):
            files.root.rmdir()
        raise


def gate_failure(report: dict[str, Any]) -> str | None:
    """The one-line reason the gate failed, or None when it passed (or checked nothing)."""
    g = report.get("gate") or {}
    return None if g.get("passed", True) else g.get("reason")
