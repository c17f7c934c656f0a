"""What every format adapter produces (`TextPair`, `DimPairs`) and the field checks they share.

Each check raises an InputError naming the file, the line or record, and the field (`chosen[1].content`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..records import Where, json_type_name, key_list, printable

Message = dict[str, str]


@dataclass(slots=True)  # prepare holds one per pair: no per-instance __dict__
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

    def extend(self, other: "DimPairs") -> None:
        self.pairs.extend(other.pairs)
        self.dropped.update(other.dropped)


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def system_message(rec: dict[str, Any], where: Where) -> list[Message]:
    """The record's optional `system` field (e.g. mapped with --columns system=COLUMN) as a leading system message;
    nothing when it is absent, null or blank. Every format with a prompt reads it, so no mapping loses it."""
    value = rec.get("system")
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    return [{"role": "system", "content": text(value, where, "system", "system prompt")}]


def with_system(rec: dict[str, Any], where: Where, prompt: list[Message]) -> list[Message]:
    """`prompt` after the record's system message, unless the prompt already starts with one of its own."""
    if prompt and prompt[0]["role"] == "system":
        if system_message(rec, where):
            raise where.error("the prompt already starts with a system message; give the system prompt once",
                              field="system")
        return prompt
    return system_message(rec, where) + prompt


def required(rec: dict[str, Any], key: str, where: Where) -> Any:
    if key not in rec:
        raise where.error(f"missing field (the record has: {key_list(rec)})", field=printable(key))
    return rec[key]


def text(value: Any, where: Where, name: str, what: str = "response") -> str:
    """A non-empty string."""
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {json_type_name(value)}", field=name)
    if not value.strip():
        raise where.error(f"empty (whitespace-only) {what}", field=name)
    return value


def messages(value: Any, where: Where, name: str, *, role_key: str = "role", content_key: str = "content",
             roles: dict[str, str] | None = None) -> list[Message]:
    """A list of chat messages, checked item by item and returned as {role, content}.

    `role_key`/`content_key` read other spellings (ShareGPT's from/value); `roles` maps their role names.
    """
    if not isinstance(value, list):
        raise where.error(f"expected a string or a list of chat messages, got {json_type_name(value)}", field=name)
    if not value:
        raise where.error("empty list of messages", field=name)
    return [message(m, where, f"{name}[{i}]", role_key=role_key, content_key=content_key, roles=roles)
            for i, m in enumerate(value)]


def message(m: Any, where: Where, name: str, *, role_key: str = "role", content_key: str = "content",
            roles: dict[str, str] | None = None) -> Message:
    if not isinstance(m, dict):
        raise where.error(f"expected a message object {{{role_key}, {content_key}}}, got {json_type_name(m)}", field=name)
    for key in (role_key, content_key):
        if key not in m:
            raise where.error("missing field in chat message", field=f"{name}.{key}")
    role, content = m[role_key], m[content_key]
    if not isinstance(role, str) or not role.strip():
        raise where.error(f"expected a role string, got {json_type_name(role)}", field=f"{name}.{role_key}")
    if roles is not None:
        if role not in roles:
            raise where.error(f"unknown role {role!r}; expected one of: {', '.join(roles)}", field=f"{name}.{role_key}")
        role = roles[role]
    if not isinstance(content, str):
        raise where.error(
            f"expected a string, got {json_type_name(content)} (multimodal content parts are not supported)",
            field=f"{name}.{content_key}",
        )
    return {"role": role, "content": content}


def prompt_messages(value: Any, where: Where, name: str = "prompt") -> list[Message]:
    """A prompt: a string (one user message) or a list of chat messages."""
    if isinstance(value, str):
        return [user(text(value, where, name, "prompt"))]
    return messages(value, where, name)


def answer(msg: Message, where: Where, name: str) -> str:
    """The content of a conversation's final assistant message."""
    if msg["role"] != "assistant":
        raise where.error(f"the last message must be the assistant's, got {msg['role']!r}", field=f"{name}.role")
    return text(msg["content"], where, f"{name}.content")


def split_conversations(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], int] | None:
    """(shared prompt, its length) of two whole conversations that differ only in their last message, else None.

    Identical conversations share all but their last message (a tie, dropped and counted later).
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if chosen == rejected:
        n = len(chosen) - 1
    if len(chosen) - n != 1 or len(rejected) - n != 1:
        return None
    return chosen[:n], n
