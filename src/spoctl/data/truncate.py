"""Cutting an over-long prompt at message boundaries (`length.prompt_truncation: keep-system-and-recent`).

The system prompt and the most recent turns are what the answer depends on, so they stay: the oldest whole turns
go first (a turn is a user message and everything up to the next one), and only when the last user turn alone
is still too long is the start of that message cut, at a token boundary and without a marker. The result is
always a conversation the chat template renders normally: never a prompt that starts mid-message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .formats import Message
from .records import Where


@dataclass
class PromptFit:
    """A prompt within the limit: its ids, the messages they render, and what was cut to get there."""

    ids: list[int]
    messages: list[Message]
    turns_dropped: int = 0
    message_cut: bool = False
    drop: str | None = None  # 'prompt_too_long' when even the system prompt and an empty user turn do not fit


def fit_prompt(renderer: Any, conv: list[Message], where: Where, limit: int) -> PromptFit:
    """The longest recent part of `conv` (system prompt kept) whose rendering has at most `limit` tokens."""
    head = conv[:1] if conv and conv[0]["role"] == "system" else []
    body = conv[len(head):]
    starts = [i for i, m in enumerate(body) if m["role"] == "user" and i > 0]

    def render(messages: list[Message]) -> list[int]:
        return renderer.conversation_ids([messages], [where])[0]

    # Fewer messages render shorter, so the first start that fits is found by bisection.
    lo, hi, best = 0, len(starts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = render(head + body[starts[mid]:])
        if len(ids) <= limit:
            best, hi = (mid, ids), mid - 1
        else:
            lo = mid + 1
    if best is not None:
        start = starts[best[0]]
        return PromptFit(best[1], head + body[start:], turns_dropped=_turns(body[:start]))
    last = starts[-1] if starts else 0
    if not body or body[last]["role"] != "user":
        return PromptFit(render(conv), conv, drop="prompt_too_long")
    return _cut_last_user(renderer, head, body, last, render, limit)


def _turns(dropped: list[Message]) -> int:
    return sum(1 for m in dropped if m["role"] == "user")


def _cut_last_user(renderer: Any, head: list[Message], body: list[Message], last: int, render: Any,
                   limit: int) -> PromptFit:
    """Keep the end of the last user message: the tokens the budget leaves after the template's own tokens."""
    tail = body[last + 1:]
    message = body[last]
    overhead = len(render(head + [{**message, "content": ""}] + tail))
    content = renderer.text_ids(message["content"])
    budget = limit - overhead
    # Decoding a token tail and re-encoding it can merge differently at the cut; a few tries shrink it to fit.
    for _ in range(8):
        if budget <= 0:
            break
        kept = renderer.tok.decode(content[-budget:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        kept = kept.lstrip("\ufffd")  # a cut inside a multi-byte character leaves a replacement character
        messages = head + [{**message, "content": kept}] + tail
        ids = render(messages)
        if len(ids) <= limit:
            return PromptFit(ids, messages, turns_dropped=_turns(body[:last]), message_cut=True)
        budget -= len(ids) - limit
    return PromptFit(render(head + body[last:]), head + body[last:], drop="prompt_too_long")
