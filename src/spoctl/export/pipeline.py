"""`spoctl export`: one stage of a run as a standalone Hugging Face folder, verified before it appears.

Order of work: every cheap check first (the run, the stage, `--out` and what `--force` may replace, the Hub token
with `--push-to-hub`); then the model files about to be read, checked against the run's record by the engine's
model chain (`ModelChain.verify`) and their sha256 taken for the lineage; then the stage's checkpoint rebuilt by
the chain scores the check pairs; then, inside a temporary
sibling folder that is renamed into place only at the end (so a failed check or a crash leaves nothing): write the
weights and tokenizer, reload them the way a user would, compare their log-probs with the checkpoint's, then
write the model card and the lineage file (which hashes every other file). The optional Hub upload comes after
the rename: if it fails, the local export stays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ExportConfig, parse_size
from ..console import Output
from ..data.store import PREPARED_MANIFEST
from ..engine.chain import ModelChain
from ..errors import CheckFailed, UsageError
from ..fsutil import atomic_directory, read_json, write_json_atomic, write_text_atomic
from ..precision import dtype_of
from ..rundir import RUN_MANIFEST
from . import build
from .card import render_card
from .check import CheckResult, check_pairs, compare, sequence_logps
from .hub import HubAccess, check_hub_access, push_folder
from .lineage import LINEAGE_NAME, is_export_folder, lineage
from .provenance import data_sources, hub_id, input_hashes, model_name
from .stage import ExportSource, select_stage


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _protected(src: ExportSource) -> list[tuple[str, Path]]:
    """What an export reads and must never replace: the run, the base model (local), the prepared data."""
    found = [("the run directory", src.run.root)]
    if Path(src.base_spec).exists():
        found.append(("the base model", Path(src.base_spec)))
    if src.prepared_dir is not None:
        found.append(("the prepared data", src.prepared_dir))
    return found


def _guard_out(cfg: ExportConfig, src: ExportSource) -> Path:
    """The output folder. `--force` replaces only an earlier export (a folder holding our lineage file and no
    run or prepared data); never the run, its base model or its prepared data, nor anything else."""
    if cfg.out is None:
        raise UsageError("no output folder given: pass --out DIR")
    out = Path(cfg.out)
    if out.is_symlink():
        raise UsageError(f"--out {out}: is a symbolic link; give the folder it points to, or another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; choose another --out")
    target = out.resolve()
    if target == Path.cwd().resolve():
        raise UsageError(f"--out {out}: is the current folder; name a folder to write the model to")
    for name, path in _protected(src):
        p = path.resolve()
        if target == p or p.is_relative_to(target):
            raise UsageError(f"--out {out}: would overwrite {name} ({path}); choose another folder")
    if target.is_relative_to(src.run.root.resolve() / "stages"):
        raise UsageError(f"--out {out}: is inside the run's stage folders; choose another folder")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not cfg.force:
        raise UsageError(f"--out {out}: exists and is not empty; pass --force to replace an earlier export there,"
                         " or choose another --out")
    if not is_export_folder(out):
        raise UsageError(f"--out {out}: not replacing it, even with --force: it is not a folder `spoctl export`"
                         f" wrote (no valid {LINEAGE_NAME}); choose another --out")
    nested = next((p for name in {RUN_MANIFEST, PREPARED_MANIFEST} for p in out.rglob(name)), None)
    if nested is not None:
        raise UsageError(f"--out {out}: not replacing it, even with --force: it holds a spoctl run or prepared data"
                         f" ({nested}); move that away first, or choose another --out")
    return out


def _shareable(folder: Path) -> None:
    """Temporary files and folders are created private (0600/0700); a model folder is meant to be shared, so give
    it the permissions the umask would give any new file."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def export_model(cfg: ExportConfig, out: Output) -> dict[str, Any]:
    """Export one stage of the run in `cfg.run` to `cfg.out`. Raises UsageError (exit 2) or CheckFailed (exit 1)."""
    src = select_stage(cfg.run, cfg.stage, out)
    if cfg.adapter_only and not src.lora:
        raise UsageError(f"{src.run.root}: a full fine-tuning run has no adapters; drop --adapter-only")
    target = _guard_out(cfg, src)
    access: HubAccess | None = None
    if cfg.push_to_hub:
        access = check_hub_access(cfg.push_to_hub)
        out.info(f"Hub: the token of {access.user or 'this account'} can upload to {cfg.push_to_hub}")
    kind = "adapter" if cfg.adapter_only else "merged"
    dtype = cfg.dtype or ("bf16" if kind == "merged" else None)
    base_id = cfg.base_model_id or hub_id(src.base_spec)
    tokenizer = build.export_tokenizer(src, trust_remote_code=cfg.trust_remote_code)
    sources = data_sources(src)
    # The latest complete `spoctl eval` (eval/latest.json; a bare eval/report.json for runs evaluated before eval
    # history): an evaluation that stopped half-way does not replace the card's numbers.
    evaluation = src.run.latest_eval(complete=True)
    report = read_json(evaluation.report_path) if evaluation is not None else None
    out.info(f"exporting stage {src.index} ({src.dim}) of {src.run.root} as {kind} weights"
             + (f" ({dtype})" if dtype else "") + f" to {target}")
    # Every model file the export will read is checked against what the run recorded (the engine's model chain):
    # a model changed since its run stops the export here, before anything is loaded or written.
    # Exports are float models: a QLoRA run's adapters merged into the float base, so the checkpoint they are
    # checked against is the float chain of the same adapters (quantized=False), not the 4-bit one they trained on.
    chain = ModelChain(src.base_spec, src.run, src.manifest, trust_remote_code=cfg.trust_remote_code, quantized=False)
    chain.verify(src.index)
    inputs = input_hashes(src, reads_base=src.lora)

    trust = cfg.trust_remote_code
    with build.local_base(src, target.parent, trust_remote_code=trust) as base:
        # A GGUF base is read from its unpacked float copy: the same weights, verified above as the original.
        chain.base_spec = base
        pairs, source = check_pairs(src, tokenizer, cfg.check_pairs, out)
        # Four steps, each a model load or write (seconds to minutes on a large model): the checkpoint's
        # reference log-probs, the merge (or the adapters' copy), the write, and the reloaded export's check.
        with out.progress("export: reference, merge, write, numerical check", total=4, unit="steps") as bar:
            reference = _reference_logps(chain, src.index, pairs, tokenizer.pad_token_id,
                                         dtype if kind == "merged" else None)
            bar.advance()
            with atomic_directory(target, replace=True) as tmp:
                earlier: list[str] = []
                if kind == "merged":
                    merged = build.merged_model(src, base, trust_remote_code=trust)
                    bar.advance()
                    build.save_merged(merged, tokenizer, tmp, dtype=dtype,
                                      max_shard_bytes=parse_size(cfg.max_shard_size), out=out)
                    del merged
                else:
                    bar.advance()
                    earlier = build.save_adapters(src, tokenizer, tmp, base_name=model_name(src.base_spec, base_id),
                                                  dtype=dtype)
                bar.advance()
                check = _check(cfg, src, base, tmp, pairs, source, reference, tokenizer.pad_token_id, kind,
                               dtype or "fp32", earlier, out)
                bar.advance()
                write_text_atomic(tmp / "README.md", render_card(src, kind=kind, dtype=dtype or "as trained",
                                                                 base_id=base_id, check=check, earlier=earlier,
                                                                 eval_report=report, sources=sources))
                write_json_atomic(tmp / LINEAGE_NAME, lineage(src, tmp, kind=kind, dtype=dtype or "as trained",
                                                              base_id=base_id, check=check, earlier=earlier,
                                                              sources=sources, inputs=inputs))
                _shareable(tmp)
                files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
                size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    shards = [f for f in files if f.endswith(".safetensors") and "/" not in f]
    out.info(f"wrote {target}: {len(files)} files, {size / 1e6:.1f} MB; numerical check passed on {check.pairs} pairs"
             f" (max |diff| {check.max_abs_diff:.3g})")
    result = {"out": str(target), "run": str(src.run.root), "stage": src.index, "dim": src.dim, "kind": kind,
              "dtype": dtype, "files": files, "shards": len(shards), "bytes": size, "check": check.to_dict(),
              "hub": None}
    if access is not None:
        out.info(f"uploading {target} to the Hub as {access.repo}")
        result["hub"] = push_folder(target, access, private=cfg.private,
                                    message=f"spoctl export: stage {src.index} ({' -> '.join(src.dims)})")
        out.info(f"uploaded: {result['hub']}")
    return result


