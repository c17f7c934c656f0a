"""`spoctl align`: the stage loop. For each dimension in order: compute the frozen log-probs the stage needs,
build the SPO offset from them, train pi_n from pi_{n-1}, save pi_n, record it in the manifest.

Read `align` top to bottom: checks that can fail cheaply, the processes, the run directory, then one `_run_stage`
per stage, itself five steps (frozen inputs, manifest entry, policy, training, saving).

Under several processes (engine/distributed.py) every process runs this same code: the main process alone
writes the run directory (lock, manifest, metrics, stage models, caches) and makes every decision that depends on
files, which it shares; each process scores a share of every frozen pass and trains on a share of every batch.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import signals
from ..config import AlignConfig, dump_config
from ..console import Output
from ..errors import Interrupted, TrainingError, UsageError
from ..fsutil import atomic_directory, remove_litter
from ..models import (Quantization, check_attention_available, check_model_loadable, check_quantization_available,
                      check_vocabulary_fits, load_causal_lm, load_tokenizer, tokenizer_identity)
from ..precision import accelerate_mixed_precision, dtype_of as precision_dtype, resolve as resolve_precision
from ..rundir import RunDir, default_run_dir, now_iso
from .batching import TokenPair, pairs_from_split
from .chain import ModelChain, base_fingerprint, folder_files, stage_fingerprint, weights_fingerprint, write_lineage
from . import keep as keeping
from .checkpoint import intact_checkpoint
from .distributed import Distributed, resolve_strategy
from .frozen import FrozenLogps, LogpsCache, logps_cache_dir, score_pairs
from .logprobs import attention_implementation, check_compile_supported, compile_backbone, resolve_layout
from .plan import StagePlan, stage_plans
from .progress import StageProgress
from .reporting import check_trackers, finish_trackers, log_metrics, start_trackers
from .resume import Reopened, reopen, run_identity, run_key
from .train import EvalSet, StageData, StageHooks, train_stage, wrap_lora


class FrozenStore:
    """Frozen log-probs by (model k, dimension, split): from memory, the on-disk cache, or a no-grad pass."""

    def __init__(self, chain: ModelChain, prepared: Any, cfg: AlignConfig, dist: Distributed, pad_token_id: int,
                 cache_dir: Path, precision: str, out: Output):
        self.chain, self.prepared, self.cfg, self.dist, self.acc = chain, prepared, cfg, dist, dist.accelerator
        self.pad_token_id, self.out = pad_token_id, out
        self.cache = LogpsCache(cache_dir, prepared, chain.fingerprint, precision_dtype(precision), warn=out.warn,
                                procs=dist.procs)
        self.pairs: dict[tuple[str, str], list[TokenPair]] = {}
        self._held: tuple[int, Any] | None = None  # the last model loaded for a pass, for reuse as a policy
        self.pairs_scored = 0  # pairs run through a frozen model, all processes together (cache hits not counted)

    def split_pairs(self, dim: str, split: str) -> list[TokenPair]:
        if (dim, split) not in self.pairs:
            self.pairs[(dim, split)] = pairs_from_split(self.prepared.split(dim, split))
        return self.pairs[(dim, split)]

    def load_model(self, k: int) -> Any:
        """pi_k on this process: the model (verified once, on the main process, which shares a failure), or
        under FSDP on the other processes its skeleton on the meta device (its shards come from the main one)."""
        procs = self.dist.procs
        procs.share(lambda: self.chain.verify(k))
        if self.dist.loads_on_main_only and not procs.main:
            return self.chain.load(k, empty=True)
        return self.chain.load(k, verify=False)

    def ensure(self, k: int, requests: list[tuple[str, str]]) -> None:
        """Make sure pi_k's log-probs exist for every (dim, split); one model load and pass for all missing ones.
        Every process takes part (the decision to run the pass is the main process's, shared)."""
        missing = self.cache.lookup(k, requests)
        if not missing:
            return
        t = time.perf_counter()
        self.out.info(f"frozen pass: pi_{k} ({self.chain.describe(k)}) on {', '.join(f'{d}/{s}' for d, s in missing)}")
        self._held = None  # at most one frozen model in memory
        model = self.load_model(k)
        if self.cfg.compile:
            compile_backbone(model)
        scorer = self.dist.prepare_frozen(model, self.cfg.logprob_chunk)
        n = 0
        for dim, split in missing:
            pairs = self.split_pairs(dim, split)
            with self.acc.autocast():
                value = score_pairs(scorer, pairs, batch_size=self.cfg.frozen_batch_size,
                                    pad_token_id=self.pad_token_id, device=self.acc.device, layout=self.cfg.layout,
                                    procs=self.dist.procs, collective=self.dist.collective_forward)
            self.cache.put(k, dim, split, value)
            n += len(pairs)
        self.pairs_scored += n
        if not self.dist.fsdp:  # a sharded frozen model is no policy: FSDP prepares the policy anew
            self._held = (k, scorer.model)
        self.out.detail(f"frozen pass: {n} pairs in {time.perf_counter() - t:.1f}s")

    def take_model(self, k: int) -> Any:
        """pi_k if the last frozen pass loaded it (saves loading it again as the next policy), else None."""
        held, self._held = self._held, None
        return held[1] if held is not None and held[0] == k else None

    def get(self, k: int, dim: str, split: str) -> FrozenLogps:
        if (k, dim, split) not in self.cache.memo:
            self.ensure(k, [(dim, split)])  # every process asks for the same keys in the same order
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
    dist: Distributed

    @property
    def main(self) -> bool:
        return self.dist.procs.main

    def warn(self, message: str) -> None:
        """A warning printed once, by the main process."""
        if self.main:
            self.out.warn(message)

    def write_manifest(self) -> None:
        if self.main:
            self.run.write_manifest(self.manifest)


# --------------------------------------------------------------------------------------------------- align
def align(cfg: AlignConfig, out: Output) -> dict[str, Any]:
    # 1. Everything that can fail cheaply fails here, before a run directory exists.
    prepared, base_spec, tokenizer, plans = _check_inputs(cfg)
    try:  # the prepared data stays locked for reading (prepare --force waits) until the run is over
        # DDP or FSDP2, from the settings and the launcher's accelerate config; a contradiction fails here, before
        # any process group. What the launcher decided is part of the configuration from here on.
        strategy = resolve_strategy(cfg)
        cfg = strategy.applied_to(cfg)
        with _processes(cfg, plans, strategy) as dist:
            return _align(cfg, out, prepared, base_spec, tokenizer, plans, dist)
    finally:
        prepared.close()


@contextlib.contextmanager
def _processes(cfg: AlignConfig, plans: list[StagePlan], strategy: Any) -> Any:
    """The Accelerator (process group, device, mixed precision) and the strategy (DDP or FSDP2) at run time."""
    from accelerate import Accelerator

    precision = resolve_precision(cfg.precision)
    # project_dir: accelerate wants a logging folder for local trackers now; start_trackers points it into the run
    # directory once that is settled (a default run directory is a timestamp agreed on by every process).
    accelerator = Accelerator(mixed_precision=accelerate_mixed_precision(precision),
                              cpu=not torch.cuda.is_available(), log_with=cfg.report_to or None,
                              project_dir=str(cfg.out or "runs"))
    check_compile_supported(cfg.compile, accelerator.device.type)
    if cfg.quantize != "none" and accelerator.num_processes > 1:
        raise UsageError("quantize 4bit (QLoRA) runs on one process: several processes with a bitsandbytes base are "
                         "not tested in spoctl yet; run on one GPU, or train LoRA without --quantize")
    if strategy.fsdp and accelerator.num_processes > 1 and any(p.keep is not None for p in plans):
        # The replay runs its own micro-batches per process, which FSDP's collective forwards would need in step
        # (the constraint measurement is shared out like the eval views, and would run).
        raise UsageError("--keep runs under DDP or on one process: with distributed fsdp over several processes it "
                         "is not supported yet; use --set distributed=ddp (or an accelerate config without FSDP)")
    for plan in plans:
        if plan.batch_size % accelerator.num_processes:
            raise UsageError(f"stage {plan.index} ({plan.dim}): batch_size {plan.batch_size} must be a multiple of the "
                             f"{accelerator.num_processes} processes (--batch-size is the global batch)")
    dist = Distributed(accelerator, strategy, precision)
    try:
        yield dist
    finally:
        dist.close()


def _align(cfg: AlignConfig, out: Output, prepared: Any, base_spec: str, tokenizer: Any,
           plans: list[StagePlan], dist: Distributed) -> dict[str, Any]:
    accelerator, procs, precision = dist.accelerator, dist.procs, dist.precision
    if not procs.main:
        out = Output(json_mode=out.json_mode, quiet=True)
    data_hashes = {d: {s: prepared.data_hash(d, s) for s in ("train", "eval")} for d in prepared.dims}
    base_fp = base_fingerprint(base_spec)
    if base_fp is None:  # Hub id: hash the loaded weights once
        base_fp = procs.share(lambda: weights_fingerprint(load_causal_lm(base_spec,
                                                                         trust_remote_code=cfg.trust_remote_code)))
    identity = run_identity(cfg, plans, base_fp, data_hashes)
    key = run_key(identity)

    # 2. The run directory: checked before anything is written into it, then locked by the main process. Only the
    # main process looks at it (it may be on a filesystem the other nodes see late); what it finds is shared.
    run = RunDir(procs.broadcast(str(cfg.out or default_run_dir())))
    procs.share(run.check_usable)
    lock = run.lock() if procs.main else None
    try:
        if lock:
            procs.share(lambda: lock.acquire() and None)
            remove_litter(run.root)  # temporary files of a crashed spoctl; safe now that we hold the lock
        else:
            procs.share(lambda: None)

        def reopened_run() -> tuple[dict[str, Any] | None, Reopened]:
            existing = run.read_manifest() if run.exists() else None
            return existing, reopen(existing, identity, resume=cfg.resume, where=str(run.root),
                                    has_checkpoints=lambda i, d: run.latest_checkpoint(i, d) is not None)

        existing, reopened = procs.share(reopened_run)
        chain = None
        if existing is not None and not reopened.fresh:
            # Continuing rewrites the manifest and config.yaml: the finished stages' models the rest of the run
            # builds on are checked first, so a resume refused for a changed model leaves the run as it was.
            chain = ModelChain(base_spec, run, existing, trust_remote_code=cfg.trust_remote_code,
                               attention=cfg.attention)
            procs.share(lambda: _verify_finished_models(chain, plans, existing, cfg.dims))
        manifest = _manifest_for(cfg, run, existing, reopened, identity, key, base_spec, base_fp, precision,
                                 dist, prepared, data_hashes, out)
        chain = chain or ModelChain(base_spec, run, manifest, trust_remote_code=cfg.trust_remote_code,
                                    attention=cfg.attention)
        store = FrozenStore(chain, prepared, cfg, dist, tokenizer.pad_token_id,
                            logps_cache_dir(prepared.path, run), precision, out)
        ctx = RunContext(cfg, plans, run, manifest, chain, store, accelerator, tokenizer, out, reopened, dist)
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
    if procs.main:
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
    try:
        return (prepared, *_check_against(cfg, prepared))
    except BaseException:
        prepared.close()
        raise


def _check_against(cfg: AlignConfig, prepared: Any) -> tuple[str, Any, list[StagePlan]]:
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
    if cfg.quantize != "none":
        check_quantization_available(base_spec)
    tokenizer = load_tokenizer(base_spec, trust_remote_code=cfg.trust_remote_code)
    check_vocabulary_fits(base_spec, tokenizer, trust_remote_code=cfg.trust_remote_code)
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
    return base_spec, tokenizer, plans


def _verify_finished_models(chain: ModelChain, plans: list[StagePlan], manifest: dict[str, Any],
                            dims: list[str]) -> None:
    """Check the files of every finished stage's model: those an unfinished stage will read (as its starting
    policy pi_{n-1} or as a frozen model), and those the resume skips as done -- a stage is only done while its
    model is there as it was saved (eval and export read it next). The check eval and export make (`chain.verify`),
    made before anything is written; each model is hashed once per run either way."""
    done = {st["index"] for st in manifest["stages"] if st.get("status") == "completed"}
    needed = {k for plan in plans if plan.index not in done
              for k in (plan.index - 1, *plan.frozen_requests(dims))}
    skipped = {plan.index for plan in plans}
    for k in sorted((needed | skipped) & done):
        chain.verify(k)


def _manifest_for(cfg: AlignConfig, run: RunDir, existing: dict[str, Any] | None, reopened: Reopened,
                  identity: dict[str, Any], key: str, base_spec: str, base_fp: str, precision: str, dist: Distributed,
                  prepared: Any, data_hashes: dict[str, Any], out: Output) -> dict[str, Any]:
    """The manifest this command continues: a new one, or the existing one brought up to these settings (stages
    that start again from their beginning lose their checkpoints; appended dimensions get pending entries)."""
    if reopened.fresh:
        if existing is not None:
            out.info(f"{run.root}: the earlier attempt stopped before anything was saved; starting again here")
            if dist.procs.main:
                run.discard_contents()
        elif cfg.resume and dist.procs.main:
            out.warn(f"{run.root}: nothing to resume, starting a new run")
        manifest = run.new_manifest(run_key=key, dims=cfg.dims, base_model=base_spec,
                                    data_dir=str(Path(cfg.data).resolve()), mode=cfg.mode, lora=cfg.lora.enabled,
                                    prepared=prepared.manifest)
    else:
        manifest = existing
        for index, why in reopened.restart.items():
            st = manifest["stages"][index - 1]
            if dist.procs.main:
                out.warn(f"stage {index} ({st['dim']}) starts again from its beginning: {why}")
                shutil.rmtree(run.checkpoints_dir(index, st["dim"]), ignore_errors=True)
        for index, why in reopened.reschedule.items():
            out.info(f"stage {index}: continuing from its latest checkpoint with a new schedule ({why})")
        manifest["stages"] = run.stage_entries(cfg.dims, keep=manifest["stages"])
        manifest.update(run_key=key, dims=cfg.dims)
    quantize = (Quantization(cfg.quant_type, cfg.double_quant, precision).to_manifest()
                if cfg.quantize != "none" else None)
    manifest.update(identity=identity, base_fingerprint=base_fp, precision=precision, quantize=quantize,
                    processes=dist.procs.world, distributed=dist.strategy.to_manifest(), data_hashes=data_hashes)
    if dist.procs.main:
        # The manifest first: a folder holding it is a run (a later command can resume or restart it); a
        # config.yaml alone, left by a full disk between the two writes, would make the folder look foreign.
        run.write_manifest(manifest)
        run.write_config(dump_config(cfg, "align"))
    dist.procs.barrier()
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
    # From here a SIGTERM / SIGHUP waits: for the end of the step under way (training saves a checkpoint and
    # stops), or, once training is over, for the stage model to be saved (spoctl.signals).
    with signals.held():
        model, final, train_seconds = _train(ctx, plan, entry, policy, data)
        cost = {**frozen_cost, "train_seconds": round(train_seconds, 2)}
        if data.keep is not None:  # --keep: what it cost, and whether each constraint held (manifest and console)
            entry["keep"] = data.keep.summary()
            entry["keep_violations"] = keeping.report(data.keep, plan, train_seconds, ctx.out.info, ctx.out.warn)
            cost.update(data.keep.cost(train_seconds))
        _save_stage(ctx, plan, entry, model, final, cost, time.perf_counter() - started)
        stop = [s for s in ctx.dist.procs.gather(signals.pending()) if s is not None]
        if stop:  # every process agrees (one collective per stage); the next stage would start over anyway
            signals.acknowledge()
            raise signals.interrupted(stop[0], f"stopped by {signal.Signals(stop[0]).name} after stage {plan.index} "
                                               f"({plan.dim}) was saved")


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
    data.keep = keeping.start_keeping(plan, ctx.cfg, ctx.dist, ctx.tokenizer.pad_token_id, len(data.train),
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
    policy = ctx.store.take_model(plan.reference) or ctx.store.load_model(plan.reference)
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
    # The newest checkpoint whose files are as written (damaged ones are named, removed and skipped).
    latest = intact_checkpoint(lambda: run.checkpoints(n, dim), ctx.dist.procs, ctx.warn)
    total = plan.total_steps(plan.steps_per_epoch(len(data.train)))
    if latest and latest[0] > total:  # a resume that shortened the stage below where it had got to
        ctx.warn(f"stage {n} ({dim}): its checkpoint at step {latest[0]} is past the new total of {total} steps;"
                 " the stage starts again from its beginning")
        if ctx.main:
            shutil.rmtree(run.checkpoints_dir(n, dim), ignore_errors=True)
        ctx.dist.procs.barrier()
        latest = None
    if ctx.main:  # lines a crashed or restarted attempt logged after the point training continues from
        run.truncate_metrics_after(n, latest[0] if latest else 0)

    def log(record: dict[str, Any]) -> None:
        if ctx.main:
            run.append_metrics({"stage": n, "dim": dim, "time": round(time.time(), 3), **record})
        log_metrics(ctx.accelerator, record, step=record["step"])

    progress = StageProgress(ctx.out, f"stage {n}/{len(ctx.plans)} {dim}", enabled=ctx.main)
    hooks = StageHooks(log=log, progress=progress.update, checkpoint_dir=lambda s: run.checkpoint_dir(n, dim, s),
                       latest_checkpoint=lambda: latest)
    started = time.perf_counter()
    try:
        with progress:
            model, final = train_stage(accelerator=ctx.accelerator, plan=plan, cfg=ctx.cfg, policy=policy, data=data,
                                       pad_token_id=ctx.tokenizer.pad_token_id, hooks=hooks, dist=ctx.dist)
    except TrainingError as err:
        entry.update({"status": "failed", "error": str(err)})
        ctx.write_manifest()
        raise
    except Interrupted as err:  # a checkpoint of the last complete step is saved: --resume continues from it
        entry.update({"status": "interrupted", "error": str(err)})
        ctx.write_manifest()
        raise
    return model, final, time.perf_counter() - started


def _save_stage(ctx: RunContext, plan: StagePlan, entry: dict[str, Any], model: Any, final: dict[str, float],
                cost: dict[str, Any], seconds: float) -> None:
    """5. Save pi_n atomically, record it (with its files' sizes and hashes, checked whenever it is read back)."""
    n, dim, run, cfg = plan.index, plan.dim, ctx.run, ctx.cfg
    # FSDP: the sharded weights gathered on the main process, which writes the usual Hugging Face folder.
    state = ctx.dist.full_state(model, trainable_only=cfg.lora.enabled)
    if ctx.main:
        target = run.stage_model_dir(n, dim)
        with atomic_directory(target, replace=True) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state} if state else {}))
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
    ctx.manifest.update(ctx.dist.procs.broadcast(ctx.manifest if ctx.main else None))


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
