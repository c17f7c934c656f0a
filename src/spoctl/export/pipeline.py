"""`spoctl export`: one stage of a run as a standalone Hugging Face folder, verified before it appears.

Order of work, all inside a temporary sibling folder that is renamed into place only at the end (so a failed
check or a crash leaves nothing): write the weights and tokenizer, reload them the way a user would, compare
their log-probs with the checkpoint's, then write the model card and the lineage file (which hashes every other
file). The optional Hub upload comes after the rename: if it fails, the local export stays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ExportConfig, parse_size
from ..console import Output
from ..engine.chain import ModelChain
from ..errors import CheckFailed, UsageError
from ..fsutil import atomic_directory, read_json, write_json_atomic, write_text_atomic
from ..precision import dtype_of
from . import build
from .card import data_sources, hub_id, render_card
from .check import CheckResult, check_pairs, compare, sequence_logps
from .hub import push_folder
from .lineage import LINEAGE_NAME, lineage
from .stage import ExportSource, select_stage


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _guard_out(cfg: ExportConfig, src: ExportSource) -> Path:
    """The output folder, refusing anything whose replacement would destroy data the export reads."""
    if cfg.out is None:
        raise UsageError("no output folder given: pass --out DIR")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    target = out.resolve()
    for name, path in (("the run directory", src.run.root), ("the base model", Path(src.base_spec)),
                       ("the prepared data", Path(str(src.manifest.get("data") or "")))):
        p = path.resolve() if str(path) not in ("", ".") and path.exists() else None
        if p is not None and (target == p or p.is_relative_to(target) or target.is_relative_to(p / "stages")):
            raise UsageError(f"--out {out}: would overwrite {name} ({path}); choose another folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise UsageError(f"{out}: exists and is not empty; pass --force to replace it, or choose another --out")
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
    if cfg.run is None:
        raise UsageError("no run given: pass --run RUN_DIR (made by `spoctl align`)")
    src = select_stage(cfg.run, cfg.stage, out)
    if cfg.adapter_only and not src.lora:
        raise UsageError(f"{src.run.root}: a full fine-tuning run has no adapters; drop --adapter-only")
    target = _guard_out(cfg, src)
    kind = "adapter" if cfg.adapter_only else "merged"
    dtype = cfg.dtype or ("bf16" if kind == "merged" else None)
    base_id = cfg.base_model_id or hub_id(src.base_spec)
    tokenizer = build.export_tokenizer(src, trust_remote_code=cfg.trust_remote_code)
    sources = data_sources(src)
    report_path = src.run.eval_report_path
    report = read_json(report_path) if report_path.is_file() else None
    out.info(f"exporting stage {src.index} ({src.dim}) of {src.run.root} as {kind} weights"
             + (f" ({dtype})" if dtype else "") + f" to {target}")

    trust = cfg.trust_remote_code
    with build.local_base(src, target.parent, trust_remote_code=trust) as base, \
            atomic_directory(target, replace=True) as tmp:
        earlier: list[str] = []
        if kind == "merged":
            build.save_merged(build.merged_model(src, base, trust_remote_code=trust), tokenizer, tmp,
                              dtype=dtype, max_shard_bytes=parse_size(cfg.max_shard_size))
        else:
            earlier = build.save_adapters(src, tokenizer, tmp, base_name=base_id or src.base_spec, dtype=dtype)
        check = _check(cfg, src, base, tmp, tokenizer, kind, dtype or "fp32", earlier, out)
        write_text_atomic(tmp / "README.md", render_card(src, kind=kind, dtype=dtype or "as trained", base_id=base_id,
                                                         check=check, earlier=earlier, eval_report=report,
                                                         sources=sources))
        write_json_atomic(tmp / LINEAGE_NAME, lineage(src, tmp, kind=kind, dtype=dtype or "as trained",
                                                      base_id=base_id, check=check, earlier=earlier, sources=sources))
        _shareable(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    shards = [f for f in files if f.endswith(".safetensors") and "/" not in f]
    out.info(f"wrote {target}: {len(files)} files, {size / 1e6:.1f} MB; numerical check passed on {check.pairs} pairs"
             f" (max |diff| {check.max_abs_diff:.3g})")
    result = {"out": str(target), "run": str(src.run.root), "stage": src.index, "dim": src.dim, "kind": kind,
              "dtype": dtype, "files": files, "shards": len(shards), "bytes": size, "check": check.to_dict(),
              "hub": None}
    if cfg.push_to_hub:
        out.info(f"uploading {target} to the Hub as {cfg.push_to_hub}")
        result["hub"] = push_folder(target, cfg.push_to_hub, private=cfg.private,
                                    message=f"spoctl export: stage {src.index} ({' -> '.join(src.dims)})")
        out.info(f"uploaded: {result['hub']}")
    return result


def _check(cfg: ExportConfig, src: ExportSource, base: str, folder: Path, tokenizer: Any, kind: str, dtype: str,
           earlier: list[str], out: Output) -> CheckResult:
    """Reload what was written, score held-out pairs, compare with the checkpoint rebuilt by ModelChain."""
    from transformers import AutoModelForCausalLM

    from ..models import load_causal_lm

    device, pad = _device(), tokenizer.pad_token_id
    pairs, source = check_pairs(src, tokenizer, cfg.check_pairs, out)
    if kind == "merged":
        # Exactly how a user loads it: plain transformers, safetensors, the exported dtype.
        exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype_of(dtype), use_safetensors=True,
                                                        trust_remote_code=cfg.trust_remote_code)
    else:
        base_model = load_causal_lm(base, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
        exported = build.load_exported_adapters(folder, base_model, earlier)
    got, counts = sequence_logps(exported.eval().to(device), pairs, pad)
    del exported
    reference = ModelChain(base, src.run, src.manifest, trust_remote_code=cfg.trust_remote_code)
    with build.quiet_peft():
        ref = reference.load(src.index).to(device)
    ref32, _ = sequence_logps(ref, pairs, pad)
    # Merged low-precision weights are compared with the checkpoint cast the same way (tight) and with float32
    # (drift); adapters always run on a float32 base, so float32 is their exact reference.
    exact = ref32
    if kind == "merged" and dtype != "fp32":
        # Parameters only: from_pretrained(dtype=...) keeps computed buffers such as rotary frequencies in float32,
        # and casting those too would make the reference, not the export, the odd one out.
        for p in ref.parameters():
            p.data = p.data.to(dtype_of(dtype))
        exact = sequence_logps(ref, pairs, pad)[0]
    del ref
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
