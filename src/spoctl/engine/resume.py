"""Which run a run directory holds, and what a command given the same `--out` may do with it.

A run's *identity* is what its numbers depend on: the base model's fingerprint, the settings every stage shares,
and per stage its dimension, the content hashes of that dimension's data and its plan. Speed and bookkeeping
settings (layout, kernels, batch size of the frozen pass, logging, checkpoint interval, trackers, DDP or FSDP) change at most
float rounding and are not part of it.

`--resume` may change anything that does not change what *finished* stages computed:
- a finished stage whose identity (its own, an earlier stage's, or the shared settings) changed: refused, listing
  every key that differs with its old and new value;
- the unfinished stage: a longer or shorter schedule (max_steps, epochs) continues from its latest checkpoint;
  any other change starts that stage again from its beginning, and says why;
- dimensions appended after the finished ones run as new stages.
A run that stopped before anything was saved (no finished stage, no checkpoint) is simply started again, with or
without `--resume`: there is nothing to protect.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import AlignConfig
from ..errors import UsageError
from .plan import StagePlan

# Not part of a run's identity: they change speed, memory, logging or where things go, not the numbers.
RUNTIME_KEYS = {"out", "resume", "report_to", "log_every", "save_every", "eval_every", "frozen_batch_size",
                "logprob_chunk", "layout", "compile", "gradient_checkpointing", "attention", "trust_remote_code",
                "distributed", "fsdp"}
# Set per stage (in each stage's plan) or by the data's content: not compared as shared settings.
PER_STAGE_KEYS = {"dims", "data", "model", "stages", "beta", "alpha", "weights", "learning_rate", "epochs",
                  "batch_size", "max_steps", "loss", "keep", "keep_control", "replay"}
# Plan fields that only set how long the stage trains: changing them continues from the latest checkpoint.
SCHEDULE_KEYS = {"max_steps", "epochs"}


def run_identity(cfg: AlignConfig, plans: list[StagePlan], base_fingerprint: str,
                 data_hashes: dict[str, dict[str, str]]) -> dict[str, Any]:
    shared = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUNTIME_KEYS | PER_STAGE_KEYS}
    identity = {
        "base": base_fingerprint,
        "shared": shared,
        "stages": [{"dim": p.dim, "data": data_hashes[p.dim], "plan": _plan_identity(p)} for p in plans],
    }
    # As the manifest will hold it (tuples become lists): compared with a recorded identity, equal means equal.
    return json.loads(json.dumps(identity))


def _plan_identity(plan: StagePlan) -> dict[str, Any]:
    d = plan.to_manifest()
    d.pop("index")
    d.pop("dim")
    return d


def run_key(identity: dict[str, Any]) -> str:
    """A short digest of the whole identity (shown in manifests and tracker run names)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [(prefix, old, new)]


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    """'beta: 0.1 -> 0.5; seed: 0 -> 1', keys named as the configuration names them."""
    return "; ".join(f"{_key(k)}: {_short(a)} -> {_short(b)}" for k, a, b in diffs)


def _key(dotted: str) -> str:
    for prefix, name in (("shared.", ""), ("plan.", ""), ("data.", "data hash of the split "), ("base", "base model")):
        if dotted.startswith(prefix):
            return name + dotted.removeprefix(prefix)
    return dotted


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


@dataclass
class Reopened:
    """What to do with an existing run directory."""

    fresh: bool  # start a new run here (nothing worth keeping)
    restart: dict[int, str] = field(default_factory=dict)  # stage index -> why it starts from its beginning
    reschedule: dict[int, str] = field(default_factory=dict)  # stage index -> which schedule keys changed


def reopen(manifest: dict[str, Any] | None, identity: dict[str, Any], *, resume: bool, has_checkpoints: Any,
           where: str) -> Reopened:
    """Decide what a command with `identity` may do with the run recorded in `manifest` (None: no run yet).
    `has_checkpoints(index, dim)` tells whether a stage left within-stage checkpoints."""
    if manifest is None:
        return Reopened(fresh=True)
    stages = manifest.get("stages", [])
    completed = [st for st in stages if st.get("status") == "completed"]
    saved_anything = bool(completed) or any(has_checkpoints(st["index"], st["dim"]) for st in stages)
    if not saved_anything:
        return Reopened(fresh=True)
    old = manifest.get("identity")
    if old is None:  # written before runs recorded their identity (only a digest, of another layout)
        raise UsageError(f"{where}: this run was made by an earlier spoctl that recorded no settings to compare; "
                         "finish it with that version, or choose another --out")
    old, identity = read_settings_only(with_later_defaults(old, identity)), read_settings_only(identity)
    if not resume:
        same = old == identity
        raise UsageError(
            f"{where}: already holds this run; pass --resume to continue it, or choose another --out" if same else
            f"{where}: holds a different run ({describe(differences(old, identity)) or 'other settings'}); choose "
            "another --out, or pass --resume to continue it with these settings where that is possible")

    shared = differences({"base": old["base"], "shared": old["shared"]},
                         {"base": identity["base"], "shared": identity["shared"]})
    decision = Reopened(fresh=False)
    refused: list[str] = []
    for i, st in enumerate(stages):
        index = i + 1
        before = old["stages"][i] if i < len(old["stages"]) else None
        after = identity["stages"][i] if i < len(identity["stages"]) else None
        own = differences(before, after)
        earlier_changed = old["stages"][:i] != identity["stages"][:i]
        if st.get("status") == "completed":
            if shared or own or after is None:
                why = shared + own or [(f"dims[{index - 1}]", st["dim"], "<removed>")]
                refused.append(f"stage {index} ({st['dim']}) is finished and would change: {describe(why)}")
            continue
        if after is None:
            continue
        if shared or earlier_changed or (own and not _schedule_only(own)):
            if has_checkpoints(index, st["dim"]):
                decision.restart[index] = describe(shared + own) or "an earlier stage changed"
        elif own:
            decision.reschedule[index] = describe(own)
    if refused:
        raise UsageError(f"{where}: cannot resume with these settings: " + "; ".join(refused)
                         + ". Use the original settings for the finished stages, or choose another --out")
    return decision


