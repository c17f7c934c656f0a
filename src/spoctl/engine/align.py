"""`spoctl align`: the stage loop. For each dimension in order: compute the frozen log-probs the stage needs,
build the SPO offset from them, train pi_n from pi_{n-1}, save pi_n, record it in the manifest.

Read `align` top to bottom: checks that can fail cheaply, the processes, the run directory (engine/runsetup.py
builds the `RunSetup` every stage shares), then one `_run_stage` per stage, itself five steps (frozen inputs,
manifest entry, policy, training, saving). Stage extensions (--keep, --replay: engine/extension.py) plug into the
frozen inputs, the training loop and the manifest without a branch here.

Under several processes (engine/distributed.py) every process runs this same code: the main process alone
writes the run directory (lock, manifest, metrics, stage models, caches) and makes every decision that depends on
files, which it shares; each process scores a share of every frozen pass and trains on a share of every batch.
"""

from __future__ import annotations

import shutil
import signal
import time
from typing import Any

import torch

from .. import signals
from ..config import AlignConfig
from ..console import Output, percent
from ..errors import Interrupted, Stopped, TrainingError
from ..fsutil import atomic_directory
from ..models import sort_adapter_targets, tensor_bytes
from ..rundir import now_iso
from . import extensions
from .chain import folder_files, stage_fingerprint, write_lineage
from .distributed import resolve_strategy
from .extension import StageInputs
from .logprobs import attention_implementation, resolve_layout
from .plan import StagePlan
from .progress import StageProgress
from .reporting import log_metrics
from .resume import checkpoint_to_resume
from .runsetup import RunSetup, check_inputs, open_run, processes
from .train import EvalSet, StageData, StageHooks, train_stage, wrap_lora


# --------------------------------------------------------------------------------------------------- align
def align(cfg: AlignConfig, out: Output) -> dict[str, Any]:
    # 1. Everything that can fail cheaply fails here, before a run directory exists.
    prepared, base_spec, tokenizer, plans = check_inputs(cfg)
    try:  # the prepared data stays locked for reading (prepare --force waits) until the run is over
        # DDP or FSDP2, from the settings and the launcher's accelerate config; a contradiction fails here, before
        # any process group. What the launcher decided is part of the configuration from here on.
        strategy = resolve_strategy(cfg)
        cfg = strategy.applied_to(cfg)
        signals.checks_done()  # under a launcher: a signal during the checks above stops the run here, before work
        # 2. The processes, then the run directory: checked, locked, its manifest written.
        with processes(cfg, plans, strategy) as dist, \
                open_run(cfg, out, prepared, base_spec, tokenizer, plans, dist) as setup:
            # 3. One stage per dimension.
            for plan in plans:
                if setup.manifest["stages"][plan.index - 1]["status"] == "completed":
                    setup.out.info(f"stage {plan.index}/{len(plans)} ({plan.dim}): already completed, skipped")
                    continue
                _run_stage(setup, plan)
            return _finish(setup)
    finally:
        prepared.close()


def _finish(setup: RunSetup) -> dict[str, Any]:
    """4. The end-of-run table and the result document, with the columns and entries of the extensions in use."""
    cfg, manifest = setup.cfg, setup.manifest
    kinds = [kind for kind in extensions.KINDS if any(p.extension(kind.key) is not None for p in setup.plans)]
    summary = _summary(manifest, cfg.dims, kinds)
    if setup.main:
        columns = [c for kind in kinds for c in kind.columns]
        setup.out.table("implicit-reward accuracy vs the base model, on each dimension's eval split; what each stage "
                        "cost", ["stage", *cfg.dims, "frozen s", "train s", *(header for header, _ in columns)],
                        [[f"{r['stage']} {r['dim']}", *(percent(r[d]) for d in cfg.dims), _seconds(r["frozen_seconds"]),
                          _seconds(r["train_seconds"]), *(cell(r) for _, cell in columns)] for r in summary])
    result = {"run_dir": str(setup.run.root), "manifest": str(setup.run.manifest_path), "stages": manifest["stages"],
              "summary": summary}
    for kind in kinds:
        result.update(kind.result(manifest["stages"]))
    return result


