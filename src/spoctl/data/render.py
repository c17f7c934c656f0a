"""Rendering pairs as the model will see them (chat template or HH-style plain text), tokenizing, and the length policy.

Prompts end with the generation prompt (e.g. `<|im_start|>assistant\\n`), so the completion ids are exactly the
tokens the model must produce: the response text followed by the end-of-turn token (the tokenizer's EOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..config import LengthPolicy
from ..errors import UsageError
from .formats import Message, TextPair
from .records import Where

# Plain-text rendering for tokenizers without a chat template: the HH-RLHF transcript convention.
PLAIN_ROLES = {"user": "Human", "assistant": "Assistant", "system": None}
# Texts per tokenizer call: many for the Rust tokenizer's batching, but never more than BATCH_CHARS characters,
# because the tokenizer's memory grows with the characters of a call (a 5 MB text alone took 2 GB).
BATCH = 256
BATCH_CHARS = 2_000_000


def batches(texts: Sequence[str]) -> Iterator[tuple[int, int]]:
    """(start, end) ranges of `texts`, each at most BATCH texts and BATCH_CHARS characters (at least one text)."""
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and end - start < BATCH and (end == start or chars + len(texts[end]) <= BATCH_CHARS):
            chars += len(texts[end])
            end += 1
        yield start, end
        start = end


class Renderer:
    """Turns chat messages and responses into token ids for one tokenizer."""

    def __init__(self, tokenizer: Any, model_spec: str, system_prompt: str | None = None):
        self.tok = tokenizer
        self.model_spec = model_spec
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.eos_token_id is None:
            raise UsageError(f"the tokenizer of '{model_spec}' has no end-of-sequence token to close each response")
        self.eos_id: int = int(tokenizer.eos_token_id)

    def messages(self, prompt: list[Message]) -> list[Message]:
        """The prompt messages with the configured system prompt first (unless the data brings its own)."""
        if self.system_prompt and (not prompt or prompt[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *prompt]
        return list(prompt)

    # ------------------------------------------------------------------------------------------ prompts
    def conversation_texts(self, convs: Sequence[list[Message]], wheres: Sequence[Where]) -> list[str]:
        """Each conversation as prompt text, ending where the assistant's answer begins."""
        if not self.has_template:
            return [plain_prompt(c) for c in convs]
        try:
            return list(self.tok.apply_chat_template(list(convs), add_generation_prompt=True, tokenize=False))
        except Exception:
            # Some templates refuse some conversations (e.g. strict user/assistant alternation): find which one.
            texts = []
            for conv, where in zip(convs, wheres):
                try:
                    texts.append(self.tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))
                except Exception as err:
                    raise where.error(
                        f"the chat template of '{self.model_spec}' cannot render this prompt: {type(err).__name__}: {err}",
                        field="prompt",
                    ) from None
            return texts

    def conversation_ids(self, convs: Sequence[list[Message]], wheres: Sequence[Where]) -> list[list[int]]:
        """Token ids of each conversation rendered as a prompt (system prompt already in the messages).

        Templates carry their own special tokens (BOS etc.); plain text gets the tokenizer's.
        """
        out: list[list[int]] = []
        for start in range(0, len(convs), BATCH):
            texts = self.conversation_texts(convs[start : start + BATCH], wheres[start : start + BATCH])
            # Same as apply_chat_template(tokenize=True), which also tokenizes with add_special_tokens=False.
            out.extend(self._encode(texts, add_special_tokens=not self.has_template))
        return out

    def prompt_ids(self, pairs: Sequence[TextPair]) -> list[list[int]]:
        """Token ids of each pair's prompt, with the configured system prompt."""
        return self.conversation_ids([self.messages(p.prompt) for p in pairs], [p.where for p in pairs])

    # ------------------------------------------------------------------------------------------ responses
    def completion_ids(self, responses: Sequence[str]) -> list[list[int]]:
        """Response tokens plus the end token. Without a template the response follows 'Assistant:' after a space."""
        lead = "" if self.has_template else " "
        return [ids + [self.eos_id] for ids in self._encode([lead + r for r in responses], add_special_tokens=False)]

    def text_ids(self, text: str) -> list[int]:
        """Plain token ids of a text (no special tokens)."""
        return self._encode([text], add_special_tokens=False)[0]

    def _encode(self, texts: Sequence[str], *, add_special_tokens: bool) -> list[list[int]]:
        out: list[list[int]] = []
        for start, end in batches(texts):
            enc = self.tok(list(texts[start:end]), add_special_tokens=add_special_tokens, return_attention_mask=False)
            out.extend([list(ids) for ids in enc["input_ids"]])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text exactly as the model sees it, special tokens included."""
        return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def plain_prompt(messages: list[Message]) -> str:
    """HH-style text: an optional system line, then '\\n\\nHuman: ...\\n\\nAssistant: ...', ending with '\\n\\nAssistant:'."""
    parts = []
    for m in messages:
        label = PLAIN_ROLES.get(m["role"], m["role"].capitalize())
        parts.append(m["content"] if label is None else f"\n\n{label}: {m['content']}")
    return "".join(parts) + "\n\nAssistant:"


# ---------------------------------------------------------------------------------------------- length policy
@dataclass
class Fitted:
    """Token ids after the length policy; `drop` names the reason when the pair is dropped."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: bool = False
    drop: str | None = None


def fit_length(prompt: list[int], chosen: list[int], rejected: list[int], policy: LengthPolicy) -> Fitted:
    """Apply max_prompt_tokens and max_length (prompt + the longer response).

    A prompt still over max_prompt_tokens here loses its START (the `keep-end` policy; `keep-system-and-recent`
    has already cut whole turns in spoctl.data.truncate), each response loses its END.
    """
    too_long_prompt = len(prompt) > policy.max_prompt_tokens
    if policy.overflow == "drop":
        if too_long_prompt:
            return Fitted(prompt, chosen, rejected, drop="prompt_too_long")
        if len(prompt) + max(len(chosen), len(rejected)) > policy.max_length:
            return Fitted(prompt, chosen, rejected, drop="too_long")
        return Fitted(prompt, chosen, rejected)
    truncated = False
    if too_long_prompt:
        prompt, truncated = prompt[-policy.max_prompt_tokens :], True
    budget = policy.max_length - len(prompt)
    if len(chosen) > budget or len(rejected) > budget:
        chosen, rejected, truncated = chosen[:budget], rejected[:budget], True
        if chosen == rejected:
            # The responses differed only past the cut: no preference signal is left.
            return Fitted(prompt, chosen, rejected, truncated=True, drop="tie_after_truncation")
    return Fitted(prompt, chosen, rejected, truncated=truncated)
