"""`hh-rlhf`: Anthropic HH-RLHF transcripts, `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`.

Each string is a whole dialogue, split at its last `\\n\\nAssistant:`: before it the prompt (turned into chat
messages so the model's own template renders it), after it the response.
"""

from __future__ import annotations

import re
from typing import Any

from ..records import Record, Where, json_type_name
from .fields import DimPairs, Message, TextPair, required, with_system

HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_LAST = "\n\nAssistant:"


def is_transcript(value: Any) -> bool:
    """Whether a string looks like an HH-RLHF dialogue (used by detection)."""
    return isinstance(value, str) and HH_LAST in normalise(value) and normalise(value).startswith("\n\nHuman:")


def adapt_hh(records: list[Record], dim: str, _cfg: Any) -> dict[str, DimPairs]:
    out = DimPairs()
    for where, rec in records:
        halves = []
        for name in ("chosen", "rejected"):
            text = required(rec, name, where)
            if not isinstance(text, str):
                raise where.error(f"expected an HH-RLHF transcript string, got {json_type_name(text)}", field=name)
            prompt, sep, response = normalise(text).rpartition(HH_LAST)
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
        out.pairs.append(TextPair(with_system(rec, where, hh_dialogue(c_prompt, where)), chosen, rejected, where))
    return {dim: out}


def normalise(text: str) -> str:
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
