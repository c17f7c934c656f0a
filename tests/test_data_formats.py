"""Format detection and every adapter: pairwise (standard, conversational, implicit prompt), HH-RLHF,
PKU-SafeRLHF and HelpSteer-style ratings, with their validation errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from spoctl.data.formats import adapt, detect_format, hh_dialogue
from spoctl.data.sources import Where
from spoctl.errors import InputError, UsageError

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def recs(*rows, unit="line"):
    return [(Where("f.jsonl", unit, i), r) for i, r in enumerate(rows, start=1)]


def run(fmt, *rows, dim="d", attributes=None, min_score_gap=1.0):
    return adapt(fmt, recs(*rows), dim, SimpleNamespace(attributes=attributes, min_score_gap=min_score_gap))


def err(fmt, *rows) -> str:
    with pytest.raises(InputError) as exc:
        run(fmt, *rows)
    return str(exc.value)


# ------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "pairwise"),
        ({"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")]}, "pairwise"),
        ({"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")]}, "pairwise"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "hh-rlhf"),
        ({"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}, "pku-saferlhf"),
        ({"prompt": "q", "response": "a", "helpfulness": 3, "verbosity": 1}, "helpsteer"),
    ],
)
def test_detect(record, fmt):
    assert detect_format(record, Where("f.jsonl", "line", 1)).format == fmt


def test_detect_unknown_names_the_keys_and_the_fix():
    with pytest.raises(InputError) as exc:
        detect_format({"question": "q", "answer": "a"}, Where("f.jsonl", "line", 1))
    msg = str(exc.value)
    assert msg.startswith("f.jsonl: line 1: cannot tell the format from the keys ['answer', 'question']")
    assert "--format" in msg


# ------------------------------------------------------------------------------------------- pairwise
def test_pairwise_standard_strings():
    (dim, out), = run("pairwise", {"prompt": "q", "chosen": "a", "rejected": "b", "extra": 1}).items()
    assert dim == "d"
    (p,) = out.pairs
    assert (p.prompt, p.chosen, p.rejected) == ([U("q")], "a", "b")
    assert p.where.index == 1


def test_pairwise_conversational():
    row = {"prompt": [{"role": "system", "content": "be nice"}, U("q")], "chosen": [A("a")], "rejected": [A("b")]}
    (p,) = run("pairwise", row)["d"].pairs
    assert p.prompt == row["prompt"] and (p.chosen, p.rejected) == ("a", "b")


def test_pairwise_implicit_prompt_takes_the_shared_prefix():
    row = {"chosen": [U("q"), A("x"), U("q2"), A("good")], "rejected": [U("q"), A("x"), U("q2"), A("bad")]}
    (p,) = run("pairwise", row)["d"].pairs
    assert p.prompt == [U("q"), A("x"), U("q2")] and (p.chosen, p.rejected) == ("good", "bad")


def test_pairwise_implicit_prompt_that_differs_earlier_is_dropped():
    row = {"chosen": [U("q"), A("x"), U("q2"), A("good")], "rejected": [U("q"), A("y"), U("q2"), A("bad")]}
    out = run("pairwise", row)["d"]
    assert out.pairs == [] and out.dropped == {"prompt_mismatch": 1} and out.candidates == 1


def test_pairwise_implicit_identical_conversations_become_a_tie():
    row = {"chosen": [U("q"), A("same")], "rejected": [U("q"), A("same")]}
    (p,) = run("pairwise", row)["d"].pairs
    assert p.chosen == p.rejected == "same"


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "q", "rejected": "b"}, "f.jsonl: line 1: field 'chosen': missing field (the record has: prompt, rejected)"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "f.jsonl: line 1: field 'chosen': expected a string or a list of chat messages, got a number"),
        ({"prompt": "q", "chosen": "a", "rejected": "  \n"}, "f.jsonl: line 1: field 'rejected': empty (whitespace-only) response"),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, "f.jsonl: line 1: field 'prompt': empty (whitespace-only) prompt"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "f.jsonl: line 1: field 'prompt': expected a string or a list of chat messages, got null"),
        ({"prompt": [U("q")], "chosen": [A("a"), A("b")], "rejected": [A("b")]}, "field 'chosen': expected one assistant message, got 2 messages"),
        ({"prompt": [U("q")], "chosen": [U("a")], "rejected": [A("b")]}, "field 'chosen[0].role': expected role 'assistant', got 'user'"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "field 'prompt[0].content': missing field in chat message"),
        ({"prompt": [{"role": "user", "content": [{"type": "text"}]}], "chosen": "a", "rejected": "b"}, "field 'prompt[0].content': expected a string, got a list (multimodal"),
        ({"prompt": ["hi"], "chosen": "a", "rejected": "b"}, "field 'prompt[0]': expected a message object {role, content}, got a string"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "field 'prompt': empty list of messages"),
        ({"prompt": [U("q")], "chosen": [A("")], "rejected": [A("b")]}, "field 'chosen[0].content': empty (whitespace-only) response"),
        ({"chosen": "a", "rejected": "b"}, "field 'prompt': no 'prompt' field, and chosen and rejected share no leading text"),
        ({"chosen": [U("q"), U("a")], "rejected": [U("q"), U("b")]}, "field 'chosen[1].role': the last message must be the assistant's"),
        ({"chosen": [A("a")], "rejected": [A("b")]}, "the conversations share no prompt"),
    ],
)
def test_pairwise_errors_name_line_and_field(row, expected):
    assert expected in err("pairwise", row)


def test_pairwise_error_on_a_later_record_names_that_record():
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2 + [{"prompt": "q", "chosen": "a"}]
    with pytest.raises(InputError) as exc:
        adapt("pairwise", recs(*rows, unit="record"), "d")
    assert str(exc.value).startswith("f.jsonl: record 3: field 'rejected': missing field")
    assert (exc.value.path, exc.value.field) == ("f.jsonl", "rejected")


# ------------------------------------------------------------------------------------------- HH-RLHF
def hh(*turns):
    return "".join(f"\n\n{who}: {text}" for who, text in turns)


def test_hh_single_turn():
    row = {"chosen": hh(("Human", "Hi?"), ("Assistant", " Hello! ")), "rejected": hh(("Human", "Hi?"), ("Assistant", "Go away."))}
    (p,) = run("hh-rlhf", row)["d"].pairs
    assert p.prompt == [U("Hi?")] and (p.chosen, p.rejected) == ("Hello!", "Go away.")


def test_hh_multi_turn_becomes_chat_messages():
    shared = [("Human", "q1"), ("Assistant", "a1"), ("Human", "q2 with Human: inside")]
    row = {"chosen": hh(*shared, ("Assistant", "good")), "rejected": hh(*shared, ("Assistant", "bad"))}
    (p,) = run("hh-rlhf", row)["d"].pairs
    assert p.prompt == [U("q1"), A("a1"), U("q2 with Human: inside")]


def test_hh_without_leading_blank_line():
    row = {"chosen": "Human: q\n\nAssistant: a", "rejected": "Human: q\n\nAssistant: b"}
    (p,) = run("hh-rlhf", row)["d"].pairs
    assert p.prompt == [U("q")]


def test_hh_prompt_mismatch_and_empty_responses_are_dropped_and_counted():
    rows = [
        {"chosen": hh(("Human", "q"), ("Assistant", "x"), ("Human", "r"), ("Assistant", "a")), "rejected": hh(("Human", "q"), ("Assistant", "b"))},
        {"chosen": hh(("Human", "q"), ("Assistant", "")), "rejected": hh(("Human", "q"), ("Assistant", "b"))},
        {"chosen": hh(("Human", "q"), ("Assistant", "a")), "rejected": hh(("Human", "q"), ("Assistant", "b"))},
    ]
    out = run("hh-rlhf", *rows)["d"]
    assert len(out.pairs) == 1 and out.pairs[0].where.index == 3
    assert out.dropped == {"prompt_mismatch": 1, "empty_response": 1} and out.candidates == 3


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"chosen": "just text", "rejected": hh(("Human", "q"), ("Assistant", "b"))}, "field 'chosen': no '\\n\\nAssistant:' turn"),
        ({"chosen": hh(("Human", "q"), ("Assistant", "b")), "rejected": 7}, "field 'rejected': expected an HH-RLHF transcript string, got a number"),
        ({"chosen": hh(("Human", "q"), ("Assistant", "b"))}, "field 'rejected': missing field"),
        ({"chosen": "preamble" + hh(("Human", "q"), ("Assistant", "a")), "rejected": "preamble" + hh(("Human", "q"), ("Assistant", "b"))}, "text before the first"),
    ],
)
def test_hh_errors(row, expected):
    msg = err("hh-rlhf", row)
    assert msg.startswith("f.jsonl: line 1: ") and expected in msg


def test_hh_dialogue_parser():
    assert hh_dialogue(hh(("Human", " a "), ("Assistant", ""), ("Human", "b")), Where("f", "line", 1)) == [U("a"), A(""), U("b")]


# ------------------------------------------------------------------------------------------- PKU-SafeRLHF
def pku(better, safer, **over):
    row = {"prompt": "How?", "response_0": "r0", "response_1": "r1", "better_response_id": better, "safer_response_id": safer,
           "is_response_0_safe": True}
    return {**row, **over}


def test_pku_one_file_two_dimensions():
    out = run("pku-saferlhf", pku(1, 1), pku(1, 0), dim="pku")
    assert list(out) == ["helpful", "harmless"]
    assert [(p.chosen, p.rejected) for p in out["helpful"].pairs] == [("r1", "r0"), ("r1", "r0")]
    assert [(p.chosen, p.rejected) for p in out["harmless"].pairs] == [("r1", "r0"), ("r0", "r1")]
    assert out["helpful"].pairs[0].prompt == [U("How?")]


@pytest.mark.parametrize(
    "row, expected",
    [
        (pku(2, 0), "field 'better_response_id': expected 0 or 1, got 2"),
        (pku(True, 0), "field 'better_response_id': expected 0 or 1, got True"),
        (pku(0, "1"), "field 'safer_response_id': expected 0 or 1, got '1'"),
        (pku(0, None), "field 'safer_response_id': expected 0 or 1, got None"),
        (pku(0, 1, response_1=""), "field 'response_1': empty (whitespace-only) response"),
        (pku(0, 1, response_0=["x"]), "field 'response_0': expected a string, got a list"),
    ],
)
def test_pku_errors(row, expected):
    msg = err("pku-saferlhf", row)
    assert msg.startswith("f.jsonl: line 1: ") and expected in msg


# ------------------------------------------------------------------------------------------- HelpSteer
def hs(prompt, response, helpfulness, verbosity, **extra):
    return {"prompt": prompt, "response": response, "helpfulness": helpfulness, "verbosity": verbosity, **extra}


def test_helpsteer_every_attribute_is_a_dimension():
    rows = [hs("p", "a", 4, 1), hs("p", "b", 2, 1), hs("p", "c", 3, 3), hs("q", "z", 1, 0)]
    out = run("helpsteer", *rows)
    assert list(out) == ["helpfulness", "verbosity"]
    assert [(p.chosen, p.rejected) for p in out["helpfulness"].pairs] == [("a", "b"), ("a", "c"), ("c", "b")]
    assert out["helpfulness"].dropped == {}
    assert [(p.chosen, p.rejected) for p in out["verbosity"].pairs] == [("c", "a"), ("c", "b")]
    assert out["verbosity"].dropped == {"below_min_gap": 1}  # a vs b: equal verbosity


def test_helpsteer_min_gap_and_attribute_choice():
    rows = [hs("p", "a", 4, 1), hs("p", "b", 3.5, 0), hs("p", "c", 2, 3)]
    out = run("helpsteer", *rows, attributes=["helpfulness"], min_score_gap=2.0)
    assert list(out) == ["helpfulness"]
    assert [(p.chosen, p.rejected) for p in out["helpfulness"].pairs] == [("a", "c")]
    assert out["helpfulness"].dropped == {"below_min_gap": 2}


def test_helpsteer_unknown_attribute():
    with pytest.raises(UsageError, match="attributes: honesty not found as numeric fields in f.jsonl; it has: helpfulness, verbosity"):
        run("helpsteer", hs("p", "a", 1, 1), attributes=["honesty"])


@pytest.mark.parametrize(
    "row, expected",
    [
        (hs("p", "b", "high", 1), "line 2: field 'helpfulness': expected a numeric rating, got a string"),
        ({"prompt": "p", "response": "b", "verbosity": 1}, "line 2: field 'helpfulness': missing field"),
        (hs("p", " ", 1, 1), "line 2: field 'response': empty (whitespace-only) response"),
    ],
)
def test_helpsteer_errors(row, expected):
    assert expected in err("helpsteer", hs("p", "a", 1, 1), row)


def test_helpsteer_without_ratings():
    assert "no numeric rating fields" in err("helpsteer", {"prompt": "p", "response": "a", "note": "x"})


def test_unknown_format():
    with pytest.raises(UsageError, match="unknown format 'tsv'"):
        adapt("tsv", recs({"a": 1}), "d")
