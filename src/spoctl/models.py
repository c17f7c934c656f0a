"""Loading tokenizers and causal LMs from a local folder, a local .gguf file, or a Hugging Face Hub id.

Safe by default: weights load from safetensors only (no pickle), `trust_remote_code` only when asked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is 'folder', 'gguf' or 'hub'."""

    spec: str
    kind: str
    path: str  # folder for 'folder' and 'gguf', the repo id for 'hub'
    gguf_file: str | None = None

    def from_pretrained_args(self) -> tuple[str, dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return self.path, kwargs


def resolve_model_source(spec: str) -> ModelSource:
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UsageError(f"{spec}: GGUF file does not exist")
        return ModelSource(spec, "gguf", str(p.resolve().parent), p.name)
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{spec}: a model must be a Hugging Face folder, a .gguf file or a Hub id")
        if not (p / "config.json").exists() and not (p / "tokenizer_config.json").exists():
            raise UsageError(f"{spec}: not a Hugging Face model folder (no config.json or tokenizer_config.json)")
        return ModelSource(spec, "folder", str(p.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UsageError(f"{spec}: no such file or folder")
    return ModelSource(spec, "hub", spec)


def _load_error(spec: str, err: Exception) -> UsageError:
    hint = ""
    if "offline" in str(err).lower() or "connect" in str(err).lower() or "resolve" in str(err).lower():
        hint = " (the Hugging Face Hub could not be reached: give a local folder or .gguf file instead)"
    return UsageError(f"could not load model '{spec}': {type(err).__name__}: {str(err).splitlines()[0]}{hint}")


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = resolve_model_source(spec)
    path, kwargs = src.from_pretrained_args()
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:  # transformers raises OSError, ValueError, HF errors...
        raise _load_error(spec, err) from None
    if tok.pad_token_id is None:
        # Padding never reaches the loss (it is masked), so any existing special token serves.
        tok.pad_token = tok.eos_token
    return tok


# The module each flash-attention kernel of transformers imports.
_FLASH_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def check_attention_available(attention: str) -> None:
    """Fail before any work starts (not at the first model load, with a run directory already made)."""
    import importlib.util

    module = _FLASH_MODULES.get(attention)
    if module and (importlib.util.find_spec(module) is None or not _cuda_available()):
        raise UsageError(f"attention '{attention}' needs the '{module}' package and a CUDA GPU; "
                         "install it, or leave align.attention at auto (SDPA)")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_model_loadable(spec: str, *, trust_remote_code: bool = False) -> ModelSource:
    """What can be checked about a model without loading its weights: the file or folder exists, a folder holds
    safetensors weights (never pickle) and a readable config. For a command to fail in seconds, not minutes."""
    src = resolve_model_source(spec)
    if src.kind == "folder":
        if not any(Path(src.path).glob("*.safetensors")):
            raise UsageError(
                f"{spec}: no .safetensors weights in this folder; spoctl does not load pickled (.bin) weights."
                " Convert them with `model.save_pretrained(dir, safe_serialization=True)` from a trusted environment."
            )
        try:
            json.loads((Path(src.path) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UsageError(f"{spec}: config.json cannot be read ({type(err).__name__}: {err})") from None
    return src


def load_causal_lm(spec: str, *, dtype: Any = None, trust_remote_code: bool = False, attention: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    src = check_model_loadable(spec)
    path, kwargs = src.from_pretrained_args()
    if src.kind != "gguf":
        kwargs["use_safetensors"] = True
    if attention and attention != "auto":
        kwargs["attn_implementation"] = attention
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as err:
        raise _load_error(spec, err) from None
    return as_plain_float_model(model) if src.kind == "gguf" else model


def as_plain_float_model(model: Any) -> Any:
    """Forget that weights came from a GGUF file. transformers keeps a GGUF 'quantizer' on the model even when it
    unpacked every weight to float at load time, and then refuses to save it (a full fine-tuning stage or an
    export must save it); with nothing left packed, the model is an ordinary float model and dropping the marker
    is exact."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    method = getattr(quantizer.quantization_config, "quant_method", None)
    if getattr(method, "value", method) != "gguf" or getattr(quantizer, "packed_modules", None):
        raise UsageError(f"{type(model).__name__}: weights are quantized ({getattr(method, 'value', method)}); "
                         "spoctl trains and exports float models (load the base without quantization)")
    quantizer.remove_quantization_config(model)
    return model


def tokenizer_identity(tok, spec: str) -> dict[str, Any]:
    """What makes two tokenizers interchangeable: vocabulary, special tokens and chat template, hashed."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps(tok.all_special_tokens).encode())
    h.update((getattr(tok, "chat_template", None) or "").encode())
    return {
        "source": spec,
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "has_chat_template": bool(getattr(tok, "chat_template", None)),
        "sha256": h.hexdigest(),
    }