def with_later_defaults(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` (an identity a run recorded) with each shared setting it lacks taken from `new` when `new` has that
    setting's default: a setting added to spoctl after the run was made (quantize, say) then left at its default
    means what the run did, and does not block --resume."""
    defaults = AlignConfig().model_dump(mode="json")
    missing = {k: v for k, v in new.get("shared", {}).items()
               if k not in old.get("shared", {}) and k in defaults and v == defaults[k]}
    return {**old, "shared": {**old.get("shared", {}), **missing}} if missing else old


def read_settings_only(identity: dict[str, Any]) -> dict[str, Any]:
    """`identity` without the plan settings its stages never read, so that changing one does not block a resume:
    alpha in all mode (the weights replace it) and at stage 1 (no earlier dimension to weigh; a later stage's
    weights read only the alphas of stages 2..n, losses.previous_mode_weights). Appending `harmless --alpha 1` to
    a run whose finished `helpful` stage ran with the default alpha is then the same run."""
    stages = []
    for i, st in enumerate(identity.get("stages", [])):
        plan = st.get("plan", {})
        if "alpha" in plan and (i == 0 or plan.get("mode") == "all"):
            st = {**st, "plan": {k: v for k, v in plan.items() if k != "alpha"}}
        stages.append(st)
    return {**identity, "stages": stages}


def _schedule_only(diffs: list[tuple[str, Any, Any]]) -> bool:
    return all(k.rsplit(".", 1)[-1] in SCHEDULE_KEYS for k, _, _ in diffs)


# ------------------------------------------------------------------------------------------------ applied to a run
def read_and_reopen(run: Any, identity: dict[str, Any], resume: bool) -> tuple[dict[str, Any] | None, Reopened]:
    """On the main process: the manifest a run directory holds (None: none) and what this command may do with it."""
    existing = run.read_manifest() if run.exists() else None
    return existing, reopen(existing, identity, resume=resume, where=str(run.root),
                            has_checkpoints=lambda i, d: run.latest_checkpoint(i, d) is not None)


def verify_finished_models(chain: Any, plans: list[StagePlan], manifest: dict[str, Any], dims: list[str]) -> None:
    """Check the files of every finished stage's model: those an unfinished stage will read (as its starting
    policy pi_{n-1} or as a frozen model: reference, offset, extensions), and those the resume skips as done -- a
    stage is only done while its model is there as it was saved (eval and export read it next). The check eval and
    export make (`chain.verify`), made before anything is written, so a resume refused for a changed or missing
    model leaves the run as it was; each model is hashed once per run either way."""
    done = {st["index"] for st in manifest["stages"] if st.get("status") == "completed"}
    needed = {k for plan in plans if plan.index not in done
              for k in (plan.index - 1, *plan.frozen_requests(dims))}
    skipped = {plan.index for plan in plans}
    for k in sorted((needed | skipped) & done):
        chain.verify(k)


def continue_manifest(manifest: dict[str, Any], reopened: Reopened, run: Any, dims: list[str], key: str,
                      out: Any, main: bool) -> dict[str, Any]:
    """The manifest of a run being continued, brought up to these settings: stages that start again from their
    beginning lose their checkpoints, appended dimensions get pending entries."""
    for index, why in reopened.restart.items():
        st = manifest["stages"][index - 1]
        if main:
            out.warn(f"stage {index} ({st['dim']}) starts again from its beginning: {why}")
            shutil.rmtree(run.checkpoints_dir(index, st["dim"]), ignore_errors=True)
    for index, why in reopened.reschedule.items():
        out.info(f"stage {index}: continuing from its latest checkpoint with a new schedule ({why})")
    manifest["stages"] = run.stage_entries(dims, keep=manifest["stages"])
    manifest.update(run_key=key, dims=dims)
    return manifest


def checkpoint_to_resume(run: Any, plan: StagePlan, total: int, procs: Any,
                         warn: Callable[[str], None]) -> tuple[int, Any] | None:
    """(step, folder) of the newest intact checkpoint a stage continues from, or None: it starts from step 0. A
    checkpoint past the stage's (new, shorter) total is removed; metrics lines logged after the step training
    continues from (by a crashed or restarted attempt) are dropped."""
    from .checkpoint import intact_checkpoint

    n, dim = plan.index, plan.dim
    # The newest checkpoint whose files are as written (damaged ones are named, removed and skipped).
    latest = intact_checkpoint(lambda: run.checkpoints(n, dim), procs, warn)
    if latest and latest[0] > total:  # a resume that shortened the stage below where it had got to
        warn(f"stage {n} ({dim}): its checkpoint at step {latest[0]} is past the new total of {total} steps;"
             " the stage starts again from its beginning")
        if procs.main:
            shutil.rmtree(run.checkpoints_dir(n, dim), ignore_errors=True)
        procs.barrier()
        latest = None
    if procs.main:
        run.truncate_metrics_after(n, latest[0] if latest else 0)
    return latest
