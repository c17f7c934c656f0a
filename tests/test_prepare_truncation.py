"""Prompt truncation at message boundaries (system prompt and recent turns kept), its counts, the keep-end policy,
and length defaults that follow --max-length, with errors that name the flags the user typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.config import LengthPolicy
from spoctl.data.records import Where
from spoctl.data.render import Renderer
from spoctl.data.store import load_prepared
from spoctl.data.truncate import fit_prompt
from spoctl.models import load_tokenizer

runner = CliRunner()
W = Where("f.jsonl", "line", 1)
S = lambda text: {"role": "system", "content": text}  # noqa: E731
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
SYSTEM = "<|im_start|>system\nBe kind.<|im_end|>\n"
GEN = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def renderer(tiny_tokenizer_dir):
    return Renderer(load_tokenizer(str(tiny_tokenizer_dir)), "tiny")


def ids_of(renderer, messages):
    return renderer.conversation_ids([messages], [W])[0]


def conversation(turns: int, words: int = 12) -> list[dict]:
    conv = [S("Be kind.")]
    for t in range(turns):
        conv += [U(f"question {t}: " + "word " * words), A(f"answer {t}: " + "fine " * words)]
    return conv + [U("And the last question?")]


# ------------------------------------------------------------------------------------------- keep-system-and-recent
def test_oldest_whole_turns_go_first_and_the_system_prompt_stays(renderer):
    conv = conversation(4)
    full = len(ids_of(renderer, conv))
    two_recent = len(ids_of(renderer, conv[:1] + conv[5:]))  # system + turns 2, 3 + last question
    fit = fit_prompt(renderer, conv, W, two_recent)
    assert fit.drop is None and not fit.message_cut and fit.turns_dropped == 2
    assert fit.messages == conv[:1] + conv[5:]
    assert fit.ids == ids_of(renderer, fit.messages) and len(fit.ids) <= two_recent < full
    text = renderer.decode(fit.ids)
    assert text.startswith(SYSTEM + "<|im_start|>user\nquestion 2: ") and text.endswith("And the last question?<|im_end|>\n" + GEN)


def test_the_fewest_turns_are_dropped(renderer):
    conv = conversation(4)
    limit = len(ids_of(renderer, conv[:1] + conv[3:])) + 1  # room for turns 1..3, not for turn 0
    fit = fit_prompt(renderer, conv, W, limit)
    assert fit.turns_dropped == 1 and fit.messages == conv[:1] + conv[3:]


def test_a_last_user_turn_alone_too_long_loses_its_start(renderer):
    long_question = "begin " + "middle " * 80 + "the real question at the end?"
    conv = [S("Be kind."), U("earlier"), A("reply"), U(long_question)]
    limit = 70
    fit = fit_prompt(renderer, conv, W, limit)
    assert fit.drop is None and fit.message_cut and fit.turns_dropped == 1
    assert [m["role"] for m in fit.messages] == ["system", "user"]
    kept = fit.messages[1]["content"]
    assert long_question.endswith(kept) and kept.endswith("the real question at the end?") and "begin" not in kept
    assert len(fit.ids) <= limit and fit.ids == ids_of(renderer, fit.messages)
    assert renderer.decode(fit.ids).startswith(SYSTEM + "<|im_start|>user\n")


def test_a_system_prompt_longer_than_the_limit_drops_the_pair(renderer):
    conv = [S("rules " * 100), U("hi")]
    assert fit_prompt(renderer, conv, W, 20).drop == "prompt_too_long"


# ------------------------------------------------------------------------------------------- through prepare
def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare(tmp_path: Path, tok: Path, *args: str, out: str = "out"):
    return runner.invoke(app, ["prepare", "--model", str(tok), "--out", str(tmp_path / out), *args])


def long_rows():
    rows = [{"prompt": conversation(6, words=20), "chosen": [A("good")], "rejected": [A("bad")]}]
    rows.append({"prompt": [S("Be kind."), U("start " + "filler " * 200 + "end?")], "chosen": "yes", "rejected": "no"})
    rows += [{"prompt": f"short question {i}?", "chosen": "a", "rejected": "b"} for i in range(4)]
    return rows


def test_prepare_counts_what_it_cut_and_never_starts_mid_message(tmp_path, tiny_tokenizer_dir):
    src = write(tmp_path / "d.jsonl", long_rows())
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--max-length", "160", "--max-prompt-tokens", "96")
    assert res.exit_code == 0, res.output
    header = next(line for line in res.stdout.splitlines() if line.startswith("dimension"))
    assert header.split()[-1] == "truncated"
    data = load_prepared(tmp_path / "out")
    c = data.dim_info("d")["counts"]
    row = next(line for line in res.stdout.splitlines() if line.startswith("d "))
    assert row.rstrip().endswith(f"2 ({c['truncation']['turns_dropped']} turns dropped, 1 messages cut)"), row
    assert c["truncated"] == 2 and c["truncation"]["prompts"] == 2 and c["truncation"]["messages_cut"] == 1
    assert c["truncation"]["turns_dropped"] >= 4 and c["dropped"] == {}
    for row in list(data.split("d", "train")) + list(data.split("d", "eval")):
        assert len(row["prompt_input_ids"]) <= 96
        assert row["prompt"].startswith(SYSTEM) or "short question" in row["prompt"]
        # the stored messages are exactly what the ids render
        assert row["prompt_input_ids"] == ids_of(Renderer(load_tokenizer(str(tiny_tokenizer_dir)), "t"),
                                                 json.loads(row["prompt_messages"]))


def test_keep_end_cuts_tokens_from_the_left(tmp_path, tiny_tokenizer_dir):
    src = write(tmp_path / "d.jsonl", long_rows())
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--max-length", "160", "--max-prompt-tokens", "96",
                  "--prompt-truncation", "keep-end")
    assert res.exit_code == 0, res.output
    data = load_prepared(tmp_path / "out")
    c = data.dim_info("d")["counts"]
    assert c["truncation"] == {"prompts": 2, "turns_dropped": 0, "messages_cut": 0, "responses": 0}
    cut = [r for r in list(data.split("d", "train")) + list(data.split("d", "eval")) if len(r["prompt_input_ids"]) == 96]
    assert len(cut) == 2 and not any(r["prompt"].startswith(SYSTEM) for r in cut)


def test_drop_policy_is_unchanged_by_prompt_truncation(tmp_path, tiny_tokenizer_dir):
    src = write(tmp_path / "d.jsonl", long_rows())
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--max-length", "160", "--max-prompt-tokens", "96",
                  "--overflow", "drop")
    assert res.exit_code == 0, res.output
    c = load_prepared(tmp_path / "out").dim_info("d")["counts"]
    assert c["dropped"] == {"prompt_too_long": 2} and c["truncation"]["prompts"] == 0


# ------------------------------------------------------------------------------------------- defaults and flag names
def test_max_prompt_tokens_defaults_to_half_of_max_length():
    assert LengthPolicy(max_length=256).max_prompt_tokens == 128
    assert LengthPolicy().max_prompt_tokens == 512
    assert LengthPolicy(max_length=256, max_prompt_tokens=200).max_prompt_tokens == 200


def test_the_readme_quickstart_flags_work(tmp_path, tiny_tokenizer_dir):
    src = write(tmp_path / "d.jsonl", long_rows())
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--max-pairs", "160", "--max-length", "256")
    assert res.exit_code == 0, res.output
    assert load_prepared(tmp_path / "out").manifest["config"]["length"]["max_prompt_tokens"] == 128


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--max-prompt-tokens", "300", "--max-length", "256"],
         "--max-prompt-tokens (300) must be smaller than --max-length (256), so that responses keep at least one token;"
         " lower --max-prompt-tokens (or leave it out: it defaults to half of --max-length) or raise --max-length"),
        (["--set", "length.max_prompt_tokens=300", "--max-length", "256"],
         "max_prompt_tokens (300) must be smaller than --max-length (256)"),
        (["--max-length", "0"], "--max-length 0: invalid value for 'prepare.length.max_length': got 0: Input should be greater than 1"),
        (["--overflow", "cut"], "--overflow cut: invalid value for 'prepare.length.overflow': got 'cut'"),
        (["--prompt-truncation", "middle"], "--prompt-truncation middle: invalid value for 'prepare.length.prompt_truncation'"),
        (["--out", ""], "--out: invalid value for 'prepare.out': got '': is empty"),
    ],
)
def test_errors_name_the_flag_the_user_typed(tmp_path, tiny_tokenizer_dir, args, expected):
    src = write(tmp_path / "d.jsonl", long_rows())
    res = runner.invoke(app, ["prepare", "--model", str(tiny_tokenizer_dir), "--data", f"d={src}",
                              *(["--out", str(tmp_path / "out")] if "--out" not in args else []), *args])
    assert res.exit_code == 2, res.output
    assert expected in res.stderr
