"""One SPO stage, top to bottom: policy, optimizer and schedule, the step loop, checkpoints, evaluation.

Read `train_stage` first; everything else in this module is a helper it calls. The loss itself comes from
`spoctl.losses`: this module only feeds it precomputed frozen log-probs and the policy's log-probs.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import losses, signals
from ..config import AlignConfig
from ..console import Output
from ..errors import Interrupted, TrainingError
from .batching import TokenPair, collate_pairs, epoch_order, local_micro_batches
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DDP, Distributed
from .extension import StageExtension
from .frozen import FrozenLogps
from .logprobs import (SequenceScorer, attention_window, batch_layout, compile_backbone, resolve_layout,
                       score_batch)
from .plan import StagePlan
from .schedule import make_scheduler
from .scoring import Scoring, run_scoring


@dataclass
class StageData:
    """Everything a stage trains on, already resolved to tensors: no frozen model is needed any more."""

    train: list[TokenPair]
    ref_train: FrozenLogps  # pi_{n-1}
    offset_train: torch.Tensor  # the SPO constant per pair (zeros at stage 1 or alpha = 0)
    evals: dict[str, "EvalSet"] = field(default_factory=dict)  # by dimension
    # Stage extensions at run time (engine/extension.py), in the order they act; none: plain SPO.
    extensions: list[StageExtension] = field(default_factory=list)


@dataclass
class EvalSet:
    pairs: list[TokenPair]
    base: FrozenLogps  # pi_0, for the forgetting view (implicit reward of everything aligned so far)
    ref: FrozenLogps | None = None  # pi_{n-1}, only for the stage's own dimension
    offset: torch.Tensor | None = None
    policy: FrozenLogps | None = None  # the policy's log-probs at the latest view (after training: pi_n's)


@dataclass
class StageHooks:
    """How the stage talks to the outside world (run directory, progress display), injected by the caller."""

    log: Callable[[dict[str, Any]], None]
    progress: Callable[[int, int, dict[str, float]], None]
    checkpoint_dir: Callable[[int], Path]
    latest_checkpoint: Callable[[], tuple[int, Path] | None]
    out: Output | None = None  # where a checkpoint write shows its size and time; None: silent


# A policy whose chosen responses became this much less likely than under the reference, per token, has diverged
# (e.g. too high a learning rate): its weights blew up even if no value is inf or NaN yet. DPO's known drift of the
# chosen log-probs is a fraction of a nat per token; e^10 per token is no preference, it is a broken model.
DIVERGED_NATS_PER_TOKEN = 10.0


def make_optimizer(model: nn.Module, plan: StagePlan, cfg: AlignConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay only on matrices (linear and embedding weights),
    never on biases and norm weights (nanoGPT's rule: decaying a norm's gain towards 0 only fights the norm)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=plan.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, **fused)


def wrap_lora(model: nn.Module, cfg: AlignConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lc = cfg.lora
    if getattr(model, "is_loaded_in_4bit", False):
        # QLoRA: norms and the head in float32, inputs that carry gradients into the frozen 4-bit layers.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules, task_type="CAUSAL_LM",
    ))


def train_stage(*, accelerator: Any, plan: StagePlan, cfg: AlignConfig, policy: nn.Module, data: StageData,
                pad_token_id: int, hooks: StageHooks,
                dist: Distributed | None = None, scoring: Scoring | None = None) -> tuple[nn.Module, dict[str, float]]:
    """Train pi_n from pi_{n-1} (`policy`, already loaded and LoRA-wrapped if asked; under FSDP, on processes
    other than the main one, its skeleton on the meta device). Returns the trained model (unwrapped; under FSDP
    still sharded, see `Distributed.full_state`) and the final evaluation metrics. `dist`: DDP when not given."""
    dist = dist or DDP(accelerator)
    scoring = scoring or run_scoring(dist, cfg, pad_token_id)
    prefix = f"stage{plan.index}/{plan.dim}"
    rank, world = accelerator.process_index, accelerator.num_processes
    lengths = [p.sort_length for p in data.train]
    steps_per_epoch = len(data.train) // plan.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"{prefix}: {len(data.train)} training pairs is fewer than one batch of {plan.batch_size};"
                            " lower batch_size or prepare more data")
    total = plan.total_steps(steps_per_epoch)
    warmup = int(cfg.warmup_ratio * total)

    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    if cfg.compile:
        compile_backbone(policy)
    layout, window = resolve_layout(cfg.layout, policy), attention_window(policy)
    scorer, optimizer = dist.prepare_training(SequenceScorer(policy, chunk_size=cfg.logprob_chunk),
                                              lambda model: make_optimizer(model, plan, cfg, dist.parameter_device))
    # Taken after preparing: FSDP replaces the parameters with their shards.
    params = [p for p in scorer.parameters() if p.requires_grad]
    scheduler = make_scheduler(getattr(optimizer, "optimizer", optimizer), cfg.scheduler, total, warmup)

    start = 0
    found = hooks.latest_checkpoint()
    if found is not None:
        meta = load_checkpoint(found[1], procs=dist.procs, scorer=dist.evaluation_scorer(scorer),
                               optimizer=optimizer, scheduler=scheduler)
        start = int(meta["step"])
        for ext in data.extensions:
            ext.load_state(meta.get(ext.key))
        accelerator.print(f"{prefix}: resuming from step {start} ({found[1]})"
                          + (f"; it was written by {meta['processes']} processes, resharded to {dist.procs.world}:"
                             " the result equals an uninterrupted run to float rounding, not bit for bit"
                             if meta.get("processes", dist.procs.world) != dist.procs.world else ""))

    def save(done: int) -> Path:
        folder = hooks.checkpoint_dir(done)
        save_checkpoint(folder, procs=dist.procs, scorer=dist.evaluation_scorer(scorer), optimizer=optimizer,
                        scheduler=scheduler, meta={"step": done, "stage": plan.index, "dim": plan.dim, "total": total,
                                                   "strategy": dist.strategy.name,
                                                   **{ext.key: ext.state() for ext in data.extensions}},
                        out=hooks.out)
        return folder

    order_cache: dict[int, list[list[int]]] = {}
    t0, tokens_seen = time.perf_counter(), 0
    for step in range(start, total):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch not in order_cache:
            order_cache.clear()
            order_cache[epoch] = epoch_order(lengths, plan.batch_size, cfg.seed + plan.index, epoch)
        global_batch = order_cache[epoch][position]
        micro = local_micro_batches(global_batch, lengths, rank, world, cfg.micro_batch_size)

        sums: dict[str, torch.Tensor] = {}
        offset_train = data.offset_train
        extra_tokens = 0.0
        for ext in data.extensions:  # each may change the offset and backward an extra loss (under no_sync)
            offset_train = ext.offset(offset_train)
            extra_tokens += ext.before_step(step, scorer)
        for j, idx in enumerate(micro):
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last else dist.no_sync(scorer)
            with sync, accelerator.autocast():
                pairs = [data.train[i] for i in idx]
                batch = collate_pairs(pairs, pad_token_id, batch_layout(layout, pairs, window)).to(accelerator.device)
                pc, pr, lc, _ = score_batch(scorer, batch)
                sel = torch.tensor(idx)
                rc = data.ref_train.chosen[sel].to(pc.device)
                rr = data.ref_train.rejected[sel].to(pc.device)
                off = offset_train[sel].to(pc.device)
                h = losses.spo_logits(plan.beta, pc.float(), pr.float(), rc, rr, off)
                per_pair = losses.preference_loss(h, plan.beta, plan.loss.type, plan.loss.label_smoothing)
                if plan.loss.sft_weight:
                    per_pair = per_pair + plan.loss.sft_weight * losses.sft_loss(pc.float(), lc)
                # Sum over pairs / global batch, times world: DDP averages over processes, so the gradient is
                # the mean over the global batch however it is split into processes and micro-batches.
                loss = per_pair.sum() * world / plan.batch_size
                accelerator.backward(loss)
            part = losses.reward_metric_sums(plan.beta, pc.float(), pr.float(), rc, rr, off)
            part["loss"] = per_pair.detach().float().sum()
            part["tokens"] = torch.tensor(float(batch.n_tokens), device=pc.device)
            # For the divergence guard: how far the chosen responses' log-probs fell below the reference's.
            part["chosen_drop"] = (rc - pc.detach().float()).sum()
            part["chosen_tokens"] = lc.sum().float()
            for k, v in part.items():
                sums[k] = sums.get(k, 0) + v.detach().float()

        # SIGTERM / SIGHUP received by any process (a signal may reach only some): counted in the same reduction,
        # so every process decides to stop after the same step.
        for signum in signals.SIGNALS:
            sums[f"stop/{signum}"] = torch.tensor(float(signals.pending() == signum), device=accelerator.device)
        keys = sorted(sums)
        reduced = accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="sum")
        totals = dict(zip(keys, reduced.tolist()))
        stopping = [signum for signum in signals.SIGNALS if totals.pop(f"stop/{signum}")]
        stop = stopping[0] if stopping else None
        # The norm is computed even without clipping (max_norm=inf): an overflowing gradient can come with a
        # finite loss, and one Adam step on it would poison every weight.
        grad_norm = dist.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        bad = [(what, v) for what, v in (("loss", totals["loss"]), ("gradient norm", grad_norm)) if not math.isfinite(v)]
        if bad:
            optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"{prefix}: the {bad[0][0]} became {bad[0][1]} at step {step + 1}; stopped before the optimizer step."
                " The last good checkpoint is intact. Try a lower learning rate or beta, or fp32 precision."
            )
        drop = totals.pop("chosen_drop") / max(totals.pop("chosen_tokens"), 1.0)
        if drop > DIVERGED_NATS_PER_TOKEN:
            optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"{prefix}: training diverged at step {step + 1}: the chosen responses are {drop:.3g} nats per token"
                f" less likely than under the reference model (more than {DIVERGED_NATS_PER_TOKEN:g} is a broken"
                f" model, not a preference). Stopped; learning rate {plan.learning_rate:g} is likely too high."
                " Start the run again with a lower --lr (checkpoints of this stage may already be diverged).")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_seen += totals.pop("tokens") + extra_tokens
        metrics = {f"{prefix}/{k}": v for k, v in losses.metrics_from_sums(totals).items()}
        elapsed = time.perf_counter() - t0
        metrics.update({f"{prefix}/learning_rate": lr, f"{prefix}/grad_norm": grad_norm,
                        f"{prefix}/epoch": (step + 1) / steps_per_epoch,
                        f"{prefix}/tokens_per_second": tokens_seen / max(elapsed, 1e-9)})
        done = step + 1
        for ext in data.extensions:
            metrics.update(ext.after_step(done, scorer))
        if done % cfg.log_every == 0 or done == total:
            hooks.log({"step": done, **metrics})
        hooks.progress(done, total, metrics)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != total:
            hooks.log({"step": done, **eval_metrics(scorer, plan, data, scoring, dist)})
        saved = cfg.save_every and done % cfg.save_every == 0 and done != total
        if saved:
            save(done)
        if stop is not None:  # the step is complete: save it (unless just saved) and stop
            folder = hooks.checkpoint_dir(done) if saved else save(done)
            signals.acknowledge()
            raise Interrupted(f"{prefix}: stopped by {signal.Signals(stop).name} after step {done} of {total}; its"
                              f" checkpoint is {folder}", stop)

    final = eval_metrics(scorer, plan, data, scoring, dist)
    hooks.log({"step": total, **final})
    return dist.trained_model(scorer), final


def eval_metrics(scorer: nn.Module, plan: StagePlan, data: StageData, scoring: Scoring,
                 dist: Distributed) -> dict[str, float]:
    """Eval metrics: TRL's set against the reference on the stage's own dimension, and for every dimension
    evaluated the implicit reward of everything aligned so far, log(pi_theta / pi_0), so forgetting shows.
    Every process scores a share of each eval split and gets all the log-probs (`scoring.Scoring`)."""
    scorer = dist.evaluation_scorer(scorer)
    was_training = scorer.training
    scorer.eval()
    out: dict[str, float] = {}
    scoring.announce(f"stage {plan.index} ({plan.dim}): forgetting view on "
                     f"{', '.join(f'{d}/eval' for d in data.evals)}: {sum(len(ev.pairs) for ev in data.evals.values())}"
                     " pairs, one pass")
    for dim, ev in data.evals.items():
        pol = ev.policy = scoring.score(scorer, ev.pairs, label=f"stage{plan.index} forgetting view {dim}/eval")
        prefix = f"stage{plan.index}/{dim}"
        if ev.ref is not None:
            m = losses.reward_metrics(plan.beta, pol.chosen, pol.rejected, ev.ref.chosen, ev.ref.rejected, ev.offset)
            out.update({f"{prefix}/eval_{k}": v for k, v in m.items()})
        base_margin = losses.log_ratio_margin(pol.chosen, pol.rejected, ev.base.chosen, ev.base.rejected)
        out[f"{prefix}/eval_base_rewards/accuracies"] = float((base_margin > 0).float().mean())
        out[f"{prefix}/eval_base_rewards/margins"] = float(base_margin.mean())
    if was_training:
        scorer.train()
    return out