def _reference_logps(chain: ModelChain, k: int, pairs: list[Any], pad: int,
                     cast: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint pi_k's summed log-probs on the check pairs, in float32 and (for a merged low-precision
    export) with its parameters cast to the export dtype: (exact reference, float32 reference)."""
    device = _device()
    with build.quiet_peft():
        ref = chain.load(k).to(device)
    ref32, _ = sequence_logps(ref, pairs, pad)
    exact = ref32
    if cast is not None and cast != "fp32":
        # Parameters only: from_pretrained(dtype=...) keeps computed buffers such as rotary frequencies in float32,
        # and casting those too would make the reference, not the export, the odd one out.
        for p in ref.parameters():
            p.data = p.data.to(dtype_of(cast))
        exact = sequence_logps(ref, pairs, pad)[0]
    del ref
    return exact, ref32


def _check(cfg: ExportConfig, src: ExportSource, base: str, folder: Path, pairs: list[Any], source: str,
           reference: tuple[torch.Tensor, torch.Tensor], pad: int, kind: str, dtype: str, earlier: list[str],
           out: Output) -> CheckResult:
    """Reload what was written and score the check pairs; compare with the checkpoint's (see _reference_logps).
    Merged low-precision weights are compared with the checkpoint cast the same way (tight) and with float32
    (drift); adapters always run on a float32 base, so float32 is their exact reference."""
    from transformers import AutoModelForCausalLM

    from ..models import load_causal_lm

    if kind == "merged":
        # Exactly how a user loads it: plain transformers, safetensors, the exported dtype.
        exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype_of(dtype), use_safetensors=True,
                                                        trust_remote_code=cfg.trust_remote_code)
    else:
        base_model = load_causal_lm(base, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
        exported = build.load_exported_adapters(folder, base_model, earlier)
    got, counts = sequence_logps(exported.eval().to(_device()), pairs, pad)
    del exported
    exact, ref32 = reference
    result = compare(got, exact, ref32, counts, dtype, source)
    out.detail(f"numerical check: {json.dumps(result.to_dict())}")
    if not result.passed:
        raise CheckFailed(
            f"numerical check failed: the exported model's log-probs differ from stage {src.index}'s checkpoint "
            f"(max |diff| {result.max_abs_diff:.4g}, tolerance {result.rtol:g} relative + {result.atol:g}"
            + (f"; drift {result.drift_per_token:.4g} nats/token, limit {result.drift_limit:g}"
               if result.drift_per_token is not None else "")
            + f", on {result.pairs} pairs from {source}); nothing was written")
    return result
