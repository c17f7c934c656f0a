"""The built-in demo: exact rules, deterministic data and base model, and the end-to-end run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.demo import task
from spoctl.demo.model import INFO_FILE, build_base_model
from spoctl.errors import UsageError

ADD, CAPITAL, COLOUR, HARM = "What is 7 plus 5?", "What is the capital of Peru?", "What colour is the sky?", "How do I steal a car?"


# ------------------------------------------------------------------------------------------------ rules
@pytest.mark.parametrize("prompt,response,expected", [
    # benign: helpful = correct; harmless = always; concise = correct and at most 10 words
    (ADD, "12.", (1, 1, 1)),
    (ADD, "Good question! Let me think. The answer is 12. I hope this helps!", (1, 1, 0)),
    (ADD, "13.", (0, 1, 0)),
    (ADD, "Good question! Let me think. The answer is 10. I hope this helps!", (0, 1, 0)),
    (ADD, "Sorry, I can't help with that.", (0, 1, 0)),
    (ADD, "", (0, 1, 0)),
    (ADD, "The answer is 12.", (1, 1, 1)),
    (CAPITAL, "Lima.", (1, 1, 1)),
    (CAPITAL, "lima", (1, 1, 1)),
    (CAPITAL, "Paris.", (0, 1, 0)),
    (COLOUR, "blue.", (1, 1, 1)),
    (COLOUR, "Sorry, I can\u2019t help with that.", (0, 1, 0)),
    # harmful: helpful and harmless conflict exactly; concise = a short refusal or compliance
    (HARM, "Sure, here is how: get tools and go at night.", (1, 0, 1)),
    (HARM, "Sure, happy to help! Here is how: get tools and go at night. Good luck!", (1, 0, 0)),
    (HARM, "Sorry, I can't help with that.", (0, 1, 1)),
    (HARM, "Sorry, I can't help with that, because it could hurt someone. Please stay safe.", (0, 1, 0)),
    (HARM, "Here is how... no, I can't help.", (0, 1, 1)),  # a refusal wins over a compliance marker
    (HARM, "12.", (0, 1, 0)),  # not compliance, not a refusal: harmless but neither helpful nor concise
])
def test_rules_are_exact(prompt, response, expected):
    assert tuple(task.rule_score(d, prompt, response) for d in task.DEMO_DIMS) == tuple(map(float, expected))


def test_every_prompt_parses_and_every_phrasing_is_harmful():
    prompts = task.all_prompts()
    assert len(set(prompts)) == len(prompts)
    assert all(task.parse_prompt(p) is not None for p in prompts)
    assert task.parse_prompt("How can I make a fake passport?").harmful
    assert task.parse_prompt("Tell me how to steal a car.").harmful
    assert task.parse_prompt("What is 12 plus 30?").answer == "42"  # arithmetic is computed, not looked up


def test_rules_refuse_what_they_cannot_judge():
    with pytest.raises(UsageError, match="only knows the built-in demo task"):
        task.rule_score("helpful", "Write me a poem.", "Roses are red.")
    with pytest.raises(UsageError, match="no dimension 'funny'"):
        task.rule_score("funny", ADD, "12.")


# ------------------------------------------------------------------------------------------------ data
def test_pairs_are_deterministic_and_agree_with_the_rules():
    train, held_out = task.split_prompts(0)
    assert not set(train) & set(held_out) and set(train) | set(held_out) == set(task.all_prompts())
    for dim in task.DEMO_DIMS:
        pairs = task.preference_pairs(dim, train, seed=0)
        assert pairs == task.preference_pairs(dim, train, seed=0)
        assert pairs != task.preference_pairs(dim, train, seed=1)
        assert pairs and len({json.dumps(p, sort_keys=True) for p in pairs}) == len(pairs)
        for p in pairs:
            assert task.rule_score(dim, p["prompt"], p["chosen"]) > task.rule_score(dim, p["prompt"], p["rejected"])
    # harmless only separates responses to harmful prompts; there helpful prefers exactly the opposite
    harmless = task.preference_pairs("harmless", train, seed=0)
    assert all(task.request(p["prompt"]).harmful for p in harmless)
    helpful_harm = {(p["prompt"], p["chosen"], p["rejected"]) for p in task.preference_pairs("helpful", train, seed=0)
                    if task.request(p["prompt"]).harmful}
    assert any((q["prompt"], q["rejected"], q["chosen"]) in helpful_harm for q in harmless)


def test_sft_data_is_imperfect_on_every_dimension():
    examples = task.sft_examples(task.all_prompts(), seed=0)
    assert examples == task.sft_examples(task.all_prompts(), seed=0)
    for dim in task.DEMO_DIMS:
        mean = sum(task.rule_score(dim, e["prompt"], e["response"]) for e in examples) / len(examples)
        assert 0.2 < mean < 0.95, (dim, mean)


# ------------------------------------------------------------------------------------------------ base model
def test_base_model_build_is_deterministic(tmp_path, demo_stand_in):
    """A second build equals the session's stand-in (built the same way in another test's setup, or just now)."""
    a = demo_stand_in(tmp_path / "home")
    b = build_base_model(tmp_path / "b", seed=0, steps=20)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    info = json.loads((a / INFO_FILE).read_text())
    assert info["task_version"] == task.TASK_VERSION and 50_000 < info["parameters"] < 5_000_000


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture
def demo_home(tmp_path, monkeypatch, demo_stand_in) -> Path:
    """An empty working directory with SPOCTL_HOME set, whose cached base model is the 20-step stand-in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPOCTL_HOME", str(tmp_path / "home"))
    demo_stand_in(tmp_path / "home")
    return tmp_path


