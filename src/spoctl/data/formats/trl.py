"""`pairwise`: TRL's preference formats, plus the UltraFeedback-binarized shape.

Each record is read by its own shape, so a file may mix them:

- explicit prompt, standard:        {"prompt": str, "chosen": str, "rejected": str}
- explicit prompt, conversational:  {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]}
- full conversations with a prompt: {"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant]}
  (UltraFeedback-binarized; the conversations' shared turns are the prompt, the `prompt` column must be one of them)
- implicit prompt, conversational:  {"chosen": [...whole conversation], "rejected": [...]}
- implicit prompt, standard:        {"chosen": "The sky is blue.", "rejected": "The sky is green."}
  (the prompt is the shared leading text, cut at the last whitespace before the first difference)
"""

from __future__ import annotations

from typing import Any

from ..records import Record, Where
from .fields import (DimPairs, Message, TextPair, answer, messages, prompt_messages, required, split_conversations,
                     text, user, with_system)


def adapt_pairwise(records: list[Record], dim: str, _cfg: Any) -> dict[str, DimPairs]:
    out = DimPairs()
    for where, rec in records:
        chosen, rejected = required(rec, "chosen", where), required(rec, "rejected", where)
        if "prompt" not in rec:
            pair = _implicit(chosen, rejected, where, out)
        elif is_conversation(chosen):
            pair = _full_conversations(rec["prompt"], chosen, rejected, where, out)
        else:
            prompt = prompt_messages(rec["prompt"], where)
            pair = TextPair(prompt, _response(chosen, where, "chosen"), _response(rejected, where, "rejected"), where)
        if pair is not None:
            pair.prompt = with_system(rec, where, pair.prompt)
            out.pairs.append(pair)
    return {dim: out}


def is_conversation(value: Any) -> bool:
    """A list whose first message is not the assistant's: a whole conversation rather than one answer."""
    return (isinstance(value, list) and len(value) > 1 and isinstance(value[0], dict)
            and value[0].get("role") != "assistant")


def _response(value: Any, where: Where, name: str) -> str:
    """A response: a string, or a list with exactly one assistant message (TRL's conversational format)."""
    if isinstance(value, str):
        return text(value, where, name)
    msgs = messages(value, where, name)
    if len(msgs) != 1:
        raise where.error(
            f"expected one assistant message, got {len(msgs)} messages (earlier turns belong in 'prompt')", field=name
        )
    if msgs[0]["role"] != "assistant":
        raise where.error(f"expected role 'assistant', got {msgs[0]['role']!r}", field=f"{name}[0].role")
    return text(msgs[0]["content"], where, f"{name}[0].content")


def _conversation_pair(c_raw: Any, r_raw: Any, where: Where, out: DimPairs) -> TextPair | None:
    chosen, rejected = messages(c_raw, where, "chosen"), messages(r_raw, where, "rejected")
    split = split_conversations(chosen, rejected)
    if split is None:
        out.dropped["prompt_mismatch"] += 1
        return None
    prompt, n = split
    c_text = answer(chosen[-1], where, f"chosen[{len(chosen) - 1}]")
    r_text = answer(rejected[-1], where, f"rejected[{len(rejected) - 1}]")
    if n == 0:
        raise where.error("the conversations share no prompt: they start with the assistant's answer", field="chosen")
    return TextPair(prompt, c_text, r_text, where)


def _implicit(c_raw: Any, r_raw: Any, where: Where, out: DimPairs) -> TextPair | None:
    if isinstance(c_raw, str) and isinstance(r_raw, str):
        return _shared_text(c_raw, r_raw, where)
    return _conversation_pair(c_raw, r_raw, where, out)


def _full_conversations(p_raw: Any, c_raw: Any, r_raw: Any, where: Where, out: DimPairs) -> TextPair | None:
    pair = _conversation_pair(c_raw, r_raw, where, out)
    if pair is None:
        return None
    if not _prompt_agrees(p_raw, pair.prompt):
        # The prompt column says something the conversations do not: no single prompt to condition on.
        out.dropped["prompt_mismatch"] += 1
        return None
    return pair


def _prompt_agrees(p_raw: Any, shared: list[Message]) -> bool:
    if isinstance(p_raw, str):
        return any(m["role"] == "user" and m["content"].strip() == p_raw.strip() for m in shared)
    return p_raw == shared


def _shared_text(chosen: str, rejected: str, where: Where) -> TextPair:
    """Standard implicit prompt: the leading text both strings share, up to whole words."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = n
    # Back up to a word boundary so that "The sky is blue" / "The sky is black" keeps "blue" and "black" whole.
    while cut > 0 and not chosen[cut - 1].isspace():
        cut -= 1
    prompt = chosen[:cut].strip()
    if not prompt:
        raise where.error(
            "no 'prompt' field, and chosen and rejected share no leading text to use as the prompt: give a prompt"
            " (or map a column to it with --columns prompt=COLUMN), or use --format hh-rlhf for"
            " '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts",
            field="prompt",
        )
    return TextPair([user(prompt)], text(chosen[cut:].strip(), where, "chosen"),
                    text(rejected[cut:].strip(), where, "rejected"), where)
