"""`ranked`: a prompt with a ranked list of answers, as berkeley-nest/Nectar publishes it:

    {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "answers": [{"answer": "...", "model": "...", "rank": 1.0}, ...]}

Rank 1 is the best. `answers` may also be a plain list of strings, best first. The prompt is an HH-style transcript
(turned into chat messages, its trailing empty `Assistant:` turn removed) or plain text (one user message). Pairs
follow the rule in spoctl.data.formats.ranking, with the rank difference as the score gap.
"""

from __future__ import annotations

from typing import Any

from ..records import Record, Where, json_type_name
from .fields import DimPairs, Message, required, text, user, with_system
from .hh import HH_LAST, hh_dialogue, normalise
from .ranking import pair_scored, rating


def adapt_ranked(records: list[Record], dim: str, opts: Any) -> dict[str, DimPairs]:
    out = DimPairs()
    for where, rec in records:
        prompt = with_system(rec, where, ranked_prompt(required(rec, "prompt", where), where))
        answers = required(rec, "answers", where)
        if not isinstance(answers, list):
            raise where.error(f"expected a list of ranked answers, got {json_type_name(answers)}", field="answers")
        scored = [_answer(a, i, where) for i, a in enumerate(answers)]
        pair_scored(prompt, scored, where, out, opts)
    return {dim: out}


def ranked_prompt(value: Any, where: Where) -> list[Message]:
    """Nectar's '\\n\\nHuman: ...\\n\\nAssistant:' transcript as chat messages, or a plain prompt as one user turn."""
    raw = text(value, where, "prompt", "prompt")
    dialogue = normalise(raw).rstrip()
    if dialogue.startswith("\n\nHuman:"):
        if dialogue.endswith(HH_LAST):
            dialogue = dialogue[: -len(HH_LAST)]
        msgs = hh_dialogue(dialogue, where)
        if msgs[-1]["role"] != "user":
            raise where.error("the transcript must end with the human's turn (or an empty 'Assistant:')", field="prompt")
        return msgs
    return [user(raw)]


def _answer(item: Any, i: int, where: Where) -> tuple[str, float | None]:
    """(answer text, score) with score = -rank, so that higher is better."""
    name = f"answers[{i}]"
    if isinstance(item, str):
        return text(item, where, name), float(-i)
    if not isinstance(item, dict):
        raise where.error(f"expected an answer object {{answer, rank}} or a string, got {json_type_name(item)}", field=name)
    for key in ("answer", "rank"):
        if key not in item:
            raise where.error("missing field in a ranked answer", field=f"{name}.{key}")
    answer = text(item["answer"], where, f"{name}.answer")
    try:
        rank = rating(item["rank"])
    except ValueError:
        raise where.error(f"expected a numeric rank, got {json_type_name(item['rank'])}", field=f"{name}.rank") from None
    return answer, None if rank is None else -rank
