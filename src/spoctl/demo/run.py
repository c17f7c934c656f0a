"""The built-in demo end to end, on the real code path: build (or reuse) the base model, write the task's
preference pairs as pairwise JSONL, `spoctl.data.prepare.prepare` them, `spoctl.engine.align.align` them, and
mark the run as a demo in its manifest.

Cached under `rundir.demo_home()` and keyed by task version and seed, so the base model and the prepared data are
built once:

    <home>/base-v1-seed0-steps600/   the base model (HF folder, safetensors) and its tokenizer
    <home>/pairs-v1-seed0/<dim>.jsonl
    <home>/prepared-v1-seed0/        prepared data for all three dimensions (plus the frozen log-prob cache)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import AlignConfig, PrepareConfig, validate
from ..console import Output
from ..errors import UsageError
from ..fsutil import atomic_directory, write_json_atomic
from ..rundir import RunDir, demo_home
from . import task
from .model import SFT_STEPS, base_model_key, ensure_base_model, single_thread

# The demo's align settings, tuned so a three-stage run takes ~15 s on two cores and each stage visibly moves its
# own rule-judged score (docs/demo.md says why each value). Anything the user sets (flags, --set, config file)
# wins over these.
DEMO_ALIGN = {
    "dims": list(task.DEMO_DIMS),
    # A strong KL (beta 0.5) keeps each stage from driving the rejected behaviour to ~zero probability, so a later
    # stage can still move it, and the SPO offset alpha * beta_{n-1} * Delta has weight against the new preference.
    "beta": 0.5,
    "alpha": 0.5,
    "learning_rate": 1e-4,
    # Equal steps per stage whatever a dimension's pair count (harmless has the fewest pairs).
    "epochs": 5.0,
    "max_steps": 40,
    "batch_size": 16,
    "micro_batch_size": 16,
    "frozen_batch_size": 64,
    "warmup_ratio": 0.1,
    # A small NLL term on the chosen response: without it DPO on a 100K-parameter model drifts into broken text
    # ("lacklack.") within a few dozen steps.
    "loss": {"sft_weight": 0.2},
    "save_every": 0,  # a stage takes seconds: checkpoints within it would cost more than a rerun
}
EVAL_FRACTION = 0.1


# What `spoctl align` says when it runs the demo, so nobody trains the demo while meaning their own data.
DEMO_VIA_ALIGN = (
    "built-in demo: no --data and no --model given, so `spoctl align` runs the demo (a tiny model on a synthetic"
    " task, docs/demo.md) with the demo's settings.\n"
    "To align your own data: spoctl prepare --data DIM=FILE --model MODEL --out prepared/,"
    " then spoctl align --dims DIM,... --data prepared/"
)


def runs_demo(cfg: AlignConfig) -> bool:
    """`spoctl align` runs the demo exactly when the configuration names no data and no model of the user's
    (`align.data` / `align.model`, from --data / --model, --set or the config file)."""
    return cfg.data is None and cfg.model is None


def demo_for_align(cfg: AlignConfig) -> AlignConfig:
    """`spoctl align`'s configuration as it will run: unchanged for the user's own data; for the demo, the demo's
    settings under what the user set, after checking that the demo has every requested dimension."""
    if not runs_demo(cfg):
        return cfg
    missing = [d for d in cfg.dims if d not in task.DEMO_DIMS]
    if missing:
        raise UsageError(
            f"no --data given, so `spoctl align` would run the built-in demo, which has no dimension"
            f" {', '.join(map(repr, missing))} (its dimensions: {', '.join(task.DEMO_DIMS)}). To align your own data,"
            f" prepare it and pass it with --data: spoctl prepare --data {missing[0]}=FILE ... --model MODEL --out"
            f" prepared/, then spoctl align --dims {','.join(cfg.dims)} --data prepared/"
        )
    return demo_config(cfg)


def demo_config(cfg: AlignConfig | None = None, **overrides: Any) -> AlignConfig:
    """The demo's align settings under the fields the user set explicitly in `cfg`, then `overrides`."""
    user = cfg.model_dump(mode="json", include=cfg.model_fields_set) if cfg is not None else {}
    merged = {**DEMO_ALIGN, **user, **overrides}
    return validate(AlignConfig, merged, "align")


def demo_info(task_seed: int, sft_steps: int) -> dict[str, Any]:
    """The manifest's `demo` field: what the run is, and the held-out prompts its rule-judged scores use."""
    _, held_out = task.split_prompts(task_seed)
    return {"task": task.TASK_NAME, "version": task.TASK_VERSION, "seed": task_seed,
            "base_model": base_model_key(task_seed, sft_steps), "dims": list(task.DEMO_DIMS), "eval_prompts": held_out}


