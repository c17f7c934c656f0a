"""`spoctl align`: the stage loop. For each dimension in order: compute the frozen log-probs the stage needs,
build the SPO offset from them, train pi_n from pi_{n-1}, save pi_n, record it in the manifest.

Read `align` top to bottom: checks that can fail cheaply, the run directory, then one `_run_stage` per stage,
itself five steps (frozen inputs, manifest entry, policy, training, saving).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import AlignConfig, dump_config
from ..console import Output
from ..errors import TrainingError, UsageError
from ..fsutil import atomic_directory, remove_litter
from ..models import check_attention_available, check_model_loadable, load_causal_lm, load_tokenizer, tokenizer_identity
from ..precision import accelerate_mixed_precision, dtype_of as precision_dtype, resolve as resolve_precision
from ..rundir import RunDir, default_run_dir, now_iso
from .batching import TokenPair, pairs_from_split
from .chain import ModelChain, base_fingerprint, folder_files, stage_fingerprint, weights_fingerprint, write_lineage
from .frozen import FrozenLogps, LogpsCache, compute_logps, logps_cache_dir
from . import keep as keeping
from .logprobs import attention_implementation, check_compile_supported, compile_backbone, resolve_layout
from .plan import StagePlan, stage_plans
from .progress import StageProgress
from .reporting import check_trackers, finish_trackers, log_metrics, start_trackers
from .resume import Reopened, reopen, run_identity, run_key
from .train import EvalSet, StageData, StageHooks, train_stage, wrap_lora


class FrozenStore:
    """Frozen log-probs by (model k, dimension, split): from memory, the on-disk cache, or a no-grad pass."""

    def __init__(self, chain: ModelChain, prepared: Any, cfg: AlignConfig, accelerator: Any, pad_token_id: int,
                 cache_dir: Path, precision: str, out: Output):
        self.chain, self.prepared, self.cfg, self.acc = chain, prepared, cfg, accelerator
        self.pad_token_id, self.out = pad_token_id, out
        self.cache = LogpsCache(cache_dir, prepared, chain.fingerprint, precision_dtype(precision), warn=out.warn)
        self.pairs: dict[tuple[str, str], list[TokenPair]] = {}
        self._held: tuple[int, Any] | None = None  # the last model loaded for a pass, for reuse as a policy
        self.pairs_scored = 0  # pairs run through a frozen model by this process (cache hits not counted)

    def split_pairs(self, dim: str, split: str) -> list[TokenPair]:
        if (dim, split) not in self.pairs:
            self.pairs[(dim, split)] = pairs_from_split(self.prepared.split(dim, split))
        return self.pairs[(dim, split)]

    def ensure(self, k: int, requests: list[tuple[str, str]]) -> None:
        """Make sure pi_k's log-probs exist for every (dim, split); one model load and pass for all missing ones."""
        missing = [r for r in dict.fromkeys(requests) if not self.cache.has(k, *r)]
        if missing and self.acc.is_main_process:
            t = time.perf_counter()
            self.out.info(f"frozen pass: pi_{k} ({self.chain.describe(k)}) on {', '.join(f'{d}/{s}' for d, s in missing)}")
            self._held = None  # at most one frozen model in memory
            model = self.chain.load(k).to(self.acc.device)
            if self.cfg.compile:
                compile_backbone(model)
            n = 0
            for dim, split in missing:
                pairs = self.split_pairs(dim, split)
                with self.acc.autocast():
                    value = compute_logps(model, pairs, batch_size=self.cfg.frozen_batch_size,
                                          pad_token_id=self.pad_token_id, chunk_size=self.cfg.logprob_chunk,
                                          device=self.acc.device, layout=self.cfg.layout)
                self.cache.put(k, dim, split, value)
                n += len(pairs)
            self.pairs_scored += n
            self._held = (k, model)
            self.out.detail(f"frozen pass: {n} pairs in {time.perf_counter() - t:.1f}s")
        self.acc.wait_for_everyone()

    def take_model(self, k: int) -> Any:
        """pi_k if the last frozen pass loaded it (saves loading it again as the next policy), else None."""
        held, self._held = self._held, None
        return held[1] if held is not None and held[0] == k else None

    def get(self, k: int, dim: str, split: str) -> FrozenLogps:
        if (k, dim, split) not in self.cache.memo:
            self.ensure(k, [(dim, split)])  # every process: ensure ends in a barrier
        return self.cache.get(k, dim, split)


