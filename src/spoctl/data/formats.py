"""Format adapters: raw records -> (prompt messages, chosen text, rejected text) pairs per dimension.

Every adapter validates as it goes and raises an InputError naming the file, line/record and field.
Data that is well-formed but unusable as a pair (HH-RLHF pairs whose dialogues differ before the last turn,
ratings too close to call) is dropped and counted by reason instead, because real data sets contain it.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError, UsageError
from ..naming import DIM_PATTERN
from .sources import Where, json_type_name as _type_name

Message = dict[str, str]
FORMATS = ("pairwise", "hh-rlhf", "pku-saferlhf", "helpsteer")
PKU_KEYS = ("response_0", "response_1", "better_response_id", "safer_response_id")
# PKU-SafeRLHF: which label column becomes which dimension.
PKU_DIMS = {"helpful": "better_response_id", "harmless": "safer_response_id"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_LAST = "\n\nAssistant:"


@dataclass
class TextPair:
    """One preference pair before tokenization. `prompt` holds chat messages (without the optional system prompt)."""

    prompt: list[Message]
    chosen: str
    rejected: str
    where: Where


@dataclass
class DimPairs:
    """The pairs a source yields for one dimension, and the candidates it dropped (reason -> count)."""

    pairs: list[TextPair] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    @property
    def candidates(self) -> int:
        return len(self.pairs) + sum(self.dropped.values())


# --------------------------------------------------------------------------------------------- detection
def detect_format(record: dict[str, Any], where: Where) -> str:
    """Pick a format from the keys of the first record."""
    keys = set(record)
    if {"response_0", "response_1"} <= keys and keys & {"better_response_id", "safer_response_id"}:
        return "pku-saferlhf"
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys or isinstance(record.get("chosen"), list):
            return "pairwise"
        return "hh-rlhf"
    if {"prompt", "response"} <= keys and _numeric_attributes(record):
        return "helpsteer"
    raise where.error(
        f"cannot tell the format from the keys {sorted(keys)}: expected prompt/chosen/rejected (pairwise), "
        "chosen/rejected transcripts (hh-rlhf), response_0/response_1/better_response_id/safer_response_id "
        "(pku-saferlhf) or prompt/response plus numeric ratings (helpsteer); see docs/data-formats.md, "
        "or force one with --format"
    )


def _numeric_attributes(record: dict[str, Any]) -> list[str]:
    return [k for k, v in record.items() if k not in ("prompt", "response") and _is_number(v)]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------- field checks
def _field(rec: dict[str, Any], key: str, where: Where) -> Any:
    if key not in rec:
        raise where.error(f"missing field (the record has: {', '.join(sorted(rec)) or 'no fields'})", field=key)
    return rec[key]


def _text(value: Any, where: Where, name: str, what: str = "response") -> str:
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {_type_name(value)}", field=name)
    if not value.strip():
        raise where.error(f"empty (whitespace-only) {what}", field=name)
    return value


def _messages(value: Any, where: Where, name: str) -> list[Message]:
    """A list of {role, content} chat messages, checked item by item."""
    if not isinstance(value, list):
        raise where.error(f"expected a string or a list of chat messages, got {_type_name(value)}", field=name)
    if not value:
        raise where.error("empty list of messages", field=name)
    out = []
    for i, m in enumerate(value):
        f = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise where.error(f"expected a message object {{role, content}}, got {_type_name(m)}", field=f)
        for key in ("role", "content"):
            if key not in m:
                raise where.error("missing field in chat message", field=f"{f}.{key}")
        if not isinstance(m["role"], str) or not m["role"].strip():
            raise where.error(f"expected a role string, got {_type_name(m['role'])}", field=f"{f}.role")
        if not isinstance(m["content"], str):
            raise where.error(
                f"expected a string, got {_type_name(m['content'])} (multimodal content parts are not supported)",
                field=f"{f}.content",
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _response(value: Any, where: Where, name: str) -> str:
    """A response: a string, or a list with exactly one assistant message (TRL's conversational format)."""
    if isinstance(value, str):
        return _text(value, where, name)
    msgs = _messages(value, where, name)
    if len(msgs) != 1:
        raise where.error(
            f"expected one assistant message, got {len(msgs)} messages (earlier turns belong in 'prompt')", field=name
        )
    if msgs[0]["role"] != "assistant":
        raise where.error(f"expected role 'assistant', got {msgs[0]['role']!r}", field=f"{name}[0].role")
    return _text(msgs[0]["content"], where, f"{name}[0].content")


# --------------------------------------------------------------------------------------------- pairwise
def _pairwise(records: list[tuple[Where, dict]], dim: str, _cfg: Any) -> dict[str, DimPairs]:
    out = DimPairs()
    for where, rec in records:
        if "prompt" not in rec:
            _implicit_prompt(rec, where, out)
            continue
        raw_prompt = rec["prompt"]
        if isinstance(raw_prompt, str):
            prompt = [{"role": "user", "content": _text(raw_prompt, where, "prompt", "prompt")}]
        else:
            prompt = _messages(raw_prompt, where, "prompt")
        chosen = _response(_field(rec, "chosen", where), where, "chosen")
        rejected = _response(_field(rec, "rejected", where), where, "rejected")
        out.pairs.append(TextPair(prompt, chosen, rejected, where))
    return {dim: out}


def _implicit_prompt(rec: dict[str, Any], where: Where, out: DimPairs) -> None:
    """Conversational pairs without a prompt key: the prompt is the prefix the two conversations share."""
    c_raw, r_raw = _field(rec, "chosen", where), _field(rec, "rejected", where)
    if isinstance(c_raw, str):
        raise where.error(
            "no 'prompt' field, and chosen is a string: give a prompt, full conversations (lists of messages), "
            "or use --format hh-rlhf for '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts",
            field="prompt",
        )
    chosen, rejected = _messages(c_raw, where, "chosen"), _messages(r_raw, where, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if chosen == rejected:
        n = len(chosen) - 1  # identical conversations: a tie, dropped (and counted) later
    if len(chosen) - n != 1 or len(rejected) - n != 1:
        out.dropped["prompt_mismatch"] += 1
        return
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            last = f"{name}[{len(msgs) - 1}]"
            raise where.error(f"the last message must be the assistant's, got {msgs[-1]['role']!r}", field=f"{last}.role")
        _text(msgs[-1]["content"], where, f"{name}[{len(msgs) - 1}].content")
    if n == 0:
        raise where.error("the conversations share no prompt: they start with the assistant's answer", field="chosen")
    out.pairs.append(TextPair(chosen[:n], chosen[-1]["content"], rejected[-1]["content"], where))


# --------------------------------------------------------------------------------------------- hh-rlhf
def _hh(records: list[tuple[Where, dict]], dim: str, _cfg: Any) -> dict[str, DimPairs]:
    out = DimPairs()
    for where, rec in records:
        halves = []
        for name in ("chosen", "rejected"):
            text = _field(rec, name, where)
            if not isinstance(text, str):
                raise where.error(f"expected an HH-RLHF transcript string, got {_type_name(text)}", field=name)
            prompt, sep, response = _normalise_hh(text).rpartition(HH_LAST)
            if not sep:
                raise where.error(
                    "no '\\n\\nAssistant:' turn; an HH-RLHF transcript looks like "
                    "'\\n\\nHuman: ...\\n\\nAssistant: ...'",
                    field=name,
                )
            halves.append((prompt, response.strip()))
        (c_prompt, chosen), (r_prompt, rejected) = halves
        if c_prompt != r_prompt:
            # A few real pairs differ before the last turn: there is no single prompt to condition on.
            out.dropped["prompt_mismatch"] += 1
            continue
        if not chosen or not rejected:
            # Real HH-RLHF has a handful of empty final turns; they are data, not a broken file, so drop and count.
            out.dropped["empty_response"] += 1
            continue
        out.pairs.append(TextPair(hh_dialogue(c_prompt, where), chosen, rejected, where))
    return {dim: out}


def _normalise_hh(text: str) -> str:
    """Accept transcripts that start with 'Human:' without the leading blank line."""
    stripped = text.lstrip()
    return "\n\n" + stripped if stripped.startswith(("Human:", "Assistant:")) else text


def hh_dialogue(text: str, where: Where) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c' -> user/assistant/user chat messages."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise where.error("text before the first '\\n\\nHuman:' turn; not an HH-RLHF transcript", field="chosen")
    msgs = [{"role": HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]
    if not msgs:
        raise where.error("no '\\n\\nHuman:' turn before the last '\\n\\nAssistant:' turn", field="chosen")
    return msgs


# --------------------------------------------------------------------------------------------- PKU-SafeRLHF
def _pku(records: list[tuple[Where, dict]], dim: str, _cfg: Any) -> dict[str, DimPairs]:
    """One row labels the same two responses twice: more helpful (better_response_id), more harmless (safer_)."""
    out = {d: DimPairs() for d in PKU_DIMS}
    for where, rec in records:
        prompt = _text(_field(rec, "prompt", where), where, "prompt", "prompt")
        responses = [_text(_field(rec, f"response_{i}", where), where, f"response_{i}") for i in (0, 1)]
        for d, key in PKU_DIMS.items():
            best = _field(rec, key, where)
            if isinstance(best, bool) or not isinstance(best, int) or best not in (0, 1):
                raise where.error(f"expected 0 or 1, got {best!r}", field=key)
            out[d].pairs.append(TextPair([{"role": "user", "content": prompt}], responses[best], responses[1 - best], where))
    return out


# --------------------------------------------------------------------------------------------- HelpSteer
def helpsteer_attributes(first: dict[str, Any], where: Where, wanted: list[str] | None) -> list[str]:
    """The attributes that become dimensions: `wanted` (checked) or every numeric field of the first record."""
    found = _numeric_attributes(first)
    if wanted is None:
        if not found:
            raise where.error("no numeric rating fields (e.g. helpfulness, correctness) next to prompt/response")
        return found
    missing = [a for a in wanted if a not in found]
    if missing:
        raise UsageError(
            f"attributes: {', '.join(missing)} not found as numeric fields in {where.path}; it has: {', '.join(found) or 'none'}"
        )
    return list(wanted)


def _helpsteer(records: list[tuple[Where, dict]], dim: str, cfg: Any) -> dict[str, DimPairs]:
    """Rows of (prompt, response, scores): every two responses to a prompt whose score differs enough make a pair."""
    first_where, first = records[0]
    attrs = helpsteer_attributes(first, first_where, getattr(cfg, "attributes", None))
    gap = float(getattr(cfg, "min_score_gap", 1.0))
    groups: dict[str, list[tuple[Where, str, dict[str, float]]]] = defaultdict(list)
    for where, rec in records:
        prompt = _text(_field(rec, "prompt", where), where, "prompt", "prompt")
        response = _text(_field(rec, "response", where), where, "response")
        scores = {}
        for a in attrs:
            v = _field(rec, a, where)
            if not _is_number(v):
                raise where.error(f"expected a numeric rating, got {_type_name(v)}", field=a)
            scores[a] = float(v)
        groups[prompt].append((where, response, scores))
    out = {a: DimPairs() for a in attrs}
    for prompt, rows in groups.items():
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                (w_i, r_i, s_i), (_, r_j, s_j) = rows[i], rows[j]
                for a in attrs:
                    diff = s_i[a] - s_j[a]
                    if diff == 0 or abs(diff) < gap:
                        out[a].dropped["below_min_gap"] += 1
                        continue
                    chosen, rejected = (r_i, r_j) if diff > 0 else (r_j, r_i)
                    out[a].pairs.append(TextPair([{"role": "user", "content": prompt}], chosen, rejected, w_i))
    return out


# --------------------------------------------------------------------------------------------- entry points
ADAPTERS: dict[str, Callable[[list[tuple[Where, dict]], str, Any], dict[str, DimPairs]]] = {
    "pairwise": _pairwise,
    "hh-rlhf": _hh,
    "pku-saferlhf": _pku,
    "helpsteer": _helpsteer,
}


def adapt(fmt: str, records: list[tuple[Where, dict[str, Any]]], dim: str, cfg: Any = None) -> dict[str, DimPairs]:
    """Convert the records of one `--data DIM=SOURCE` into pairs, per output dimension.

    `pairwise` and `hh-rlhf` yield the dimension DIM; `pku-saferlhf` yields `helpful` and `harmless`;
    `helpsteer` yields one dimension per rating attribute.
    """
    if fmt not in ADAPTERS:
        raise UsageError(f"unknown format {fmt!r}; accepted: auto, {', '.join(FORMATS)}")
    result = ADAPTERS[fmt](records, dim, cfg)
    for name in result:
        if not DIM_PATTERN.match(name):
            raise InputError(
                f"{fmt} would create dimension {name!r}, which is not a valid dimension name", path=records[0][0].path
            )
    return result