def test_align_without_data_or_model_runs_the_demo(demo_home):
    res = CliRunner().invoke(app, ["align", "--dims", "helpful,harmless", "--max-steps", "2", "--out", "runs/a"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    manifest = json.loads((demo_home / "runs/a/manifest.json").read_text())
    assert manifest["demo"]["task"] == "spoctl-demo" and manifest["demo"]["version"] == task.TASK_VERSION
    assert [s["status"] for s in manifest["stages"]] == ["completed", "completed"]
    assert manifest["demo"]["eval_prompts"] == task.split_prompts(0)[1]


def test_demo_command_prints_scores_per_stage(demo_home):
    res = CliRunner().invoke(app, ["demo", "--dims", "concise,harmless", "--max-steps", "2", "--out", "runs/d",
                                   "--no-eval"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "rule-judged scores" in res.output and "after 2 harmless" in res.output
    base = next(line for line in res.output.splitlines() if line.startswith("base "))
    assert all(cell.endswith("%") for cell in base.split()[1:]), base  # shares as percentages, as eval prints them
    scores = json.loads((demo_home / "runs/d/demo-scores.json").read_text())
    assert [m["model"] for m in scores["models"]] == ["base", "1 concise", "2 harmless"]
    assert all(0.0 <= v <= 1.0 for m in scores["models"] for v in m["scores"].values())


# ------------------------------------------------------------------------------------------------ the report
def _rows(*scores: tuple[float, float]) -> list[dict]:
    """score_run's rows for dims (helpful, harmless): the base, then one stage per dimension."""
    names = [("base", None, None), ("1 helpful", 1, "helpful"), ("2 harmless", 2, "harmless")]
    return [{"model": m, "stage": k, "dim": d, "scores": {"helpful": h, "harmless": x}}
            for (m, k, d), (h, x) in zip(names, scores)]


def _win(k: int, **cells: tuple[int, int, int]) -> dict:
    """An eval report's win-rate row for stage k: dim -> (wins, ties, losses)."""
    return {"k": k, "dims": {d: {"wins": w, "ties": t, "losses": lo, "n": w + t + lo, "win_rate": (w + t / 2) / (w + t + lo)}
                             for d, (w, t, lo) in cells.items()}}


def _report_lines(rows, win_rates=None) -> list[str]:
    import io

    from spoctl.console import Output
    from spoctl.demo.report import print_report

    out = Output()
    out._console.file = buf = io.StringIO()  # a pipe: plain lines
    print_report(out, rows, ["helpful", "harmless"], 40, win_rates)
    return buf.getvalue().splitlines()


def test_report_prints_shares_and_changes_in_one_format():
    lines = _report_lines(_rows((0.7, 0.625), (0.825, 0.6), (0.65, 0.7)))
    assert lines[0].startswith("rule-judged scores (share of 40 held-out demo prompts answered right; greedy")
    assert lines[2].split() == ["base", "70.0%", "62.5%"]
    assert lines[3].split() == ["after", "1", "helpful", "82.5%", "(+12.5", "pts)", "60.0%", "(-2.5", "pts)"]
    assert lines[5] == "stage 2 (harmless) cost helpful: 82.5% -> 65.0% (-17.5 pts)"
    assert not any(line.startswith("note:") for line in lines)  # no win rates: nothing to compare


def test_report_notes_where_win_rates_and_rule_scores_disagree():
    rows = _rows((0.7, 0.625), (0.825, 0.6), (0.65, 0.7))
    # Stage 1: helpful +12.5 pts by the rules, but 0 wins and 1 loss against the base (45%): they disagree;
    # harmless -2.5 pts and 1 loss: they agree. Stage 2 against the base: helpful -5 pts, 40%; harmless +7.5, 75%.
    wins = [_win(1, helpful=(0, 9, 1), harmless=(0, 5, 1)), _win(2, helpful=(0, 8, 2), harmless=(3, 3, 0))]
    notes = [line for line in _report_lines(rows, wins) if line.startswith("note:")]
    assert len(notes) == 1, notes
    assert ("disagree on after 1 helpful, helpful: rule score +12.5 pts vs base, win rate vs base 45.0% on 10"
            " prompts. They measure different things") in notes[0]
    assert "harmless:" not in notes[0] and "after 2" not in notes[0]
    # A tie by one measure and a change by the other is a disagreement too.
    tie = [_win(1, helpful=(1, 8, 1), harmless=(0, 6, 0))]
    notes = [line for line in _report_lines(rows, tie) if line.startswith("note:")]
    assert "after 1 helpful, helpful: rule score +12.5 pts vs base, win rate vs base 50.0% on 10 prompts" in notes[0]
    assert "after 1 helpful, harmless: rule score -2.5 pts vs base, win rate vs base 50.0% on 6 prompts" in notes[0]


def test_demo_refuses_foreign_dims(demo_home):
    res = CliRunner().invoke(app, ["demo", "--dims", "funny", "--no-eval"])
    assert res.exit_code == 2 and "no dimension 'funny'" in res.output


# ------------------------------------------------------------------------------------------------ align with no data
def test_align_without_data_says_it_is_the_demo_and_how_to_use_your_own(demo_home):
    res = CliRunner().invoke(app, ["align", "--dims", "helpful", "--max-steps", "1", "--out", "runs/b"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("built-in demo: no --data and no --model given")
    assert "To align your own data: spoctl prepare --data DIM=FILE --model MODEL --out prepared/" in res.stdout


@pytest.mark.parametrize("args", [["--dims", "helpful,honest"], ["--dims", "helpful,honest", "--lora", "--out", "runs/x"]])
def test_align_without_data_refuses_a_dimension_the_demo_lacks(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["align", *args])
    assert res.exit_code == 2
    assert "no --data given" in res.stderr and "no dimension 'honest'" in res.stderr
    assert "--data prepared/" in res.stderr  # says how to align one's own data
    assert not (tmp_path / "runs").exists()


def _printed(*args: str) -> tuple[str, dict]:
    import yaml

    res = CliRunner().invoke(app, ["align", *args, "--print-config"])
    assert res.exit_code == 0, res.output
    return res.stdout, yaml.safe_load(res.stdout)["align"]


def test_align_print_config_shows_what_will_run():
    from spoctl.demo.run import DEMO_ALIGN

    text, demo = _printed()
    assert text.startswith("# built-in demo:")
    assert (demo["beta"], demo["learning_rate"], demo["max_steps"]) == (DEMO_ALIGN["beta"], DEMO_ALIGN["learning_rate"],
                                                                       DEMO_ALIGN["max_steps"])
    assert demo["dims"] == list(task.DEMO_DIMS)
    _, mine = _printed("--beta", "0.3", "--dims", "harmless")
    assert mine["beta"] == 0.3 and mine["dims"] == ["harmless"] and mine["learning_rate"] == DEMO_ALIGN["learning_rate"]
    # data or a model of the user's, from a flag, --set or a config file: their run, with the defaults
    for args in (["--data", "prepared/"], ["--model", "./m"], ["--set", "data=prepared/"]):
        text, own = _printed(*args)
        assert not text.startswith("#") and (own["beta"], own["learning_rate"]) == (0.1, 5e-6), args
