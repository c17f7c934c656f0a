"""Format adapters: raw records -> (prompt messages, chosen text, rejected text) pairs per dimension.

`FORMATS` is the one registry: the config's accepted values (`prepare.format`), the CLI help, the docs and the
error messages all derive from it. Every adapter validates as it goes and raises an InputError naming the file,
line/record and field. Data that is well-formed but unusable as a pair (dialogues that differ before the last
turn, ratings too close to call) is dropped and counted by reason instead, because real data sets contain it.

This package imports neither torch nor the config, so `spoctl.config` can take the format names from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ...errors import InputError, UsageError
from ...naming import DIM_PATTERN
from ..records import Record, Where, key_list, printable
from .columns import REVERSE, apply_columns, split_columns
from .fields import DimPairs, Message, TextPair
from .helpsteer import adapt_helpsteer, helpsteer_attributes, numeric_attributes
from .hh import adapt_hh, hh_dialogue, is_transcript
from .llamafactory import adapt_alpaca, adapt_sharegpt
from .pku import PKU_DIMS, PKU_KEYS, adapt_pku
from .ranked import adapt_ranked
from .ranking import PAIRINGS
from .shp import SHP_KEYS, adapt_shp
from .trl import adapt_pairwise, is_conversation
from .ultrafeedback import adapt_ultrafeedback

__all__ = ["FORMATS", "FORMAT_NAMES", "FORMAT_FIELDS", "Format", "Detected", "DimPairs", "Message", "TextPair",
           "AdaptOptions", "PAIRINGS", "REVERSE", "adapt", "apply_columns", "split_columns", "detect_format", "describe",
           "hh_dialogue", "helpsteer_attributes", "PKU_DIMS"]

Adapter = Callable[[list[Record], str, Any], dict[str, DimPairs]]


@dataclass(frozen=True)
class Format:
    name: str
    adapter: Adapter
    description: str  # one line, shown in --help, docs and errors
    fields: tuple[str, ...]  # the record fields it reads: the FIELDs --columns may map to
    per_record: bool = True  # each record yields its pairs alone (so a stream can stop early)


@dataclass(frozen=True)
class AdaptOptions:
    """What adapters read besides the records: the rating settings of `prepare` and the polarity statements of
    `--columns FIELD=COLUMN:reverse` (the FIELDs named)."""

    min_score_gap: float = 1.0
    attributes: list[str] | None = None
    pairing: str = "each"
    seed: int = 0
    reverse: frozenset[str] = frozenset()


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("pairwise", adapt_pairwise,
           "TRL preference data: prompt/chosen/rejected as strings or chat messages, implicit prompts, "
           "UltraFeedback-binarized conversations",
           ("prompt", "chosen", "rejected", "system")),
    Format("hh-rlhf", adapt_hh, "Anthropic HH-RLHF: chosen/rejected '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts",
           ("chosen", "rejected", "system")),
    Format("pku-saferlhf", adapt_pku,
           "PKU-SafeRLHF: response_0/response_1 ranked by better_response_id (helpful) and safer_response_id (harmless)",
           ("prompt", *PKU_KEYS, "system")),
    Format("helpsteer", adapt_helpsteer, "HelpSteer2-style ratings: prompt/response plus numeric attributes, "
                                         "one dimension per attribute", ("prompt", "response", "system"),
           per_record=False),
    Format("ranked", adapt_ranked, "a prompt with a ranked list of answers (berkeley-nest/Nectar): prompt, "
                                   "answers [{answer, rank}] (rank 1 best)", ("prompt", "answers", "system")),
    Format("ultrafeedback", adapt_ultrafeedback, "openbmb/UltraFeedback (raw): instruction, completions rated per "
                                                 "aspect, one dimension per aspect",
           ("instruction", "completions", "system")),
    Format("shp", adapt_shp, "Stanford SHP: history, human_ref_A/human_ref_B, labels (1: A preferred)",
           (*SHP_KEYS, "system")),
    Format("alpaca-ranking", adapt_alpaca, "LLaMA-Factory alpaca ranking: instruction/input/chosen/rejected "
                                           "(+ system, history)", ("instruction", "input", "chosen", "rejected",
                                                                    "system", "history")),
    Format("sharegpt-ranking", adapt_sharegpt, "LLaMA-Factory sharegpt ranking: conversations of {from, value} "
                                               "plus chosen/rejected messages", ("conversations", "chosen",
                                                                                 "rejected", "system")),
)}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)
FORMAT_FIELDS: frozenset[str] = frozenset(f for fmt in FORMATS.values() for f in fmt.fields)


def describe() -> str:
    """'auto | pairwise | hh-rlhf | ...' for help texts."""
    return " | ".join(("auto", *FORMAT_NAMES))


# --------------------------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class Detected:
    """The format picked for a source, the shape within it, and why (printed as one info line per source)."""

    format: str
    shape: str
    because: str

    def line(self, label: str) -> str:
        return f"{label}: detected {self.format} ({self.shape}) because {self.because}"


def detect_format(record: dict[str, Any], where: Where) -> Detected:
    """Pick a format from the first record's keys and value types."""
    keys = set(record)
    if {"instruction", "completions"} <= keys and isinstance(record["completions"], list):
        return Detected("ultrafeedback", "UltraFeedback, per-aspect ratings",
                        "the record has instruction and a list of completions; each aspect becomes a dimension")
    if {"prompt", "answers"} <= keys and isinstance(record["answers"], list):
        return Detected("ranked", "ranked answers", "the record has prompt and a list of answers")
    if set(SHP_KEYS) <= keys:
        return Detected("shp", "Stanford SHP", "the record has history, human_ref_A, human_ref_B and labels"
                        " (labels 1: A preferred)")
    if {"response_0", "response_1"} <= keys and keys & {"better_response_id", "safer_response_id"}:
        return Detected("pku-saferlhf", "PKU-SafeRLHF", "the record has response_0, response_1 and "
                        + " and ".join(sorted(keys & {"better_response_id", "safer_response_id"})))
    if {"chosen", "rejected"} <= keys:
        return _detect_pair(record, keys)
    if {"prompt", "response"} <= keys and numeric_attributes(record):
        return Detected("helpsteer", "per-attribute ratings",
                        f"the record has prompt, response and numeric fields ({key_list(numeric_attributes(record))})")
    raise where.error(
        f"cannot tell the format from the keys {sorted(keys)}; the formats are: "
        + "; ".join(f"{f.name} ({f.description})" for f in FORMATS.values())
        + ". See docs/data-formats.md, force one with --format, or map your columns with"
          " --columns prompt=COLUMN,chosen=COLUMN,rejected=COLUMN"
    )


