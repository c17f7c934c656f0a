"""Rendering prompts with and without a chat template, completions with the end token, and the length policy."""

from __future__ import annotations

import pytest

from spoctl.config import LengthPolicy
from spoctl.data.formats import TextPair
from spoctl.data.render import Renderer, fit_length, plain_prompt
from spoctl.data.sources import Where
from spoctl.errors import InputError
from spoctl.models import load_tokenizer

W = Where("f.jsonl", "line", 7)
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


@pytest.fixture(scope="module")
def chat_tok(tiny_tokenizer_dir):
    return load_tokenizer(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def plain_tok(tiny_plain_tokenizer_dir):
    return load_tokenizer(str(tiny_plain_tokenizer_dir))


def test_chat_template_prompt_matches_apply_chat_template(chat_tok):
    r = Renderer(chat_tok, "tiny")
    conv = [U("Hi there?"), A("Hello."), U("Tell me a joke, 42!")]
    (ids,) = r.prompt_ids([TextPair(conv, "a", "b", W)])
    reference = chat_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference
    assert ids == list(reference)
    text = r.decode(ids)
    assert text == "<|im_start|>user\nHi there?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nTell me a joke, 42!<|im_end|>\n<|im_start|>assistant\n"


def test_completion_is_the_response_plus_the_end_token(chat_tok):
    r = Renderer(chat_tok, "tiny")
    (ids,) = r.completion_ids(["Sure: héllo — 🙂"])
    assert ids[-1] == chat_tok.eos_token_id == chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert r.decode(ids) == "Sure: héllo — 🙂<|im_end|>"


def test_system_prompt_is_prepended_once(chat_tok):
    r = Renderer(chat_tok, "tiny", system_prompt="Be brief.")
    assert r.messages([U("q")]) == [{"role": "system", "content": "Be brief."}, U("q")]
    own = [{"role": "system", "content": "Mine."}, U("q")]
    assert r.messages(own) == own
    (ids,) = r.prompt_ids([TextPair([U("q")], "a", "b", W)])
    assert r.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq")


def test_plain_rendering_without_a_template(plain_tok):
    r = Renderer(plain_tok, "tiny-plain", system_prompt="Sys.")
    assert not r.has_template
    (p,) = r.prompt_ids([TextPair([U("q1"), A("a1"), U("q2")], "x", "y", W)])
    assert r.decode(p) == "Sys.\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:"
    (c,) = r.completion_ids(["fine"])
    assert r.decode(c) == " fine<|endoftext|>" and c[-1] == plain_tok.eos_token_id
    assert plain_prompt([U("hi")]) == "\n\nHuman: hi\n\nAssistant:"


def test_many_prompts_are_batched_in_order(chat_tok):
    r = Renderer(chat_tok, "tiny")
    pairs = [TextPair([U(f"question {i}")], "a", "b", W) for i in range(600)]
    ids = r.prompt_ids(pairs)
    assert len(ids) == 600 and r.decode(ids[437]).endswith("question 437<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_that_refuses_a_prompt_names_the_record(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations must start with the user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    r = Renderer(tok, "strict")
    good, bad = TextPair([U("q")], "a", "b", Where("f.jsonl", "line", 1)), TextPair([A("x"), U("q")], "a", "b", W)
    with pytest.raises(InputError) as exc:
        r.prompt_ids([good, bad])
    assert str(exc.value).startswith("f.jsonl: line 7: field 'prompt': the chat template of 'strict' cannot render this prompt")
    assert "must start with the user" in str(exc.value)


# ------------------------------------------------------------------------------------------- length policy
POLICY = LengthPolicy(max_prompt_tokens=4, max_length=8, overflow="truncate")


def test_fitting_pairs_are_untouched():
    f = fit_length([1, 2, 3], [4, 5], [6], POLICY)
    assert (f.prompt, f.chosen, f.rejected, f.truncated, f.drop) == ([1, 2, 3], [4, 5], [6], False, None)


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_responses():
    f = fit_length([1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15], [20, 21], POLICY)
    assert f.prompt == [3, 4, 5, 6] and f.chosen == [10, 11, 12, 13] and f.rejected == [20, 21]
    assert f.truncated and f.drop is None
    f = fit_length([1, 2], [10] * 9, [20], POLICY)
    assert f.prompt == [1, 2] and len(f.chosen) == 6 and f.truncated


def test_truncation_that_leaves_identical_responses_is_a_drop():
    f = fit_length([1, 2, 3, 4], [7, 7, 7, 7, 1], [7, 7, 7, 7, 2], POLICY)
    assert f.drop == "tie_after_truncation"


def test_drop_policy():
    drop = LengthPolicy(max_prompt_tokens=4, max_length=8, overflow="drop")
    assert fit_length([1] * 5, [1], [1], drop).drop == "prompt_too_long"
    assert fit_length([1] * 4, [1] * 5, [1], drop).drop == "too_long"
    assert fit_length([1] * 4, [1] * 4, [1], drop).drop is None