def ensure_prepared(home: Path, base_dir: Path, task_seed: int, out: Output) -> Path:
    """Pairs for every demo dimension as JSONL, prepared with the base model's tokenizer (cached)."""
    from ..data.prepare import prepare

    target = home / f"prepared-v{task.TASK_VERSION}-seed{task_seed}"
    if (target / "manifest.json").is_file():
        return target
    pairs_dir = home / f"pairs-v{task.TASK_VERSION}-seed{task_seed}"
    train_prompts, _ = task.split_prompts(task_seed)
    with atomic_directory(pairs_dir, replace=True) as tmp:
        for dim in task.DEMO_DIMS:
            records = task.preference_pairs(dim, train_prompts, seed=task_seed)
            (tmp / f"{dim}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out.info(f"preparing the demo's preference pairs in {target}")
    pcfg = PrepareConfig(data={d: str(pairs_dir / f"{d}.jsonl") for d in task.DEMO_DIMS}, format="pairwise",
                         model=str(base_dir), out=target, eval_fraction=EVAL_FRACTION, seed=task_seed, force=True)
    # prepare's own table is detail here: the demo's story is the scores, not the data counts.
    prepare(pcfg, Output(json_mode=out.json_mode, quiet=not out.verbose, verbose=out.verbose))
    return target


def prepare_assets(out: Output, *, home: Path | None = None, task_seed: int = 0,
                   sft_steps: int = SFT_STEPS) -> tuple[Path, Path]:
    """(base model folder, prepared-data folder), built or reused."""
    home = Path(home) if home is not None else demo_home()
    # Made first: a home that cannot be a folder (SPOCTL_HOME names a file, a read-only place) is reported before
    # the base model trains, not after.
    home.mkdir(parents=True, exist_ok=True)
    with single_thread():
        base = ensure_base_model(home, seed=task_seed, steps=sft_steps, out=out)
        prepared = ensure_prepared(home, base, task_seed, out)
    return base.resolve(), prepared.resolve()


def run_demo(out: Output, cfg: AlignConfig | None = None, *, home: Path | None = None, task_seed: int = 0,
             sft_steps: int = SFT_STEPS) -> dict[str, Any]:
    """Align the demo base model on the demo task (dimensions and settings from `cfg` where the user set them,
    else DEMO_ALIGN) and mark the run as a demo. Returns align's result plus the `demo` field."""
    from ..engine.align import align

    if cfg is not None and (cfg.data is not None or cfg.model is not None):
        raise UsageError("the demo brings its own data and model; to align yours, run `spoctl align` with --data"
                         " (and --model)")
    task.check_dims(cfg.dims if cfg is not None and cfg.dims else task.DEMO_DIMS)
    base, prepared = prepare_assets(out, home=home, task_seed=task_seed, sft_steps=sft_steps)
    acfg = demo_config(cfg, data=str(prepared), model=str(base))
    out.info(f"built-in demo: aligning {', '.join(acfg.dims)} on the synthetic assistant task (see docs/demo.md)")
    with single_thread():
        result = align(acfg, out)
    info = demo_info(task_seed, sft_steps)
    RunDir(result["run_dir"]).mark_demo(info)
    return {**result, "demo": {k: v for k, v in info.items() if k != "eval_prompts"}}


def run_demo_and_score(out: Output, cfg: AlignConfig | None = None, *, task_seed: int = 0, with_eval: bool = True,
                       home: Path | None = None, sft_steps: int = SFT_STEPS) -> dict[str, Any]:
    """`spoctl demo`: run_demo, then every dimension's rule-judged score for the base model and after each stage
    (greedy answers to the held-out demo prompts), saved in the run and printed; optionally `spoctl eval` too."""
    from .report import costs, print_report
    from .score import score_run

    result = run_demo(out, cfg, home=home, task_seed=task_seed, sft_steps=sft_steps)
    run = RunDir(result["run_dir"])
    prompts = run.read_manifest()["demo"]["eval_prompts"]
    out.info(f"scoring the base model and each stage on {len(prompts)} held-out demo prompts")
    with single_thread():
        rows = score_run(str(run.root), task.DEMO_DIMS, prompts)
    found = costs(rows, task.DEMO_DIMS)
    write_json_atomic(run.demo_scores_path, {"prompts": prompts, "models": rows, "costs": found})
    report = _judged_eval(out, run) if with_eval else None
    print_report(out, rows, task.DEMO_DIMS, len(prompts), (report or {}).get("win_rates"))
    return {**result, "scores": [{k: v for k, v in r.items() if k != "responses"} for r in rows], "costs": found,
            "scores_file": str(run.demo_scores_path)}


def _judged_eval(out: Output, run: RunDir) -> dict[str, Any] | None:
    """`spoctl eval RUN --judge rules`: the implicit-reward scorecard and rule-judged win rates, in RUN/eval/;
    returns its report (None when eval is not installed)."""
    try:
        from ..config import EvalConfig
        from ..evaluate import evaluate
    except ImportError:  # eval is optional for the demo: its rule-judged table does not need it
        out.detail("spoctl eval is not available; skipping the judged evaluation")
        return None
    ecfg = validate(EvalConfig, {"run": str(run.root), "judge": {"name": "rules"}}, "eval")
    with single_thread():
        return evaluate(ecfg, out)
