"""Every data shape prepare reads, from a small real-looking fixture each (tests/fixtures/data), through the CLI:
what detection says, the pairs it makes, the column mapping, and taking only some dimensions of a source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.config import PrepareConfig
from spoctl.data.formats import FORMATS, FORMAT_NAMES, adapt, detect_format
from spoctl.data.sources import Where
from spoctl.data.store import load_prepared
from spoctl.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
runner = CliRunner()


def prepare(tmp_path: Path, tok: Path, *args: str):
    return runner.invoke(app, ["prepare", "--model", str(tok), "--out", str(tmp_path / "out"), *args])


def rows(tmp_path: Path, dim: str) -> list[dict]:
    data = load_prepared(tmp_path / "out")
    return list(data.split(dim, "train")) + list(data.split(dim, "eval"))


def by_chosen(tmp_path: Path, dim: str) -> dict[str, dict]:
    return {r["chosen"]: r for r in rows(tmp_path, dim)}


def messages(row: dict) -> list[dict]:
    return json.loads(row["prompt_messages"])


U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


# ------------------------------------------------------------------------------------------- one test per shape
@pytest.mark.parametrize(
    "fixture, fmt, shape, because",
    [
        ("trl_standard_explicit.jsonl", "pairwise", "standard, explicit prompt", "the record has prompt, chosen and rejected"),
        ("trl_conversational_explicit.jsonl", "pairwise", "conversational, explicit prompt", "prompt is a list of chat messages"),
        ("trl_conversational_implicit.jsonl", "pairwise", "conversational, implicit prompt", "without a prompt column"),
        ("trl_standard_implicit.jsonl", "pairwise", "standard, implicit prompt", "their shared leading text becomes the prompt"),
        ("ultrafeedback_binarized.jsonl", "pairwise", "UltraFeedback-binarized", "whole conversations next to a prompt column"),
        ("llamafactory_alpaca_ranking.json", "alpaca-ranking", "LLaMA-Factory", "instruction, chosen and rejected"),
        ("llamafactory_sharegpt_ranking.json", "sharegpt-ranking", "LLaMA-Factory", "conversations, chosen and rejected"),
    ],
)
def test_each_shape_is_detected_and_says_why(tmp_path, tiny_tokenizer_dir, fixture, fmt, shape, because):
    src = FIXTURES / fixture
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}")
    assert res.exit_code == 0, res.output
    line = f"{src}: detected {fmt} ({shape}) because "
    assert line in res.stdout and because in res.stdout.split(line, 1)[1].splitlines()[0]
    assert load_prepared(tmp_path / "out").dim_info("d")["format"] == fmt


def test_trl_standard_explicit(tmp_path, tiny_tokenizer_dir):
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'trl_standard_explicit.jsonl'}").exit_code == 0
    row = by_chosen(tmp_path, "d")["Eight."]
    assert messages(row) == [U("How many legs does a spider have?")] and row["rejected"] == "Six, like all insects."


def test_trl_conversational_explicit_keeps_system_and_turns(tmp_path, tiny_tokenizer_dir):
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'trl_conversational_explicit.jsonl'}").exit_code == 0
    got = by_chosen(tmp_path, "d")
    assert messages(got["100 °C (212 °F)."])[0] == {"role": "system", "content": "You are a concise assistant."}
    crepes = got["Crêpes: the batter needs no rising and each one cooks in about a minute."]
    assert messages(crepes) == [U("I have eggs, flour and milk."), A("You could make pancakes or crêpes."),
                                U("Which one needs less time?")]
    assert crepes["prompt"].endswith("<|im_start|>user\nWhich one needs less time?<|im_end|>\n<|im_start|>assistant\n")


def test_trl_conversational_implicit_multi_turn(tmp_path, tiny_tokenizer_dir):
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'trl_conversational_implicit.jsonl'}").exit_code == 0
    haiku = by_chosen(tmp_path, "d")["Cold autumn rain falls / on the empty temple steps / a crow shakes its wings"]
    assert messages(haiku) == [U("Can you help me write a haiku?"), A("Sure. What should it be about?"), U("Autumn rain.")]
    assert haiku["rejected"] == "Rain is wet."


def test_trl_standard_implicit_prompt_is_the_shared_text_cut_at_a_word(tmp_path, tiny_tokenizer_dir):
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'trl_standard_implicit.jsonl'}").exit_code == 0
    got = by_chosen(tmp_path, "d")
    assert messages(got["blue."]) == [U("The sky is")] and got["blue."]["rejected"] == "green."
    # "0 °C" and "10 °C" differ inside a word: the whole word goes to the responses.
    assert messages(got["0 °C at sea level."]) == [U("Water freezes at")]
    assert got["0 °C at sea level."]["rejected"] == "10 °C at sea level."


def test_ultrafeedback_binarized_full_conversations(tmp_path, tiny_tokenizer_dir):
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'ultrafeedback_binarized.jsonl'}").exit_code == 0
    got = by_chosen(tmp_path, "d")
    assert len(got) == 3
    row = got["Keep a fixed wake-up time, avoid screens for an hour before bed, and keep the bedroom cool and dark."]
    assert messages(row) == [U("Give me three tips for sleeping better.")] and row["rejected"] == "Sleep more."


def test_ultrafeedback_prompt_column_that_disagrees_is_dropped_and_counted(tmp_path, tiny_tokenizer_dir):
    lines = (FIXTURES / "ultrafeedback_binarized.jsonl").read_text().splitlines()
    bad = json.loads(lines[0]) | {"prompt": "Something the conversations never say."}
    src = tmp_path / "uf.jsonl"
    src.write_text("\n".join([json.dumps(bad), *lines[1:]]) + "\n")
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}")
    assert res.exit_code == 0, res.output
    c = load_prepared(tmp_path / "out").dim_info("d")["counts"]
    assert (c["read"], c["kept"], c["dropped"]) == (3, 2, {"prompt_mismatch": 1})


def test_llamafactory_alpaca_ranking(tmp_path, tiny_tokenizer_dir):
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'llamafactory_alpaca_ranking.json'}").exit_code == 0
    got = by_chosen(tmp_path, "d")
    summary = got["The council voted to keep the library open until 9 pm on weekdays from next month."]
    assert messages(summary) == [U("Summarize the following text in one sentence.\nThe city council met on Tuesday and voted"
                                   " to extend the library's opening hours to 9 pm on weekdays, starting next month.")]
    assert messages(got["Joyful."]) == [{"role": "system", "content": "Answer with one word."}, U("Give a synonym for 'happy'.")]
    assert messages(got["Quick."]) == [U("Give a synonym for 'big'."), A("Large."), U("And one for 'fast'?")]


def test_llamafactory_sharegpt_ranking(tmp_path, tiny_tokenizer_dir):
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'llamafactory_sharegpt_ranking.json'}").exit_code == 0
    got = by_chosen(tmp_path, "d")
    assert messages(got["Au, from the Latin aurum."]) == [U("What is the chemical symbol for gold?")]
    assert got["Au, from the Latin aurum."]["rejected"] == "Ag."
    assert [m["role"] for m in messages(got["56."])] == ["system", "user"]
    assert [m["role"] for m in messages(got["Try 'Tiny Habits' summaries or the short essay 'The Power of Habit' excerpt;"
                                             " both take under an hour."])] == ["user", "assistant", "user"]


def test_hh_transcripts_are_still_hh(tmp_path, tiny_tokenizer_dir):
    src = FIXTURES / "hh_repo" / "helpful-base" / "test.jsonl.gz"
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={src}")
    assert res.exit_code == 0, res.output
    assert f"{src}: detected hh-rlhf (Anthropic HH-RLHF)" in res.stdout


@pytest.mark.parametrize(
    "fmt, row, expected",
    [
        ("alpaca-ranking", {"instruction": "q", "chosen": "a", "rejected": "b", "history": [["only one"]]},
         "field 'history[0]': expected a [query, answer] pair, got a list"),
        ("alpaca-ranking", {"instruction": "q", "input": 3, "chosen": "a", "rejected": "b"}, "field 'input': expected a string, got a number"),
        ("alpaca-ranking", {"instruction": " ", "chosen": "a", "rejected": "b"}, "field 'instruction': empty (whitespace-only) instruction"),
        ("sharegpt-ranking", {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"},
                              "rejected": {"from": "gpt", "value": "b"}}, "field 'chosen.from': expected the assistant's (gpt) answer"),
        ("sharegpt-ranking", {"conversations": [{"from": "robot", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                              "rejected": {"from": "gpt", "value": "b"}}, "field 'conversations[0].from': unknown role 'robot'"),
        ("sharegpt-ranking", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}],
                              "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
         "field 'conversations[1].from': the last turn must be the user's (human)"),
        ("sharegpt-ranking", {"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": {"from": "gpt", "value": "b"}},
         "field 'chosen': expected a message object {role, content}, got a string"),
    ],
)
def test_llamafactory_errors_name_the_field(fmt, row, expected):
    with pytest.raises(InputError) as exc:
        adapt(fmt, [(Where("f.json", "record", 1), row)], "d")
    assert str(exc.value).startswith("f.json: record 1: ") and expected in str(exc.value)


# ------------------------------------------------------------------------------------------- column mapping
def test_columns_flag_maps_any_shape(tmp_path, tiny_tokenizer_dir):
    src = FIXTURES / "custom_columns.csv"
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--columns", "prompt=question,chosen=good,rejected=bad")
    assert res.exit_code == 0, res.output
    assert f"{src}: detected pairwise (standard, explicit prompt)" in res.stdout
    got = by_chosen(tmp_path, "d")
    assert messages(got["The Pacific."]) == [U("Which ocean is the largest?")] and got["The Pacific."]["rejected"] == "The Atlantic."


def test_columns_from_the_config_file_and_per_source(tmp_path, tiny_tokenizer_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "prepare:\n"
        f"  data:\n    d: {{source: {FIXTURES / 'custom_columns.csv'}, columns: {{prompt: question, chosen: good, rejected: bad}}}}\n"
        f"    e: {FIXTURES / 'trl_standard_explicit.jsonl'}\n"
    )
    res = prepare(tmp_path, tiny_tokenizer_dir, "--config", str(cfg))
    assert res.exit_code == 0, res.output
    assert load_prepared(tmp_path / "out").dims == ["d", "e"]


def test_unmapped_data_says_how_to_map_it(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'custom_columns.csv'}")
    assert res.exit_code == 2
    assert "cannot tell the format from the keys ['annotator', 'bad', 'good', 'id', 'question']" in res.stderr
    assert "--columns prompt=COLUMN,chosen=COLUMN,rejected=COLUMN" in res.stderr
    for name in FORMAT_NAMES:  # the message lists every format of the registry
        assert name in res.stderr


@pytest.mark.parametrize(
    "columns, expected",
    [
        ("prompt=question,chosen=good,rejected=nope",
         "record 1: no column 'nope' (mapped to 'rejected' by --columns rejected=nope); the record has: annotator, bad, good, id, question"),
        ("promt=question", "--columns: invalid value for 'prepare.columns': 'promt' (did you mean 'prompt'?)"),
        ("prompt=question,chosen", "--columns 'prompt=question,chosen': expected FIELD=COLUMN"),
        ("prompt=good,chosen=good", "column 'good' is mapped to two fields"),
    ],
)
def test_bad_columns_are_clear_errors(tmp_path, tiny_tokenizer_dir, columns, expected):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'custom_columns.csv'}", "--columns", columns)
    assert res.exit_code == 2, res.output
    assert expected in res.stderr
    if columns.startswith("promt"):
        assert "did you mean 'prompt'" in res.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- some dimensions of a source
def test_take_one_dimension_of_pku_and_another_from_hh(tmp_path, tiny_tokenizer_dir):
    hh = FIXTURES / "hh_repo" / "helpful-base" / "test.jsonl.gz"
    pku = FIXTURES / "pku_saferlhf_shape.jsonl"
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={hh}", "--data", f"harmless={pku}")
    assert res.exit_code == 0, res.output
    assert f"{pku}: taking only dimension harmless (the DIM of --data); it also has helpful" in res.stdout
    data = load_prepared(tmp_path / "out")
    assert data.dims == ["helpful", "harmless"]
    assert data.dim_info("helpful")["format"] == "hh-rlhf" and data.dim_info("harmless")["format"] == "pku-saferlhf"
    lock = by_chosen(tmp_path, "harmless")["I can't help with breaking into places."]  # safer_response_id 1
    assert lock["rejected"].startswith("Use a tension wrench")


def test_take_a_dimension_under_another_name(tmp_path, tiny_tokenizer_dir):
    pku = FIXTURES / "pku_saferlhf_shape.jsonl"
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"safety={pku}?dim=harmless")
    assert res.exit_code == 0, res.output
    assert f"{pku}?dim=harmless: taking its 'harmless' pairs as dimension safety" in res.stdout
    data = load_prepared(tmp_path / "out")
    assert data.dims == ["safety"] and data.dim_info("safety")["source_options"] == {"dim": "harmless"}
    data.close()  # an open PreparedData holds the reader lock, which --force respects
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"safety={pku}?dim=honest", "--force")
    assert res.exit_code == 2 and "dim=honest, but pku-saferlhf gives helpful, harmless from it" in res.stderr


def test_a_label_that_is_no_dimension_still_gives_all(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"pku={FIXTURES / 'pku_saferlhf_shape.jsonl'}")
    assert res.exit_code == 0, res.output
    assert load_prepared(tmp_path / "out").dims == ["helpful", "harmless"]


# ------------------------------------------------------------------------------------------- the registry
def test_the_format_registry_is_the_one_source_of_names():
    assert FORMAT_NAMES == tuple(FORMATS) and all(f.description for f in FORMATS.values())
    accepted = PrepareConfig.model_fields["format"].annotation.__args__
    assert accepted == ("auto", *FORMAT_NAMES)
    res = runner.invoke(app, ["prepare", "--help"], terminal_width=200)
    help_text = " ".join(res.stdout.split())
    assert "|".join(("auto", *FORMAT_NAMES)) in help_text  # the metavar: every accepted value
    # The help lists each format with its registry description (generated, not written by hand).
    assert all(f"{f.name} (" in help_text for f in FORMATS.values())


def test_every_prepare_setting_is_described():
    from spoctl.config import LengthPolicy, SourceSpec

    for model in (PrepareConfig, LengthPolicy, SourceSpec):
        assert [k for k, f in model.model_fields.items() if not f.description] == [], model.__name__


def test_docs_show_every_format():
    docs = (Path(__file__).parents[1] / "docs" / "data-formats.md").read_text()
    for name in FORMAT_NAMES:
        assert f"## `{name}`" in docs


def test_detection_of_a_hh_transcript_needs_both_markers():
    where = Where("f.jsonl", "line", 1)
    hh = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    assert detect_format(hh, where).format == "hh-rlhf"
    assert detect_format({"chosen": "Human: q\n\nAssistant: a", "rejected": "Human: q\n\nAssistant: b"}, where).format == "hh-rlhf"
    assert detect_format({"chosen": "Human rights matter.", "rejected": "Human rights do not."}, where).format == "pairwise"