def _detect_pair(record: dict[str, Any], keys: set[str]) -> Detected:
    chosen = record["chosen"]
    if "conversations" in keys:
        return Detected("sharegpt-ranking", "LLaMA-Factory", "the record has conversations, chosen and rejected")
    if "instruction" in keys:
        return Detected("alpaca-ranking", "LLaMA-Factory", "the record has instruction, chosen and rejected")
    if "prompt" in keys:
        if is_conversation(chosen):
            return Detected("pairwise", "UltraFeedback-binarized",
                            "chosen/rejected are whole conversations next to a prompt column; their shared turns"
                            " become the prompt" + _turns(chosen))
        if isinstance(record["prompt"], list):
            return Detected("pairwise", "conversational, explicit prompt",
                            "prompt is a list of chat messages" + _turns(record["prompt"]))
        return Detected("pairwise", "standard, explicit prompt", "the record has prompt, chosen and rejected")
    if isinstance(chosen, list):
        return Detected("pairwise", "conversational, implicit prompt",
                        "chosen/rejected are conversations without a prompt column; their shared turns become the"
                        " prompt" + _turns(chosen))
    if is_transcript(chosen) and is_transcript(record["rejected"]):
        return Detected("hh-rlhf", "Anthropic HH-RLHF",
                        "chosen/rejected are '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts")
    return Detected("pairwise", "standard, implicit prompt",
                    "chosen/rejected are plain strings without a prompt column; their shared leading text becomes"
                    " the prompt")


def _turns(msgs: Any) -> str:
    users = sum(1 for m in msgs if isinstance(m, dict) and m.get("role") == "user") if isinstance(msgs, list) else 0
    return f" (multi-turn: {users} user turns)" if users > 1 else ""


# --------------------------------------------------------------------------------------------- entry point
def adapt(fmt: str, records: list[Record], dim: str, opts: Any = None) -> dict[str, DimPairs]:
    """Convert the records of one `--data DIM=SOURCE` into pairs, per output dimension.

    Most formats yield the dimension DIM; `pku-saferlhf` yields `helpful` and `harmless`; `helpsteer` yields
    one dimension per rating attribute, `ultrafeedback` one per aspect. `opts`: an AdaptOptions (or anything with
    its attributes; missing ones take its defaults).
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; accepted: {describe().replace(' | ', ', ')}")
    result = FORMATS[fmt].adapter(records, dim, opts if opts is not None else AdaptOptions())
    for name in result:
        if not DIM_PATTERN.match(name):
            raise InputError(
                f"{fmt} would create dimension {printable(repr(name))}, which is not a valid dimension name", path=records[0][0].path
            )
    return result