@dataclass
class RunContext:
    """What every stage of one `align` shares."""

    cfg: AlignConfig
    plans: list[StagePlan]
    run: RunDir
    manifest: dict[str, Any]
    chain: ModelChain
    store: FrozenStore
    accelerator: Any
    tokenizer: Any
    out: Output
    reopened: Reopened

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def write_manifest(self) -> None:
        if self.main:
            self.run.write_manifest(self.manifest)


# --------------------------------------------------------------------------------------------------- align
def align(cfg: AlignConfig, out: Output) -> dict[str, Any]:
    from accelerate import Accelerator

    # 1. Everything that can fail cheaply fails here, before a run directory exists.
    prepared, base_spec, tokenizer, plans = _check_inputs(cfg)
    precision = resolve_precision(cfg.precision)
    # project_dir: accelerate wants a logging folder for local trackers now; start_trackers points it into the run
    # directory once that is settled (a default run directory is a timestamp agreed on by every process).
    accelerator = Accelerator(mixed_precision=accelerate_mixed_precision(precision),
                              cpu=not torch.cuda.is_available(), log_with=cfg.report_to or None,
                              project_dir=str(cfg.out or "runs"))
    check_compile_supported(cfg.compile, accelerator.device.type)
    for plan in plans:
        if plan.batch_size % accelerator.num_processes:
            raise UsageError(f"stage {plan.index} ({plan.dim}): batch_size {plan.batch_size} must be a multiple of the "
                             f"{accelerator.num_processes} processes (--batch-size is the global batch)")
    if not accelerator.is_main_process:
        out = Output(json_mode=out.json_mode, quiet=True)
    data_hashes = {d: {s: prepared.data_hash(d, s) for s in ("train", "eval")} for d in prepared.dims}
    base_fp = base_fingerprint(base_spec)
    if base_fp is None:  # Hub id: hash the loaded weights once
        base_fp = weights_fingerprint(load_causal_lm(base_spec, trust_remote_code=cfg.trust_remote_code))
    identity = run_identity(cfg, plans, base_fp, data_hashes)
    key = run_key(identity)

    # 2. The run directory: checked before anything is written into it, then locked by the main process.
    run = RunDir(_same_on_every_process(accelerator, str(cfg.out or default_run_dir())))
    run.check_usable()
    lock = run.lock() if accelerator.is_main_process else None
    if lock:
        lock.acquire()
        remove_litter(run.root)  # temporary files of a crashed spoctl; safe now that we hold the lock
    try:
        existing = run.read_manifest() if run.exists() else None
        reopened = reopen(existing, identity, resume=cfg.resume, where=str(run.root),
                          has_checkpoints=lambda i, d: run.latest_checkpoint(i, d) is not None)
        accelerator.wait_for_everyone()
        manifest = _manifest_for(cfg, run, existing, reopened, identity, key, base_spec, base_fp, precision,
                                 accelerator, prepared, data_hashes, out)
        chain = ModelChain(base_spec, run, manifest, trust_remote_code=cfg.trust_remote_code, attention=cfg.attention)
        store = FrozenStore(chain, prepared, cfg, accelerator, tokenizer.pad_token_id,
                            logps_cache_dir(prepared.path, run), precision, out)
        ctx = RunContext(cfg, plans, run, manifest, chain, store, accelerator, tokenizer, out, reopened)
        start_trackers(accelerator, cfg.report_to, run, key, {"run_key": key, **cfg.model_dump(mode="json")})

        # 3. One stage per dimension.
        for plan in plans:
            if manifest["stages"][plan.index - 1]["status"] == "completed":
                out.info(f"stage {plan.index}/{len(plans)} ({plan.dim}): already completed, skipped")
                continue
            _run_stage(ctx, plan)
    finally:
        finish_trackers(accelerator)
        if lock:
            lock.release()
    summary = _summary(manifest, cfg.dims)
    keeps = any(p.keep is not None for p in plans)
    if accelerator.is_main_process:
        extra = ["kept: margin vs bound, multiplier", "keep s"] if keeps else []
        out.table("implicit-reward accuracy vs the base model, on each dimension's eval split; what each stage cost",
                  ["stage", *cfg.dims, "frozen s", "train s", *extra],
                  [[f"{r['stage']} {r['dim']}", *(r[d] for d in cfg.dims), r["frozen_seconds"], r["train_seconds"],
                    *([keeping.table_cell(r.get("keep")), r.get("keep_seconds", "")] if keeps else [])] for r in summary])
    result = {"run_dir": str(run.root), "manifest": str(run.manifest_path), "stages": manifest["stages"],
              "summary": summary}
    if keeps:  # constraints that ended violated, every stage's (empty: all held)
        result["keep_violations"] = [v for st in manifest["stages"] for v in st.get("keep_violations", [])]
    return result