# --------------------------------------------------------------------------------------------------- a stage
def _run_stage(setup: RunSetup, plan: StagePlan) -> None:
    entry = setup.manifest["stages"][plan.index - 1]
    setup.out.info(f"stage {plan.index}/{len(setup.plans)}: {plan.dim} (beta={plan.beta}, "
                 + (f"alpha={plan.alpha}" if plan.mode == "previous" else f"weights={plan.weights}") + ")")
    started = time.perf_counter()
    data, frozen_cost = _frozen_inputs(setup, plan)
    _record_start(setup, plan, entry, data)
    # The size of what comes next (the step count a progress line will count to), before the policy loads.
    steps = plan.total_steps(plan.steps_per_epoch(len(data.train)))
    setup.out.info(f"stage {plan.index} ({plan.dim}) training: {steps} steps of {plan.batch_size} pairs"
                   f" on {len(data.train)} training pairs, then one pass over the eval splits")
    policy = _stage_policy(setup, plan, entry)
    # From here a SIGTERM / SIGHUP waits: for the end of the step under way (training saves a checkpoint and
    # stops), or, once training is over, for the stage model to be saved (spoctl.signals).
    with signals.held():
        model, final, train_seconds = _train(setup, plan, entry, policy, data)
        cost = {**frozen_cost, "train_seconds": round(train_seconds, 2)}
        for ext in data.extensions:  # what each extension did and cost (manifest and console)
            entry.update(ext.finish(train_seconds, setup.out.info, setup.out.warn))
            cost.update(ext.cost(train_seconds))
        _save_stage(setup, plan, entry, model, final, cost, time.perf_counter() - started)
        _keep_final_view(setup, plan, data)
        stop = [s for s in setup.dist.procs.gather(signals.pending()) if s is not None]
        if stop:  # every process agrees (one collective per stage); the next stage would start over anyway
            signals.acknowledge()
            raise Interrupted(f"stopped by {signal.Signals(stop[0]).name} after stage {plan.index} ({plan.dim}) was"
                              " saved", stop[0])


def _frozen_inputs(setup: RunSetup, plan: StagePlan) -> tuple[StageData, dict[str, Any]]:
    """1. Everything the stage needs from frozen models, before the policy is built: the reference and offset on
    its training pairs, and the eval views. Each frozen model also serves the later stages' needs in the same pass,
    so no frozen model is loaded twice in a run."""
    store, dims = setup.store, setup.cfg.dims
    started, scored_before = time.perf_counter(), store.pairs_scored
    store.ensure_all({k: [r for later in setup.plans[plan.index - 1:] for r in later.frozen_requests(dims).get(k, [])]
                      for k in plan.frozen_requests(dims)}, f"stage {plan.index} ({plan.dim}) frozen inputs")

    def on(split: str):
        return lambda k: store.get(k, plan.dim, split)

    data = StageData(train=store.split_pairs(plan.dim, "train"), ref_train=store.get(plan.reference, plan.dim, "train"),
                     offset_train=plan.offset(on("train")))
    for d in dims:
        ev = EvalSet(pairs=store.split_pairs(d, "eval"), base=store.get(0, d, "eval"))
        if d == plan.dim:
            ev.ref, ev.offset = store.get(plan.reference, d, "eval"), plan.offset(on("eval"))
        data.evals[d] = ev
    inputs = StageInputs(plan=plan, cfg=setup.cfg, dist=setup.dist, pad_token_id=setup.tokenizer.pad_token_id,
                         train=data.train, base_offset=data.offset_train,
                         total_steps=plan.total_steps(plan.steps_per_epoch(len(data.train))),
                         split_pairs=store.split_pairs, logps=store.get, warn=setup.warn)
    data.extensions = [ext.start(inputs) for ext in plan.extensions]
    cost = {"frozen_pass_seconds": round(time.perf_counter() - started, 2),
            "frozen_pairs_scored": store.pairs_scored - scored_before}
    return data, cost


def _record_start(setup: RunSetup, plan: StagePlan, entry: dict[str, Any], data: StageData) -> None:
    """2. The manifest says what the stage is about to do: its plan, its models and weights, its data."""
    prepared = setup.store.prepared
    entry.update({
        "status": "running", "started": entry.get("started") or now_iso(),
        **plan.manifest_entry(setup.chain.describe), "base_model": setup.chain.describe(plan.reference),
        "data_hashes": {s: prepared.data_hash(plan.dim, s) for s in ("train", "eval")},
        "pairs": {"train": len(data.train), "eval": len(data.evals[plan.dim].pairs)},
    })
    entry.pop("error", None)
    setup.write_manifest()


def _stage_policy(setup: RunSetup, plan: StagePlan, entry: dict[str, Any]) -> Any:
    """3. The policy: pi_{n-1}, plus a fresh adapter with LoRA, seeded per stage so runs repeat exactly."""
    policy = setup.store.take_model(plan.reference) or setup.store.load_model(plan.reference)
    # Seeded after loading (loading may or may not draw random numbers), so a warm or cold cache gives the same run.
    torch.manual_seed(setup.cfg.seed * 1000 + plan.index)
    if setup.cfg.lora.enabled:
        policy = wrap_lora(policy, setup.cfg)
    # Speed settings as resolved for this model (auto picks per attention kernel): what actually ran.
    cfg = setup.cfg
    entry["kernels"] = {"attention": attention_implementation(policy), "layout": resolve_layout(cfg.layout, policy),
                        "compile": cfg.compile, "gradient_checkpointing": cfg.gradient_checkpointing}
    return policy


