"""LLaMA-Factory's two ranking (preference) shapes, as its data/README describes them.

- `alpaca-ranking`:   {"instruction", "input"?, "chosen", "rejected", "system"?, "history"?: [[query, answer], ...]}
  The user turn is instruction and input joined by a newline, after the history turns (LLaMA-Factory's rule).
- `sharegpt-ranking`: {"conversations": [{"from": "human", "value": ...}, ...], "chosen": {"from": "gpt", "value": ...},
  "rejected": {...}, "system"?}. Roles human/gpt/system; the OpenAI spelling (role/content, user/assistant) too.
"""

from __future__ import annotations

from typing import Any

from ..records import Record, Where, json_type_name
from .fields import DimPairs, Message, TextPair, message, messages, required, system_message, text, user

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
                  "user": "user", "assistant": "assistant"}


def adapt_alpaca(records: list[Record], dim: str, _cfg: Any) -> dict[str, DimPairs]:
    out = DimPairs()
    for where, rec in records:
        prompt = system_message(rec, where) + _history(rec.get("history"), where)
        query = [text(required(rec, "instruction", where), where, "instruction", "instruction")]
        extra = rec.get("input")
        if extra is not None and not isinstance(extra, str):
            raise where.error(f"expected a string, got {json_type_name(extra)}", field="input")
        if extra and extra.strip():
            query.append(extra)
        prompt.append(user("\n".join(query)))
        chosen = text(required(rec, "chosen", where), where, "chosen")
        rejected = text(required(rec, "rejected", where), where, "rejected")
        out.pairs.append(TextPair(prompt, chosen, rejected, where))
    return {dim: out}


def _history(value: Any, where: Where) -> list[Message]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise where.error(f"expected a list of [query, answer] pairs, got {json_type_name(value)}", field="history")
    turns: list[Message] = []
    for i, item in enumerate(value):
        if not (isinstance(item, list) and len(item) == 2):
            raise where.error(f"expected a [query, answer] pair, got {json_type_name(item)}", field=f"history[{i}]")
        turns.append(user(text(item[0], where, f"history[{i}][0]", "query")))
        turns.append({"role": "assistant", "content": text(item[1], where, f"history[{i}][1]")})
    return turns


def adapt_sharegpt(records: list[Record], dim: str, _cfg: Any) -> dict[str, DimPairs]:
    out = DimPairs()
    for where, rec in records:
        conv = required(rec, "conversations", where)
        keys = _keys(conv)
        prompt = system_message(rec, where) + messages(conv, where, "conversations", role_key=keys[0], content_key=keys[1],
                                                roles=SHAREGPT_ROLES)
        if prompt[-1]["role"] != "user":
            last = f"conversations[{len(conv) - 1}].{keys[0]}"
            raise where.error(f"the last turn must be the user's (human), got {prompt[-1]['role']!r}", field=last)
        answers = [_answer(required(rec, name, where), where, name) for name in ("chosen", "rejected")]
        out.pairs.append(TextPair(prompt, answers[0], answers[1], where))
    return {dim: out}


def _answer(raw: Any, where: Where, name: str) -> str:
    role_key, content_key = _keys([raw])
    m = message(raw, where, name, role_key=role_key, content_key=content_key, roles=SHAREGPT_ROLES)
    if m["role"] != "assistant":
        raise where.error(f"expected the assistant's (gpt) answer, got role {m['role']!r}", field=f"{name}.{role_key}")
    return text(m["content"], where, f"{name}.{content_key}")


def _keys(conv: Any) -> tuple[str, str]:
    """ShareGPT's from/value spelling, or the OpenAI role/content one, judged by the first message."""
    first = conv[0] if isinstance(conv, list) and conv else None
    if isinstance(first, dict) and "from" in first:
        return "from", "value"
    return "role", "content"
