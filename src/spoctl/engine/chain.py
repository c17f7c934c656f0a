"""The chain of models of a run: pi_0 (the base) and pi_k (after stage k), how to load each, and a fingerprint
of each that keys the frozen log-prob cache.

Full fine-tuning saves every stage as a complete Hugging Face folder. LoRA saves each stage as a PEFT adapter
trained on top of the *previous stage's model*; pi_k is therefore rebuilt as base + adapter_1 + ... + adapter_k,
each merged in turn. The reference of stage n is pi_{n-1} built this way -- never silently the bare base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..fsutil import hash_file_into, sha256_file
from ..models import Quantization, causal_lm_skeleton, load_causal_lm, resolve_model_source
from ..rundir import RunDir

LINEAGE_FILE = "spoctl_stage.json"


def _hash_files(paths: list[Path], h: "hashlib._Hash") -> None:
    for p in sorted(paths):
        h.update(p.name.encode())
        hash_file_into(h, p)


def weights_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer, in name order: what determines the model's outputs."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def base_fingerprint(spec: str) -> str | None:
    """Fingerprint of the base model's files on disk (cheap), or None for a Hub id (hash the weights instead)."""
    src = resolve_model_source(spec)
    h = hashlib.blake2b(digest_size=20)
    if src.kind == "gguf":
        _hash_files([Path(src.path) / src.gguf_file], h)
    elif src.kind == "folder":
        root = Path(src.path)
        _hash_files([*root.glob("*.safetensors"), root / "config.json"], h)
    else:
        return None
    return h.hexdigest()


def stage_fingerprint(model_dir: Path, previous: str) -> str:
    """A stage's fingerprint chains the previous model's with the files this stage saved."""
    h = hashlib.blake2b(digest_size=20)
    h.update(previous.encode())
    _hash_files([*model_dir.glob("*.safetensors"), *model_dir.glob("*config.json")], h)
    return h.hexdigest()


def folder_files(folder: Path) -> dict[str, dict[str, Any]]:
    """size and sha256 of every file in a saved model folder, as the manifest records them."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def size_problems(folder: Path, recorded: dict[str, dict[str, Any]]) -> list[str]:
    """Files recorded when `folder` was written that are missing or have another size now (no hashing)."""
    problems = []
    for name, info in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != info["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {info['size']} were written")
    return problems


def hash_problems(folder: Path, recorded: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Those of `names` whose bytes are no longer the ones recorded."""
    return [f"{folder / n} was changed after it was written (its sha256 differs)" for n in names
            if sha256_file(folder / n) != recorded[n]["sha256"]]


def verify_files(folder: Path, recorded: dict[str, dict[str, Any]], what: str) -> None:
    """Every file recorded when `folder` was written is still there, the same size, the same bytes: else a
    UsageError naming the file. (Sizes first: a truncated or replaced file is named without hashing anything.)"""
    problems = size_problems(folder, recorded) or hash_problems(folder, recorded, list(recorded))
    if problems:
        raise UsageError(f"{what} is not the one this run saved: {'; '.join(problems)}. Restore it, or run the "
                         "stage again in a new run directory")