def _check_inputs(cfg: AlignConfig) -> tuple[Any, str, Any, list[StagePlan]]:
    """Dimensions, prepared data, model, tokenizer, stage sizes and trackers: every check that needs no GPU time,
    so a mistake costs seconds and leaves no run directory behind."""
    from ..data.store import load_prepared

    if not cfg.dims:
        raise UsageError("no dimensions given: pass --dims helpful,harmless (the stage order)")
    if cfg.data is None:
        raise UsageError("no prepared data given: pass --data PREPARED_DIR (made by `spoctl prepare`)")
    prepared = load_prepared(cfg.data)
    for d in cfg.dims:
        if d not in prepared.dims:
            raise UsageError(f"{cfg.data}: prepared data has no dimension '{d}' (it has: {', '.join(prepared.dims)});"
                             f" run `spoctl prepare` with --data {d}=SOURCE, or fix --dims")
    check_attention_available(cfg.attention)
    check_trackers(cfg.report_to)
    base_spec = cfg.model or prepared.model
    if not base_spec:
        raise UsageError("no model given: pass --model (a local folder, .gguf file or Hub id)")
    check_model_loadable(base_spec, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(base_spec, trust_remote_code=cfg.trust_remote_code)
    prep_tok = (prepared.manifest.get("tokenizer") or {}).get("sha256")
    if prep_tok and tokenizer_identity(tokenizer, base_spec)["sha256"] != prep_tok:
        raise UsageError(f"{cfg.data} was prepared with another tokenizer than {base_spec}'s; "
                         "prepare the data again with --model " + base_spec)
    plans = stage_plans(cfg)
    for plan in plans:
        pairs = len(prepared.split(plan.dim, "train"))
        if plan.steps_per_epoch(pairs) == 0:
            raise UsageError(f"stage {plan.index} ({plan.dim}): {pairs} training pairs is fewer than one batch of "
                             f"{plan.batch_size}; lower --batch-size (or stages.{plan.dim}.batch_size) to at most "
                             f"{pairs}, or prepare more data")
    return prepared, base_spec, tokenizer, plans


def _manifest_for(cfg: AlignConfig, run: RunDir, existing: dict[str, Any] | None, reopened: Reopened,
                  identity: dict[str, Any], key: str, base_spec: str, base_fp: str, precision: str, accelerator: Any,
                  prepared: Any, data_hashes: dict[str, Any], out: Output) -> dict[str, Any]:
    """The manifest this command continues: a new one, or the existing one brought up to these settings (stages
    that start again from their beginning lose their checkpoints; appended dimensions get pending entries)."""
    if reopened.fresh:
        if existing is not None:
            out.info(f"{run.root}: the earlier attempt stopped before anything was saved; starting again here")
            if accelerator.is_main_process:
                run.discard_contents()
        elif cfg.resume:
            out.warn(f"{run.root}: nothing to resume, starting a new run")
        manifest = run.new_manifest(run_key=key, dims=cfg.dims, base_model=base_spec,
                                    data_dir=str(Path(cfg.data).resolve()), mode=cfg.mode, lora=cfg.lora.enabled,
                                    prepared=prepared.manifest)
    else:
        manifest = existing
        for index, why in reopened.restart.items():
            st = manifest["stages"][index - 1]
            out.warn(f"stage {index} ({st['dim']}) starts again from its beginning: {why}")
            if accelerator.is_main_process:
                shutil.rmtree(run.checkpoints_dir(index, st["dim"]), ignore_errors=True)
        for index, why in reopened.reschedule.items():
            out.info(f"stage {index}: continuing from its latest checkpoint with a new schedule ({why})")
        manifest["stages"] = run.stage_entries(cfg.dims, keep=manifest["stages"])
        manifest.update(run_key=key, dims=cfg.dims)
    manifest.update(identity=identity, base_fingerprint=base_fp, precision=precision,
                    processes=accelerator.num_processes, data_hashes=data_hashes)
    if accelerator.is_main_process:
        run.write_config(dump_config(cfg, "align"))
        run.write_manifest(manifest)
    accelerator.wait_for_everyone()
    return manifest


# --------------------------------------------------------------------------------------------------- a stage
def _run_stage(ctx: RunContext, plan: StagePlan) -> None:
    entry = ctx.manifest["stages"][plan.index - 1]
    ctx.out.info(f"stage {plan.index}/{len(ctx.plans)}: {plan.dim} (beta={plan.beta}, "
                 + (f"alpha={plan.alpha}" if plan.mode == "previous" else f"weights={plan.weights}") + ")")
    started = time.perf_counter()
    data, frozen_cost = _frozen_inputs(ctx, plan)
    _record_start(ctx, plan, entry, data)
    policy = _stage_policy(ctx, plan, entry)
    model, final, train_seconds = _train(ctx, plan, entry, policy, data)
    cost = {**frozen_cost, "train_seconds": round(train_seconds, 2)}
    if data.keep is not None:  # --keep: what it cost, and whether each constraint held (manifest and console)
        entry["keep"] = data.keep.summary()
        entry["keep_violations"] = keeping.report(data.keep, plan, train_seconds, ctx.out.info, ctx.out.warn)
        cost.update(data.keep.cost(train_seconds))
    _save_stage(ctx, plan, entry, model, final, cost, time.perf_counter() - started)


def _frozen_inputs(ctx: RunContext, plan: StagePlan) -> tuple[StageData, dict[str, Any]]:
    """1. Everything the stage needs from frozen models, before the policy is built: the reference and offset on
    its training pairs, and the eval views. Each frozen model also serves the later stages' needs in the same pass,
    so no frozen model is loaded twice in a run."""
    store, dims = ctx.store, ctx.cfg.dims
    started, scored_before = time.perf_counter(), store.pairs_scored
    for k in sorted(plan.frozen_requests(dims)):
        store.ensure(k, [r for later in ctx.plans[plan.index - 1:] for r in later.frozen_requests(dims).get(k, [])])

    def on(split: str):
        return lambda k: store.get(k, plan.dim, split)

    data = StageData(train=store.split_pairs(plan.dim, "train"), ref_train=store.get(plan.reference, plan.dim, "train"),
                     offset_train=plan.offset(on("train")))
    for d in dims:
        ev = EvalSet(pairs=store.split_pairs(d, "eval"), base=store.get(0, d, "eval"))
        if d == plan.dim:
            ev.ref, ev.offset = store.get(plan.reference, d, "eval"), plan.offset(on("eval"))
        data.evals[d] = ev
    data.keep = keeping.start_keeping(plan, ctx.cfg, ctx.accelerator, ctx.tokenizer.pad_token_id, len(data.train),
                                      data.offset_train, store.split_pairs, store.get, ctx.out.warn)
    cost = {"frozen_pass_seconds": round(time.perf_counter() - started, 2),
            "frozen_pairs_scored": store.pairs_scored - scored_before}
    return data, cost


def _record_start(ctx: RunContext, plan: StagePlan, entry: dict[str, Any], data: StageData) -> None:
    """2. The manifest says what the stage is about to do: its plan, its models and weights, its data."""
    prepared = ctx.store.prepared
    entry.update({
        "status": "running", "started": entry.get("started") or now_iso(),
        **plan.manifest_entry(ctx.chain.describe), "base_model": ctx.chain.describe(plan.reference),
        "data_hashes": {s: prepared.data_hash(plan.dim, s) for s in ("train", "eval")},
        "pairs": {"train": len(data.train), "eval": len(data.evals[plan.dim].pairs)},
    })
    entry.pop("error", None)
    ctx.write_manifest()


def _stage_policy(ctx: RunContext, plan: StagePlan, entry: dict[str, Any]) -> Any:
    """3. The policy: pi_{n-1}, plus a fresh adapter with LoRA, seeded per stage so runs repeat exactly."""
    policy = ctx.store.take_model(plan.reference) or ctx.chain.load(plan.reference)
    # Seeded after loading (loading may or may not draw random numbers), so a warm or cold cache gives the same run.
    torch.manual_seed(ctx.cfg.seed * 1000 + plan.index)
    if ctx.cfg.lora.enabled:
        policy = wrap_lora(policy, ctx.cfg)
    # Speed settings as resolved for this model (auto picks per attention kernel): what actually ran.
    entry["kernels"] = {"attention": attention_implementation(policy), "layout": resolve_layout(ctx.cfg.layout, policy),
                        "compile": ctx.cfg.compile, "gradient_checkpointing": ctx.cfg.gradient_checkpointing}
    return policy


def _train(ctx: RunContext, plan: StagePlan, entry: dict[str, Any], policy: Any,
           data: StageData) -> tuple[Any, dict[str, float], float]:
    """4. Train, logging to metrics.jsonl and the trackers; a TrainingError marks the stage failed."""
    n, dim, run = plan.index, plan.dim, ctx.run
    latest = run.latest_checkpoint(n, dim)
    total = plan.total_steps(plan.steps_per_epoch(len(data.train)))
    if latest and latest[0] > total:  # a resume that shortened the stage below where it had got to
        ctx.out.warn(f"stage {n} ({dim}): its checkpoint at step {latest[0]} is past the new total of {total} steps;"
                     " the stage starts again from its beginning")
        if ctx.main:
            shutil.rmtree(run.checkpoints_dir(n, dim), ignore_errors=True)
        ctx.accelerator.wait_for_everyone()
        latest = None
    if ctx.main:  # lines a crashed or restarted attempt logged after the point training continues from
        run.truncate_metrics_after(n, latest[0] if latest else 0)

    def log(record: dict[str, Any]) -> None:
        if ctx.main:
            run.append_metrics({"stage": n, "dim": dim, "time": round(time.time(), 3), **record})
        log_metrics(ctx.accelerator, record, step=record["step"])

    progress = StageProgress(ctx.out, f"stage {n}/{len(ctx.plans)} {dim}", enabled=ctx.main)
    hooks = StageHooks(log=log, progress=progress.update, checkpoint_dir=lambda s: run.checkpoint_dir(n, dim, s),
                       latest_checkpoint=lambda: run.latest_checkpoint(n, dim))
    started = time.perf_counter()
    try:
        with progress:
            model, final = train_stage(accelerator=ctx.accelerator, plan=plan, cfg=ctx.cfg, policy=policy, data=data,
                                       pad_token_id=ctx.tokenizer.pad_token_id, hooks=hooks)
    except TrainingError as err:
        entry.update({"status": "failed", "error": str(err)})
        ctx.write_manifest()
        raise
    return model, final, time.perf_counter() - started


def _save_stage(ctx: RunContext, plan: StagePlan, entry: dict[str, Any], model: Any, final: dict[str, float],
                cost: dict[str, Any], seconds: float) -> None:
    """5. Save pi_n atomically, record it (with its files' sizes and hashes, checked whenever it is read back)."""
    n, dim, run, cfg = plan.index, plan.dim, ctx.run, ctx.cfg
    if ctx.main:
        target = run.stage_model_dir(n, dim)
        with atomic_directory(target, replace=True) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            ctx.tokenizer.save_pretrained(str(tmp))
            write_lineage(tmp, base_spec=ctx.chain.base_spec, stage=n, dim=dim, lora=cfg.lora.enabled,
                          earlier_adapters=[str(ctx.chain.stage_model_dir(k).relative_to(run.root)) for k in range(1, n)]
                          if cfg.lora.enabled else [])
        entry.update({
            "status": "completed", "finished": now_iso(), "checkpoint": str(target.relative_to(run.root)),
            "fingerprint": stage_fingerprint(target, ctx.chain.fingerprint(n - 1)), "files": folder_files(target),
            "metrics": final, "seconds": round(seconds, 1),
            # What the stage cost, split the way the method splits it: frozen passes (which, in `all` mode, grow
            # with the number of earlier stages) and training (the same at every stage).
            "cost": cost,
        })
        run.write_manifest(ctx.manifest)
        # Within-stage checkpoints only serve a resume of this stage, which is now complete.
        shutil.rmtree(run.checkpoints_dir(n, dim), ignore_errors=True)
    ctx.accelerator.wait_for_everyone()
    if not ctx.main:
        ctx.manifest.update(run.read_manifest())


def _same_on_every_process(accelerator: Any, value: str) -> str:
    """The main process's value (a default run directory is a timestamp, which processes could see differently)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _summary(manifest: dict[str, Any], dims: list[str]) -> list[dict[str, Any]]:
    rows = []
    for st in manifest["stages"]:
        if st.get("status") != "completed":
            continue
        m, cost = st.get("metrics", {}), st.get("cost", {})
        rows.append({"stage": st["index"], "dim": st["dim"],
                     **{d: m.get(f"stage{st['index']}/{d}/eval_base_rewards/accuracies") for d in dims},
                     "frozen_seconds": cost.get("frozen_pass_seconds"), "train_seconds": cost.get("train_seconds"),
                     **({"keep": {d: k["final"] | {"threshold": k["threshold"]} for d, k in st["keep"].items()},
                         "keep_seconds": cost.get("keep_seconds")} if "keep" in st else {})})
    return rows
