"""`spoctl eval` on the built-in demo: a bare --judge picks the exact rules judge (the manifest's `demo` field), and
the rules agree perfectly with the demo's held-out preference pairs, which they generated."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.demo.model import SFT_STEPS, base_model_key, build_base_model
from spoctl.rundir import RunDir


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A two-stage demo run (2 steps per stage) on a 20-step stand-in base model, in a private SPOCTL_HOME."""
    root = tmp_path_factory.mktemp("eval-demo")
    before_threads, before_cwd = torch.get_num_threads(), os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPOCTL_HOME", str(root / "home"))
        mp.chdir(root)
        torch.set_num_threads(1)
        try:
            build_base_model(root / "home" / "demo" / base_model_key(0, SFT_STEPS), seed=0, steps=20)
            res = CliRunner().invoke(app, ["align", "--dims", "helpful,harmless", "--max-steps", "2", "--out",
                                           str(root / "run"), "--quiet"])
            assert res.exit_code == 0, res.output
            yield root / "run"
        finally:
            torch.set_num_threads(before_threads)
            os.chdir(before_cwd)


def test_bare_judge_on_the_demo_uses_the_rules(demo_run):
    torch.set_num_threads(1)
    res = CliRunner().invoke(app, ["eval", str(demo_run), "--judge", "auto", "--num-prompts", "4",
                                   "--max-new-tokens", "24", "--no-plot", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["judge"]["name"] == "rules"
    assert [r["k"] for r in report["win_rates"]] == [1, 2]
    for row in report["win_rates"]:
        for d in ("helpful", "harmless"):
            assert row["dims"][d]["n"] == 4
    # The demo's preference pairs were made by the rules, so the rules agree with every one of them.
    for d in ("helpful", "harmless"):
        assert report["judge"]["calibration"][d]["agreement"] == 1.0
    samples = RunDir(demo_run).eval_samples_path.read_text().splitlines()
    assert len(samples) == 3 * 2 * 4


def test_eval_without_a_run_scores_the_latest_run_under_runs(demo_run, tmp_path, monkeypatch):
    """`spoctl align ...` then `spoctl eval --judge` in the same folder: eval finds the run it should score."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "older").mkdir()  # not a run: no manifest
    (tmp_path / "runs" / "demo").symlink_to(demo_run)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    res = CliRunner().invoke(app, ["eval", "--judge", "auto", "--num-prompts", "2", "--max-new-tokens", "8",
                                   "--no-plot"])
    assert res.exit_code == 0, res.output
    assert "evaluating the latest run: runs/demo" in res.output
    monkeypatch.chdir(tmp_path / "runs" / "older")
    res = CliRunner().invoke(app, ["eval"])
    assert res.exit_code == 2 and "no run under ./runs" in res.output


def test_candidate_logps_equal_a_full_logits_computation(demo_run):
    """The demo's expected score weighs candidates by log pi(candidate | prompt), which it computes with the
    engine's chunked scorer: it must equal the plain sum of full-vocabulary log-softmax over the response tokens."""
    from spoctl.demo import task
    from spoctl.demo.model import prompt_ids
    from spoctl.demo.score import candidate_logps
    from spoctl.engine.chain import ModelChain
    from spoctl.models import load_tokenizer

    torch.set_num_threads(1)
    run = RunDir(demo_run)
    manifest = run.read_manifest()
    model = ModelChain(manifest["base_model"], run, manifest).load(1)
    tok = load_tokenizer(manifest["base_model"])
    prompts = task.split_prompts(0)[1][:3]
    cands = [["5.", "The answer is 5.", "Sorry, I can't help with that."], ["No."], ["A", "B"]]
    got = candidate_logps(model, tok, prompts, cands)
    for p, cs, lps in zip(prompts, cands, got):
        assert len(lps) == len(cs)
        for c, lp in zip(cs, lps):
            pids = prompt_ids(tok, p)
            rids = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([pids + rids])
            with torch.no_grad():
                logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
            want = float(sum(logp[len(pids) + j - 1, t] for j, t in enumerate(rids)))
            assert lp == pytest.approx(want, rel=1e-4, abs=1e-3)
