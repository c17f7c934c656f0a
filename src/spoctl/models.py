"""Loading tokenizers and causal LMs from a local folder, a local .gguf file, or a Hugging Face Hub id.

Safe by default: weights load from safetensors only (no pickle), `trust_remote_code` only when asked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import hub
from .errors import UsageError
from .naming import is_hub_id


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
    if spec.startswith((".", "/", "~")) or not is_hub_id(spec):
        raise UsageError(f"{spec}: no such file or folder")
    return ModelSource(spec, "hub", spec)


def _hub_kwargs(src: ModelSource, probe_file: str) -> dict[str, Any]:
    """Decide, before transformers starts its retries, how a Hub model is fetched.

    Offline mode: the local cache only (transformers' own rule). Hub unreachable: the local cache when the model
    is there, else one clear error at once instead of ~50 s of retries.
    """
    if src.kind != "hub" or hub.offline_mode():
        return {}
    reason = hub.unreachable_reason()
    if reason is None:
        return {}
    if _cached(src.path, probe_file):
        return {"local_files_only": True}
    raise UsageError(
        f"could not load model '{src.spec}': the Hugging Face Hub could not be reached ({reason}) and the model is"
        " not in the local Hugging Face cache. Give a local folder or .gguf file with --model, or download it"
        " first where the Hub is reachable (e.g. `hf download " + src.spec + "`)"
    )


def _cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an odd id or a damaged cache: treat as not cached, the error then says what to do
        return False


def _load_error(spec: str, err: Exception) -> UsageError:
    text = str(err).lower()
    hint = ""
    if hub.offline_mode() and resolve_model_source(spec).kind == "hub":
        hint = " (HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache: unset it, or give a local folder or .gguf file)"
    elif "offline" in text or "connect" in text or "resolve" in text:
        hint = " (the Hugging Face Hub could not be reached: give a local folder or .gguf file instead)"
    first = str(err).splitlines()[0] if str(err) else ""
    return UsageError(f"could not load model '{spec}': {type(err).__name__}: {first}{hint}")


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = resolve_model_source(spec)
    path, kwargs = src.from_pretrained_args()
    kwargs.update(_hub_kwargs(src, "tokenizer_config.json"))
    try:
        if src.kind == "gguf":
            tok = _through_gguf_cache(src, "tokenizer", lambda at, **kw: AutoTokenizer.from_pretrained(
                at, trust_remote_code=trust_remote_code, **kw))
        else:
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


@dataclass(frozen=True)
class Quantization:
    """How a base model is loaded for QLoRA: bitsandbytes 4-bit weights, computed in `compute_dtype`."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "fp32"

    def tag(self) -> str:
        """What distinguishes this model's numbers from the float model's (part of cache keys)."""
        return f"bnb-4bit-{self.quant_type}{'-dq' if self.double_quant else ''}-{self.compute_dtype}"

    def to_manifest(self) -> dict[str, Any]:
        return {"bits": 4, "quant_type": self.quant_type, "double_quant": self.double_quant,
                "compute_dtype": self.compute_dtype}

    @classmethod
    def from_manifest(cls, info: dict[str, Any] | None) -> "Quantization | None":
        if not info:
            return None
        return cls(info["quant_type"], bool(info["double_quant"]), info["compute_dtype"])


def check_quantization_available(spec: str) -> None:
    """QLoRA needs bitsandbytes, and a base whose float weights can be quantized (not a GGUF file, whose weights
    transformers unpacks from its own quantization)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("quantize 4bit needs the bitsandbytes package: pip install bitsandbytes")
    if resolve_model_source(spec).kind == "gguf":
        raise UsageError(f"{spec}: a GGUF base cannot be loaded in 4 bits by bitsandbytes; give the model's "
                         "safetensors folder or Hub id, or train without --quantize")


def load_causal_lm(spec: str, *, dtype: Any = None, trust_remote_code: bool = False, attention: str | None = None,
                   quantization: Quantization | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    src = check_model_loadable(spec)
    path, kwargs = src.from_pretrained_args()
    if src.kind != "gguf":
        kwargs["use_safetensors"] = True
    kwargs.update(_hub_kwargs(src, "config.json"))
    if attention and attention != "auto":
        kwargs["attn_implementation"] = attention
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        from .precision import dtype_of

        check_quantization_available(spec)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=dtype_of(quantization.compute_dtype))
    try:
        if src.kind == "gguf":
            extra = {k: v for k, v in kwargs.items() if k != "gguf_file"}
            # Unpacked and cached in float32 (what a GGUF file unpacks to) whatever dtype this load asks for.
            return _through_gguf_cache(
                src, "model", lambda at, dtype=dtype or torch.float32, **kw: as_plain_float_model(
                    AutoModelForCausalLM.from_pretrained(at, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         **extra, **kw)),
                build_kw={"dtype": torch.float32}, load_kw={"use_safetensors": True},
                save_kw={"safe_serialization": True})
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as err:
        raise _load_error(spec, err) from None


def _through_gguf_cache(src: ModelSource, part: str, from_pretrained: Callable[..., Any], *,
                        build_kw: dict | None = None, load_kw: dict | None = None, save_kw: dict | None = None) -> Any:
    """A GGUF file's config, tokenizer or model through spoctl's cache of it (gguf_cache): `from_pretrained(at,
    **kw)` loads it from a folder, or with `gguf_file=` from the GGUF file; `build_kw` are added when unpacking
    into the cache, `load_kw` when reading the cached folder, `save_kw` to `save_pretrained`."""
    from . import gguf_cache

    def load(folder: Path) -> Any:
        obj = from_pretrained(str(folder), **(load_kw or {}))
        # Named after the GGUF file's folder, as a direct load names it (PEFT writes a model's name into every
        # adapter_config.json it saves), not after the cache folder.
        for named in (obj, getattr(obj, "config", None)):
            if hasattr(named, "name_or_path"):
                named.name_or_path = src.path
        return obj

    return gguf_cache.load_through_cache(
        Path(src.path) / src.gguf_file, part, load=load,
        build=lambda: from_pretrained(src.path, gguf_file=src.gguf_file, **(build_kw or {})),
        save=lambda obj, folder: obj.save_pretrained(str(folder), **(save_kw or {})),
        direct=lambda: from_pretrained(src.path, gguf_file=src.gguf_file))


def model_config(spec: str, *, trust_remote_code: bool = False) -> Any:
    """The model's transformers config (read from config.json or the GGUF header; no weights)."""
    from transformers import AutoConfig

    src = check_model_loadable(spec)
    path, kwargs = src.from_pretrained_args()
    kwargs.update(_hub_kwargs(src, "config.json"))
    try:
        if src.kind == "gguf":
            return _through_gguf_cache(src, "config", lambda at, **kw: AutoConfig.from_pretrained(
                at, trust_remote_code=trust_remote_code, **kw))
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:
        raise _load_error(spec, err) from None


def check_vocabulary_fits(spec: str, tokenizer: Any, *, trust_remote_code: bool = False) -> None:
    """A tokenizer with more tokens than the model has embedding rows gives ids the model cannot look up (an
    IndexError deep inside the first forward pass): refused before any work, naming both sizes. A larger
    embedding than the tokenizer is normal (rows padded to a multiple of 64 or 128)."""
    config = model_config(spec, trust_remote_code=trust_remote_code)
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise UsageError(f"{spec}: the model's vocabulary has {rows} tokens (vocab_size: rows of its embedding), its "
                         f"tokenizer has {len(tokenizer)}: token ids {rows} to {len(tokenizer) - 1} have no embedding. "
                         "Use the tokenizer that came with the model, or resize the model's embeddings "
                         "(model.resize_token_embeddings(len(tokenizer))) and save it")


def causal_lm_skeleton(spec: str, *, dtype: Any = None, trust_remote_code: bool = False, attention: str | None = None):
    """The model `load_causal_lm` would load, with its parameters on the meta device: no weights read, no memory
    taken. Under FSDP every process but the main one builds this and receives its shards from the main process.
    Buffers the model computes itself (rotary frequencies) are real, and tied weights are tied, as after loading."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = model_config(spec, trust_remote_code=trust_remote_code)
    extra = {"attn_implementation": attention} if attention and attention != "auto" else {}
    with init_empty_weights():  # parameters on meta, buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32,
                                                 trust_remote_code=trust_remote_code, **extra)
    model.tie_weights()  # init_empty_weights gives each parameter its own meta tensor, untying them
    return model


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


def sort_adapter_targets(model: Any) -> None:
    """PEFT keeps `target_modules` as a set and writes it to adapter_config.json in the set's order, which follows
    Python's string hashing and so changes from one process to the next: the same stage would be saved as different
    bytes, with a different fingerprint. Sorted before saving, the file is the same every time."""
    for config in getattr(model, "peft_config", {}).values():
        if isinstance(getattr(config, "target_modules", None), set):
            config.target_modules = sorted(config.target_modules)


def tied_aliases(module: Any) -> dict[str, str]:
    """Every name of a parameter that `module` also holds under an earlier name (tied weights), mapped to that
    first name: {"model.lm_head.weight": "model.model.embed_tokens.weight"} for a model with tied embeddings.
    Found by identity of the parameter objects, as `save_pretrained` finds them by storage: FSDP2 shards a tied
    parameter once, so it stays one object under every name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def tensor_bytes(tensors: Any) -> int:
    """Bytes the tensors hold, each storage counted once (tied weights appear under two names in a state dict but
    are written once); a sharded tensor (FSDP's DTensor) counts at its full size, as its checkpoint holds it."""
    seen: set[Any] = set()
    total = 0
    for t in tensors:
        key: Any = id(t)  # a tensor without storage of its own (meta, DTensor) is its own key
        if t.device.type != "meta" and type(t).__name__ != "DTensor":
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