class ModelChain:
    """Loads pi_k for a run. `stage_dirs[k-1]` is the model folder of stage k."""

    def __init__(self, base_spec: str, run: RunDir, manifest: dict[str, Any], *, trust_remote_code: bool = False,
                 attention: str | None = None, quantized: bool = True):
        self.base_spec = base_spec
        self.run = run
        self.manifest = manifest
        self.trust_remote_code = trust_remote_code
        self.attention = attention
        # A QLoRA run's models are its 4-bit base with the adapters merged in (re-quantized), as they trained;
        # `quantized=False` gives the float models the same adapters make on the float base (what export writes).
        self.quantization = Quantization.from_manifest(manifest.get("quantize")) if quantized else None
        self._verified: set[int] = set()

    @property
    def lora(self) -> bool:
        return bool(self.manifest.get("lora"))

    def stage_model_dir(self, k: int) -> Path:
        st = self.manifest["stages"][k - 1]
        return self.run.stage_model_dir(k, st["dim"])

    def describe(self, k: int) -> str:
        """Human/manifest name of pi_k."""
        if k == 0:
            return self.base_spec
        return str(self.stage_model_dir(k).relative_to(self.run.root))

    def fingerprint(self, k: int) -> str:
        if k == 0:
            fp = self.manifest.get("base_fingerprint")
            if not fp:
                raise RuntimeError("the manifest has no base fingerprint")
            # The 4-bit base computes other numbers than the float one: its log-probs must not share a cache key.
            return fp if self.quantization is None else f"{fp}-{self.quantization.tag()}"
        st = self.manifest["stages"][k - 1]
        if st.get("status") != "completed" or "fingerprint" not in st:
            raise RuntimeError(f"stage {k} has not completed; pi_{k} does not exist yet")
        return st["fingerprint"]

    def verify(self, k: int) -> None:
        """Check that what pi_k is built from is what the run recorded: the base model's files (its fingerprint) and
        each stage folder used (every file's size and sha256). Once per model and process."""
        # A chain given another base than the run's (export's float copy of a GGUF base) is checked by its maker.
        own_base = self.base_spec == self.manifest.get("base_model")
        if (k == 0 or self.lora) and own_base and 0 not in self._verified:
            recorded = self.manifest.get("base_fingerprint")
            now = base_fingerprint(self.base_spec)  # None for a Hub id: the Hub's revision is not checked here
            if recorded and now is not None and now != recorded:
                raise UsageError(f"base model {self.base_spec} has changed since this run started (its files hash "
                                 "differently); use the original base model, or start a new run")
            self._verified.add(0)
        for i in ([k] if k > 0 and not self.lora else range(1, k + 1)):
            if i in self._verified:
                continue
            folder = self.stage_model_dir(i)
            if not folder.is_dir():
                raise UsageError(f"{folder}: stage {i}'s model is missing (the run recorded it as completed); restore "
                                 "the folder, or run the stages again in a new run directory (another --out)")
            files = self.manifest["stages"][i - 1].get("files")
            if files:  # runs of spoctl before 0.2 recorded none
                verify_files(folder, files, f"stage {i}'s model {folder}")
            self._verified.add(i)

    def load(self, k: int, dtype: torch.dtype = torch.float32, *, empty: bool = False,
             verify: bool = True) -> nn.Module:
        """pi_k in eval mode, plain transformers model (LoRA adapters merged), verified against the manifest
        (`verify=False`: by the caller, e.g. once on the main process for all). `empty`: the same model with its
        parameters on the meta device, nothing read (the processes that receive their FSDP shards)."""
        if empty:
            folder = str(self.stage_model_dir(k)) if k > 0 and not self.lora else self.base_spec
            model = causal_lm_skeleton(folder, dtype=dtype, trust_remote_code=self.trust_remote_code,
                                       attention=self.attention)
            model.eval()
            return model
        if verify:
            self.verify(k)
        if k > 0 and not self.lora:
            # Full fine-tuning: stage k's folder holds complete weights; earlier stages are superseded.
            model = load_causal_lm(str(self.stage_model_dir(k)), dtype=dtype, trust_remote_code=self.trust_remote_code,
                                   attention=self.attention)
        else:
            model = load_causal_lm(self.base_spec, dtype=dtype, trust_remote_code=self.trust_remote_code,
                                   attention=self.attention, quantization=self.quantization)
            for i in range(1, k + 1):
                model = merge_adapter(model, self.stage_model_dir(i))
        model.eval()
        return model


def merge_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """base + adapter, merged into plain weights (so the next stage's adapter sits on top of this model)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()


def write_lineage(model_dir: Path, *, base_spec: str, stage: int, dim: str, lora: bool,
                  earlier_adapters: list[str]) -> None:
    """What is needed to rebuild this stage's model outside spoctl (export uses it)."""
    info = {
        "base_model": base_spec,
        "stage": stage,
        "dimension": dim,
        "kind": "lora-adapter" if lora else "full",
        # For LoRA: apply these adapter folders (relative to the run directory), in order, merging each,
        # then this folder's adapter.
        "earlier_adapters": earlier_adapters,
    }
    (model_dir / LINEAGE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