def _train(setup: RunSetup, plan: StagePlan, entry: dict[str, Any], policy: Any,
           data: StageData) -> tuple[Any, dict[str, float], float]:
    """4. Train, logging to metrics.jsonl and the trackers; a TrainingError marks the stage failed."""
    n, dim, run = plan.index, plan.dim, setup.run
    total = plan.total_steps(plan.steps_per_epoch(len(data.train)))
    latest = checkpoint_to_resume(run, plan, total, setup.dist.procs, setup.warn)

    def log(record: dict[str, Any]) -> None:
        if setup.main:
            run.append_metrics({"stage": n, "dim": dim, "time": round(time.time(), 3), **record})
        log_metrics(setup.accelerator, record, step=record["step"])

    progress = StageProgress(setup.out, f"stage {n}/{len(setup.plans)} {dim}", enabled=setup.main)
    hooks = StageHooks(log=log, progress=progress.update, checkpoint_dir=lambda s: run.checkpoint_dir(n, dim, s),
                       latest_checkpoint=lambda: latest, out=setup.out)
    started = time.perf_counter()
    try:
        with progress:
            model, final = train_stage(accelerator=setup.accelerator, plan=plan, cfg=setup.cfg, policy=policy,
                                       data=data, pad_token_id=setup.tokenizer.pad_token_id, hooks=hooks,
                                       dist=setup.dist, scoring=setup.store.scoring)
    except TrainingError as err:
        entry.update({"status": "failed", "error": str(err)})
        setup.write_manifest()
        raise
    except (Interrupted, Stopped) as err:  # a checkpoint of the last complete step is saved: --resume continues
        entry.update({"status": "interrupted", "error": str(err.as_error() if isinstance(err, Stopped) else err)})
        setup.write_manifest()
        raise
    return model, final, time.perf_counter() - started


def _save_stage(setup: RunSetup, plan: StagePlan, entry: dict[str, Any], model: Any, final: dict[str, float],
                cost: dict[str, Any], seconds: float) -> None:
    """5. Save pi_n atomically, record it (with its files' sizes and hashes, checked whenever it is read back)."""
    n, dim, run, cfg = plan.index, plan.dim, setup.run, setup.cfg
    # FSDP: the sharded weights gathered on the main process, which writes the usual Hugging Face folder.
    state = setup.dist.full_state(model, trainable_only=cfg.lora.enabled)
    if setup.main:
        target = run.stage_model_dir(n, dim)
        weights = state.values() if state else _saved_tensors(model, lora=cfg.lora.enabled)
        with setup.out.writing(f"writing stage {n} model", tensor_bytes(weights),
                               f"{'LoRA adapters' if cfg.lora.enabled else 'weights'} and tokenizer to {target}"), \
                atomic_directory(target, replace=True) as tmp:
            sort_adapter_targets(model)
            model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state} if state else {}))
            setup.tokenizer.save_pretrained(str(tmp))
            write_lineage(tmp, base_spec=setup.chain.base_spec, stage=n, dim=dim, lora=cfg.lora.enabled,
                          earlier_adapters=[str(setup.chain.stage_model_dir(k).relative_to(run.root))
                                            for k in range(1, n)] if cfg.lora.enabled else [])
        entry.update({
            "status": "completed", "finished": now_iso(), "checkpoint": str(target.relative_to(run.root)),
            "fingerprint": stage_fingerprint(target, setup.chain.fingerprint(n - 1)), "files": folder_files(target),
            "metrics": final, "seconds": round(seconds, 1),
            # What the stage cost, split the way the method splits it: frozen passes (which, in `all` mode, grow
            # with the number of earlier stages) and training (the same at every stage).
            "cost": cost,
        })
        run.write_manifest(setup.manifest)
        # Within-stage checkpoints only serve a resume of this stage, which is now complete.
        shutil.rmtree(run.checkpoints_dir(n, dim), ignore_errors=True)
    setup.manifest.update(setup.dist.procs.broadcast(setup.manifest if setup.main else None))


def _keep_final_view(setup: RunSetup, plan: StagePlan, data: StageData) -> None:
    """The stage's last view scored the trained policy on every eval split: those are pi_n's eval log-probs, which
    `spoctl eval` and `spoctl compare` (and a later stage's eval metrics) would otherwise load pi_n to compute
    again. Cached under pi_n's fingerprint: the same weights (with LoRA, the adapters unmerged: the same model to
    float rounding, as a frozen pass split over several processes is). Not for a quantized base, whose pi_n is the
    adapters merged and quantized again: another model."""
    if setup.cfg.quantize != "none":
        return
    for dim, ev in data.evals.items():
        if ev.policy is not None:
            setup.store.cache.put(plan.index, dim, "eval", ev.policy)


def _saved_tensors(model: Any, *, lora: bool) -> list[torch.Tensor]:
    """The tensors `save_pretrained` writes: a LoRA model's adapters only, else the whole state dict."""
    if lora:
        from peft import get_peft_model_state_dict

        return list(get_peft_model_state_dict(model).values())
    return list(model.state_dict().values())


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _summary(manifest: dict[str, Any], dims: list[str], kinds: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for st in manifest["stages"]:
        if st.get("status") != "completed":
            continue
        m, cost = st.get("metrics", {}), st.get("cost", {})
        rows.append({"stage": st["index"], "dim": st["dim"],
                     **{d: m.get(f"stage{st['index']}/{d}/eval_base_rewards/accuracies") for d in dims},
                     "frozen_seconds": cost.get("frozen_pass_seconds"), "train_seconds": cost.get("train_seconds"),
                     **{k: v for kind in kinds for k, v in kind.summary(st).items()}})
    return rows
