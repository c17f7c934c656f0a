"""Writing the model files of an export: merged weights (sharded safetensors) or the chain of LoRA adapters,
plus the tokenizer, chat template and generation config.

The merged model is rebuilt here from each stage folder's lineage file (`spoctl_stage.json`), *not* through
`ModelChain.load`: the numerical check then compares two independent paths to pi_k, so a merge bug in either
shows up as a mismatch instead of passing silently.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..console import Output
from ..engine.chain import LINEAGE_FILE
from ..errors import UsageError
from ..precision import dtype_of
from ..models import load_causal_lm, load_tokenizer, tensor_bytes
from .stage import ExportSource

EARLIER_DIR = "earlier_adapters"


def stage_lineage(src: ExportSource, k: int) -> dict[str, Any]:
    path = src.model_dir(k) / LINEAGE_FILE
    if not path.is_file():
        raise UsageError(f"{path}: missing; stage {k}'s model folder was not written by spoctl align")
    return json.loads(path.read_text(encoding="utf-8"))


def adapter_chain(src: ExportSource) -> list[Path]:
    """The adapter folders that make pi_k, in order, as the stage's own lineage file lists them."""
    lin = stage_lineage(src, src.index)
    if lin.get("kind") != "lora-adapter":
        raise UsageError(f"{src.model_dir()}: stage {src.index} holds full weights, not a LoRA adapter")
    return [src.run.root / p for p in lin.get("earlier_adapters", [])] + [src.model_dir()]


def apply_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """model + one adapter, merged into plain weights."""
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT calls a transformers method that transformers 5 deprecates; the warning is noise for our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def merged_model(src: ExportSource, base_spec: str, *, trust_remote_code: bool = False) -> nn.Module:
    """pi_k as one plain transformers model in float32 (merging in full precision, casting only at the end).
    `base_spec` is where to load the run's base model from (see `local_base`)."""
    if not src.lora:
        return load_causal_lm(str(src.model_dir()), dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    model = load_causal_lm(base_spec, dtype=torch.float32, trust_remote_code=trust_remote_code)
    for adapter in adapter_chain(src):
        model = apply_adapter(model, adapter)
    return model.eval()


@contextlib.contextmanager
def local_base(src: ExportSource, scratch: Path, *, trust_remote_code: bool = False) -> Iterator[str]:
    """The base model spec the export loads. A LoRA export needs the base twice (to build the merged model and to
    rebuild the checkpoint for the check); transformers reads GGUF files slowly, so a GGUF base is read from
    spoctl's cache of it (gguf_cache) or, with that cache off, unpacked once into a temporary float32 safetensors
    folder under `scratch` (exactly the same weights), removed afterwards."""
    from ..gguf_cache import entry_dir
    from ..models import resolve_model_source

    base = resolve_model_source(src.base_spec)
    if not src.lora or base.kind != "gguf" or entry_dir(Path(base.path) / base.gguf_file) is not None:
        yield src.base_spec
        return
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spoctl-base-", dir=scratch) as folder:
        model = (load_causal_lm(src.base_spec, dtype=torch.float32, trust_remote_code=trust_remote_code))
        model.save_pretrained(folder, safe_serialization=True)
        del model
        yield folder


def export_tokenizer(src: ExportSource, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer align saved beside the stage (pad token set, chat template kept)."""
    try:
        return load_tokenizer(str(src.model_dir()), trust_remote_code=trust_remote_code)
    except UsageError:
        return load_tokenizer(src.base_spec, trust_remote_code=trust_remote_code)


def generation_config(model: nn.Module, tokenizer: Any) -> Any:
    """The model's generation config, made to stop where training put the end of a response (the tokenizer's EOS,
    which ends every prepared completion) and to pad with the tokenizer's pad token."""
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    eos = gen.eos_token_id
    eos_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    gen.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids or None
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return gen


def save_merged(model: nn.Module, tokenizer: Any, folder: Path, *, dtype: str, max_shard_bytes: int,
                out: Output | None = None) -> None:
    """Write the merged model; with `out`, the write shows its size first and its time after (a 7B model's
    weights are 14 GB in bf16: minutes)."""
    model = model.to(dtype_of(dtype))
    model.generation_config = generation_config(model, tokenizer)
    shown = (out.writing("export: writing the merged model", tensor_bytes(model.state_dict().values()),
                         f"weights in {dtype}, safetensors shards of at most {max_shard_bytes / 1e9:g} GB")
             if out is not None else contextlib.nullcontext())
    with shown:
        model.save_pretrained(str(folder), safe_serialization=True, max_shard_size=max_shard_bytes)
        tokenizer.save_pretrained(str(folder))


def _copy_adapter(adapter_dir: Path, target: Path, *, base_name: str | None, dtype: str | None) -> None:
    """Copy one adapter (config + weights only). `base_name` is what the config says the adapter sits on."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_name
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weights = adapter_dir / "adapter_model.safetensors"
    if dtype is None:
        shutil.copyfile(weights, target / weights.name)
    else:
        tensors = {k: v.to(dtype_of(dtype)) if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
        save_file(tensors, str(target / weights.name), metadata={"format": "pt"})


def save_adapters(src: ExportSource, tokenizer: Any, folder: Path, *, base_name: str, dtype: str | None) -> list[str]:
    """The stage's adapter at the folder's root; for stage >= 2 the earlier stages' adapters under
    earlier_adapters/NN-dim/, to be merged in order first (the stage's adapter was trained on that merged model).

    The root adapter of a stage >= 2 names no base model in its config: plain PEFT tools would otherwise load it
    on the bare base model and silently produce a model that never existed. Returns the earlier folders' names.
    """
    chain = adapter_chain(src)
    earlier = []
    for k, adapter in enumerate(chain[:-1], start=1):
        name = f"{k:02d}-{src.stages[k - 1]['dim']}"
        _copy_adapter(adapter, folder / EARLIER_DIR / name, base_name=base_name if k == 1 else None, dtype=dtype)
        earlier.append(f"{EARLIER_DIR}/{name}")
    _copy_adapter(chain[-1], folder, base_name=base_name if not earlier else None, dtype=dtype)
    tokenizer.save_pretrained(str(folder))
    return earlier


def load_exported_adapters(folder: Path, base: nn.Module, earlier: list[str]) -> nn.Module:
    """Rebuild pi_k from an adapter export with plain PEFT, exactly as the model card tells users to."""
    from peft import PeftModel

    model = base
    with quiet_peft():
        for name in earlier:
            model = PeftModel.from_pretrained(model, str(folder / name)).merge_and_unload()
        return PeftModel.from_pretrained(model, str(folder)).merge_and_unload().eval()
