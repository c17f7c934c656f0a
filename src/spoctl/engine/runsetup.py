"""What an `align` run sets up before its first stage, and hands to every stage as one value: `RunSetup`.

In order: the checks that need no GPU time (`check_inputs`: a mistake costs seconds and leaves no run directory
behind), the processes and the strategy (`processes`), then the run directory (`open_run`): its identity, lock,
what an earlier attempt left there (engine/resume.py decides), the manifest, the model chain, the frozen store and
the trackers. Under several processes the main process alone looks at files; what it finds is shared.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import AlignConfig, dump_config
from ..console import Output
from ..errors import UsageError
from ..fsutil import remove_litter
from ..launcher import check_environment
from ..models import (Quantization, check_attention_available, check_model_loadable, check_quantization_available,
                      check_vocabulary_fits, load_causal_lm, load_tokenizer, tokenizer_identity)
from ..precision import accelerate_mixed_precision, resolve as resolve_precision
from ..rundir import RunDir, default_run_dir
from .chain import ModelChain, base_fingerprint, weights_fingerprint
from .distributed import Distributed, Strategy
from .frozen import logps_cache_dir
from .logprobs import check_compile_supported
from .plan import StagePlan, stage_plans
from .reporting import check_trackers, finish_trackers, start_trackers
from .resume import (Reopened, continue_manifest, read_and_reopen, run_identity, run_key,
                     verify_finished_models)
from .scoring import run_scoring
from .store import FrozenStore
from .strategies import start_strategy


@dataclass
class RunSetup:
    """What every stage of one `align` shares."""

    cfg: AlignConfig
    plans: list[StagePlan]
    prepared: Any
    base_spec: str
    tokenizer: Any
    dist: Distributed
    out: Output
    run: RunDir
    identity: dict[str, Any]
    key: str
    base_fp: str
    data_hashes: dict[str, dict[str, str]]
    reopened: Reopened = field(default_factory=lambda: Reopened(fresh=True))
    manifest: dict[str, Any] = field(default_factory=dict)
    chain: ModelChain | None = None
    store: FrozenStore | None = None

    @property
    def main(self) -> bool:
        return self.dist.procs.main

    @property
    def accelerator(self) -> Any:
        return self.dist.accelerator

    def warn(self, message: str) -> None:
        """A warning printed once, by the main process."""
        if self.main:
            self.out.warn(message)

    def write_manifest(self) -> None:
        if self.main:
            self.run.write_manifest(self.manifest)

    def start_manifest(self, existing: dict[str, Any] | None) -> None:
        """The manifest this command continues: a new one, or the existing one brought up to these settings;
        written (with config.yaml) before any stage runs."""
        cfg, run, procs, precision = self.cfg, self.run, self.dist.procs, self.dist.precision
        if self.reopened.fresh:
            if existing is not None:
                self.out.info(f"{run.root}: the earlier attempt stopped before anything was saved; starting again here")
                if procs.main:
                    run.discard_contents()
            elif cfg.resume and procs.main:
                self.out.warn(f"{run.root}: nothing to resume, starting a new run")
            manifest = run.new_manifest(run_key=self.key, dims=cfg.dims, base_model=self.base_spec,
                                        data_dir=str(Path(cfg.data).resolve()), mode=cfg.mode,
                                        lora=cfg.lora.enabled, prepared=self.prepared.manifest)
        else:
            manifest = continue_manifest(existing, self.reopened, run, cfg.dims, self.key, self.out, procs.main)
        quantize = (Quantization(cfg.quant_type, cfg.double_quant, precision).to_manifest()
                    if cfg.quantize != "none" else None)
        manifest.update(identity=self.identity, base_fingerprint=self.base_fp, precision=precision,
                        quantize=quantize, processes=procs.world, distributed=self.dist.strategy.to_manifest(),
                        data_hashes=self.data_hashes)
        self.manifest = manifest
        if procs.main:
            # The manifest first: a folder holding it is a run (a later command can resume or restart it); a
            # config.yaml alone, left by a full disk between the two writes, would make the folder look foreign.
            run.write_manifest(manifest)
            run.write_config(dump_config(cfg, "align"))
        procs.barrier()


# --------------------------------------------------------------------------------------------------- checks
def check_inputs(cfg: AlignConfig) -> tuple[Any, str, Any, list[StagePlan]]:
    """Dimensions, prepared data, model, tokenizer, stage sizes and trackers: every check that needs no GPU time.
    Returns (prepared data, opened for reading: close it; base model; tokenizer; stage plans)."""
    from ..data.store import load_prepared

    check_environment()  # the launcher's variables, read by accelerate when it starts the processes
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


# --------------------------------------------------------------------------------------------------- processes
@contextlib.contextmanager
def processes(cfg: AlignConfig, plans: list[StagePlan], strategy: Strategy) -> Iterator[Distributed]:
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
    for ext in (e for p in plans for e in p.extensions):  # what each stage extension can run under
        ext.check_processes(strategy.name, accelerator.num_processes)
    for plan in plans:
        if plan.batch_size % accelerator.num_processes:
            raise UsageError(f"stage {plan.index} ({plan.dim}): batch_size {plan.batch_size} must be a multiple of the "
                             f"{accelerator.num_processes} processes (--batch-size is the global batch)")
    dist = start_strategy(accelerator, strategy, precision)
    try:
        yield dist
    finally:
        dist.close()


# --------------------------------------------------------------------------------------------------- the run
@contextlib.contextmanager
def open_run(cfg: AlignConfig, out: Output, prepared: Any, base_spec: str, tokenizer: Any, plans: list[StagePlan],
             dist: Distributed) -> Iterator[RunSetup]:
    """The run directory, checked and locked by the main process, with its manifest written, its chain of models,
    frozen store and trackers; unlocked (trackers finished) when the run ends, however it ends."""
    procs = dist.procs
    if not procs.main:
        out = Output(json_mode=out.json_mode, quiet=True)
    data_hashes = {d: {s: prepared.data_hash(d, s) for s in ("train", "eval")} for d in prepared.dims}
    base_fp = base_fingerprint(base_spec)
    if base_fp is None:  # Hub id: hash the loaded weights once
        base_fp = procs.share(lambda: weights_fingerprint(load_causal_lm(base_spec,
                                                                         trust_remote_code=cfg.trust_remote_code)))
    identity = run_identity(cfg, plans, base_fp, data_hashes)
    run = RunDir(procs.broadcast(str(cfg.out or default_run_dir())))
    setup = RunSetup(cfg, plans, prepared, base_spec, tokenizer, dist, out, run, identity, run_key(identity), base_fp,
                     data_hashes)
    lock = run.lock() if procs.main else None

    def look() -> tuple[dict[str, Any] | None, Reopened]:
        """Main process: refuse an unusable --out before writing anything, lock it, remove the temporary files of a
        crashed spoctl (safe now that we hold the lock), and read what an earlier attempt left."""
        run.check_usable()
        lock.acquire()
        remove_litter(run.root)
        return read_and_reopen(run, identity, cfg.resume)

    try:
        # Only the main process looks at the run directory (it may be on a filesystem the other nodes see late).
        existing, setup.reopened = procs.share(look)
        if existing is not None and not setup.reopened.fresh:
            # Continuing rewrites the manifest and config.yaml: the finished stages' models the rest of the run
            # builds on are checked first, so a resume refused for a changed model leaves the run as it was.
            setup.chain = ModelChain(base_spec, run, existing, trust_remote_code=cfg.trust_remote_code,
                                     attention=cfg.attention)
            procs.share(lambda: verify_finished_models(setup.chain, plans, existing, cfg.dims))
        setup.start_manifest(existing)
        setup.chain = setup.chain or ModelChain(base_spec, run, setup.manifest, trust_remote_code=cfg.trust_remote_code,
                                                attention=cfg.attention)
        setup.store = FrozenStore(setup.chain, prepared, cfg, dist, run_scoring(dist, cfg, tokenizer.pad_token_id, out),
                                  logps_cache_dir(prepared.path, run), out)
        start_trackers(dist.accelerator, cfg.report_to, run, setup.key,
                       {"run_key": setup.key, **cfg.model_dump(mode="json")})
        yield setup
    finally:
        finish_trackers(dist.accelerator)
        if lock:
            lock.release()
