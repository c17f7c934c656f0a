"""`spoctl align`: the stage loop. For each dimension in order: compute the frozen log-probs the stage needs,
build the SPO offset from them, train pi_n from pi_{n-1}, save pi_n, record it in the manifest.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .. import losses
from ..config import AlignConfig, dump_config
from ..console import Output
from ..errors import TrainingError, UsageError
from ..fsutil import atomic_directory
from ..precision import accelerate_mixed_precision, dtype_of as precision_dtype, resolve as resolve_precision
from ..models import check_attention_available, load_causal_lm, load_tokenizer
from ..rundir import RunDir, default_run_dir, now_iso
from .batching import TokenPair, pairs_from_split
from .frozen import FrozenLogps, LogpsCache, compute_logps, logps_cache_dir
from .chain import ModelChain, base_fingerprint, stage_fingerprint, weights_fingerprint, write_lineage
from .logprobs import attention_implementation, compile_backbone, resolve_layout
from .plan import StagePlan, run_key, stage_plans
from .progress import StageProgress
from .reporting import MetricSinks
from .train import EvalSet, StageData, StageHooks, train_stage, wrap_lora


class FrozenStore:
    """Frozen log-probs by (model k, dimension, split): from memory, the on-disk cache, or a no-grad pass."""

    def __init__(self, chain: ModelChain, prepared: Any, cfg: AlignConfig, accelerator: Any, pad_token_id: int,
                 cache_dir: Path, precision: str, out: Output):
        self.chain, self.prepared, self.cfg, self.acc = chain, prepared, cfg, accelerator
        self.pad_token_id, self.out = pad_token_id, out
        self.cache = LogpsCache(cache_dir, prepared, chain.fingerprint, precision_dtype(precision))
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


def stage_offset(plan: StagePlan, plans: list[StagePlan], store: FrozenStore, dim: str, split: str) -> torch.Tensor:
    """The SPO constant of stage n on (dim, split): zero at stage 1; §6 previous or all mode after."""
    n = plan.index
    ref = store.get(n - 1, dim, split)
    if n == 1:
        return torch.zeros_like(ref.chosen)
    if plan.mode == "previous":
        if plan.alpha == 0:
            return torch.zeros_like(ref.chosen)
        prev2 = store.get(n - 2, dim, split)
        return losses.spo_offset_previous(plan.alpha, plans[n - 2].beta, ref.chosen, ref.rejected, prev2.chosen,
                                          prev2.rejected)
    logps = [store.get(k, dim, split) for k in range(n)]
    margins = losses.implicit_reward_margins(
        betas=[p.beta for p in plans[: n - 1]],
        weights=[[p.weights[d] for d in [q.dim for q in plans[: p.index - 1]]] for p in plans[: n - 1]],
        logps_chosen=[x.chosen for x in logps], logps_rejected=[x.rejected for x in logps])
    return losses.spo_offset_all([plan.weights[q.dim] for q in plans[: n - 1]], margins)


def frozen_requests(plan: StagePlan, dims: list[str]) -> dict[int, list[tuple[str, str]]]:
    """Which frozen models stage n needs, on which data: for the loss, the offset, and the eval views."""
    n, dim = plan.index, plan.dim
    need: dict[int, list[tuple[str, str]]] = {n - 1: [(dim, "train"), (dim, "eval")]}
    if n >= 2 and plan.mode == "previous" and plan.alpha != 0:
        need.setdefault(n - 2, []).extend([(dim, "train"), (dim, "eval")])
    if plan.mode == "all":
        for k in range(n - 1):
            need.setdefault(k, []).extend([(dim, "train"), (dim, "eval")])
    need.setdefault(0, []).extend((d, "eval") for d in dims)
    return need


def _open_run(cfg: AlignConfig, run: RunDir, key: str, out: Output) -> dict[str, Any] | None:
    """The existing manifest when resuming; None for a fresh run. Refuses to mix runs."""
    if not run.exists():
        if run.root.exists() and any(p.name != ".lock" for p in run.root.iterdir()):
            raise UsageError(f"{run.root}: exists and is not empty, but is not a spoctl run; choose another --out")
        if cfg.resume:
            out.warn(f"{run.root}: nothing to resume, starting a new run")
        return None
    manifest = run.read_manifest()
    if manifest.get("run_key") != key:
        raise UsageError(
            f"{run.root}: this run directory belongs to a different run (other dimensions, data, model or settings);"
            " choose another --out, or repeat the exact original command with --resume")
    if not cfg.resume:
        raise UsageError(f"{run.root}: already holds this run; pass --resume to continue it, or choose another --out")
    return manifest


def align(cfg: AlignConfig, out: Output) -> dict[str, Any]:
    from accelerate import Accelerator

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
    base_spec = cfg.model or prepared.model
    if not base_spec:
        raise UsageError("no model given: pass --model (a local folder, .gguf file or Hub id)")
    tokenizer = load_tokenizer(base_spec, trust_remote_code=cfg.trust_remote_code)
    prep_tok = (prepared.manifest.get("tokenizer") or {}).get("sha256")
    from ..models import tokenizer_identity

    if prep_tok and tokenizer_identity(tokenizer, base_spec)["sha256"] != prep_tok:
        raise UsageError(f"{cfg.data} was prepared with another tokenizer than {base_spec}'s; "
                         "prepare the data again with --model " + base_spec)

    precision = resolve_precision(cfg.precision)
    accelerator = Accelerator(mixed_precision=accelerate_mixed_precision(precision), cpu=not torch.cuda.is_available())
    if not accelerator.is_main_process:
        out = Output(json_mode=out.json_mode, quiet=True)
    run = RunDir(_same_on_every_process(accelerator, str(cfg.out or default_run_dir())))
    data_hashes = {d: {s: prepared.data_hash(d, s) for s in ("train", "eval")} for d in prepared.dims}
    base_fp = base_fingerprint(base_spec)
    if base_fp is None:  # Hub id: hash the loaded weights once
        base_fp = weights_fingerprint(load_causal_lm(base_spec, trust_remote_code=cfg.trust_remote_code))
    key = run_key(cfg, base_fp, data_hashes)
    plans = stage_plans(cfg)

    lock = run.lock() if accelerator.is_main_process else None
    sinks: MetricSinks | None = None
    if lock:
        lock.acquire()
    try:
        manifest = _open_run(cfg, run, key, out)
        accelerator.wait_for_everyone()
        if manifest is None:
            manifest = run.new_manifest(run_key=key, dims=cfg.dims, base_model=base_spec, data_dir=str(Path(cfg.data).resolve()),
                                        mode=cfg.mode, lora=cfg.lora.enabled, prepared=prepared.manifest)
            manifest["base_fingerprint"] = base_fp
            manifest["precision"] = precision
            manifest["processes"] = accelerator.num_processes
            manifest["data_hashes"] = data_hashes
            if accelerator.is_main_process:
                run.write_config(dump_config(cfg, "align"))
                run.write_manifest(manifest)
        accelerator.wait_for_everyone()
        cache_dir = logps_cache_dir(prepared.path, run)
        chain = ModelChain(base_spec, run, manifest, trust_remote_code=cfg.trust_remote_code, attention=cfg.attention)
        store = FrozenStore(chain, prepared, cfg, accelerator, tokenizer.pad_token_id, cache_dir, precision, out)
        sinks = (MetricSinks(cfg.report_to, run, {"run_key": key, **cfg.model_dump(mode="json")})
                 if accelerator.is_main_process else None)

        for plan in plans:
            entry = manifest["stages"][plan.index - 1]
            if entry["status"] == "completed":
                out.info(f"stage {plan.index}/{len(plans)} ({plan.dim}): already completed, skipped")
                continue
            _run_stage(plan, plans, cfg, manifest, entry, run, chain, store, accelerator, tokenizer, out, sinks)
    finally:
        if sinks is not None:
            sinks.close()
        if lock:
            lock.release()
    summary = _summary(manifest, cfg.dims)
    if accelerator.is_main_process:
        out.table("implicit-reward accuracy vs the base model, on each dimension's eval split; what each stage cost",
                  ["stage", *cfg.dims, "frozen s", "train s"],
                  [[f"{r['stage']} {r['dim']}", *(r[d] for d in cfg.dims), r["frozen_seconds"], r["train_seconds"]]
                   for r in summary])
    return {"run_dir": str(run.root), "manifest": str(run.manifest_path), "stages": manifest["stages"],
            "summary": summary}


def _run_stage(plan: StagePlan, plans: list[StagePlan], cfg: AlignConfig, manifest: dict[str, Any],
               entry: dict[str, Any], run: RunDir, chain: ModelChain, store: FrozenStore, accelerator: Any,
               tokenizer: Any, out: Output, sinks: MetricSinks | None) -> None:
    n, dim = plan.index, plan.dim
    main = accelerator.is_main_process
    started, scored_before = time.perf_counter(), store.pairs_scored
    out.info(f"stage {n}/{len(plans)}: {dim} (beta={plan.beta}, "
             + (f"alpha={plan.alpha}" if plan.mode == "previous" else f"weights={plan.weights}") + ")")

    # 1. Frozen passes: everything the stage needs from frozen models, before the policy is built. Each model
    #    also serves the later stages' needs in the same pass, so no frozen model is loaded twice in a run.
    for k in sorted(frozen_requests(plan, cfg.dims)):
        store.ensure(k, [r for later in plans[n - 1:] for r in frozen_requests(later, cfg.dims).get(k, [])])
    ref_train = store.get(n - 1, dim, "train")
    frozen_seconds, frozen_pairs = time.perf_counter() - started, store.pairs_scored - scored_before
    data = StageData(train=store.split_pairs(dim, "train"), ref_train=ref_train,
                     offset_train=stage_offset(plan, plans, store, dim, "train"))
    for d in cfg.dims:
        ev = EvalSet(pairs=store.split_pairs(d, "eval"), base=store.get(0, d, "eval"))
        if d == dim:
            ev.ref = store.get(n - 1, d, "eval")
            ev.offset = stage_offset(plan, plans, store, d, "eval")
        data.evals[d] = ev

    entry.update({
        "status": "running", "started": entry.get("started") or now_iso(), "plan": plan.to_manifest(),
        "base_model": chain.describe(n - 1), "reference_model": chain.describe(n - 1),
        "offset_models": ([chain.describe(n - 2)] if plan.mode == "previous" and n >= 2 and plan.alpha
                          else [chain.describe(k) for k in range(n - 1)] if plan.mode == "all" else []),
        "weights": (dict(zip(cfg.dims[: n - 1], losses.previous_mode_weights([p.alpha for p in plans[:n]], n)))
                    if plan.mode == "previous" else plan.weights),
        "data_hashes": {"train": store.prepared.data_hash(dim, "train"), "eval": store.prepared.data_hash(dim, "eval")},
        "pairs": {"train": len(data.train), "eval": len(data.evals[dim].pairs)},
    })
    if main:
        run.write_manifest(manifest)

    # 2. The policy: pi_{n-1}, plus a fresh adapter with LoRA; seeded per stage so runs repeat exactly.
    policy = store.take_model(n - 1) or chain.load(n - 1)
    # Seeded after loading (loading may or may not draw random numbers), so a warm or cold cache gives the same run.
    torch.manual_seed(cfg.seed * 1000 + n)
    if cfg.lora.enabled:
        policy = wrap_lora(policy, cfg)
    # Speed settings as resolved for this model (auto picks per attention kernel): what actually ran.
    entry["kernels"] = {"attention": attention_implementation(policy), "layout": resolve_layout(cfg.layout, policy),
                        "compile": cfg.compile, "gradient_checkpointing": cfg.gradient_checkpointing}
    latest = run.latest_checkpoint(n, dim)
    if latest and main:
        run.truncate_metrics_after(n, latest[0])

    progress = StageProgress(out, f"stage {n}/{len(plans)} {dim}", enabled=main)

    def log(record: dict[str, Any]) -> None:
        if main:
            run.append_metrics({"stage": n, "dim": dim, "time": round(time.time(), 3), **record})
            if sinks is not None:
                sinks.log(record, step=record["step"])

    hooks = StageHooks(log=log, progress=progress.update, checkpoint_dir=lambda s: run.checkpoint_dir(n, dim, s),
                       latest_checkpoint=lambda: run.latest_checkpoint(n, dim))
    train_started = time.perf_counter()
    try:
        with progress:
            model, final = train_stage(accelerator=accelerator, plan=plan, cfg=cfg, policy=policy, data=data,
                                       pad_token_id=tokenizer.pad_token_id, hooks=hooks)
    except TrainingError as err:
        entry.update({"status": "failed", "error": str(err)})
        if main:
            run.write_manifest(manifest)
        raise
    train_seconds = time.perf_counter() - train_started

    # 3. Save pi_n atomically and record it.
    if main:
        target = run.stage_model_dir(n, dim)
        with atomic_directory(target, replace=True) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            write_lineage(tmp, base_spec=chain.base_spec, stage=n, dim=dim, lora=cfg.lora.enabled,
                          earlier_adapters=[str(chain.stage_model_dir(k).relative_to(run.root)) for k in range(1, n)]
                          if cfg.lora.enabled else [])
        entry.update({
            "status": "completed", "finished": now_iso(), "checkpoint": str(target.relative_to(run.root)),
            "fingerprint": stage_fingerprint(target, chain.fingerprint(n - 1)),
            "metrics": final, "seconds": round(time.perf_counter() - started, 1),
            # What the stage cost, split the way the method splits it: frozen passes (which, in `all` mode, grow
            # with the number of earlier stages) and training (the same at every stage).
            "cost": {"frozen_pass_seconds": round(frozen_seconds, 2), "frozen_pairs_scored": frozen_pairs,
                     "train_seconds": round(train_seconds, 2)},
        })
        run.write_manifest(manifest)
        # Within-stage checkpoints only serve a resume of this stage, which is now complete.
        shutil.rmtree(run.checkpoints_dir(n, dim), ignore_errors=True)
    accelerator.wait_for_everyone()
    if not main:
        manifest.update(run.read_manifest())
    del policy, model


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
                     "frozen_seconds": cost.get("frozen_pass_seconds"), "train_seconds": cost.get("train_seconds")})
    return rows
