"""`spoctl compare`: the paired bootstrap against what it must give on known inputs, and the whole comparison on
tiny-model runs with known differences -- a trained run, a copy of it, and a run whose final model is exactly its
base model -- plus the refusal of runs whose held-out pairs differ."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tinyworld import make_model_dir, make_prepared  # noqa: E402

from spoctl.cli import app  # noqa: E402
from spoctl.config import AlignConfig, EvalConfig  # noqa: E402
from spoctl.console import Output  # noqa: E402
from spoctl.evaluate.compare import metrics, paired_bootstrap, pareto_front, stratified_paired_bootstrap  # noqa: E402

DIMS = ["helpful", "harmless"]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- pure functions
def test_bootstrap_of_identical_or_shifted_statistics_is_exact():
    """Every resample of a constant difference has that mean: the interval is the point."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=g, dtype=torch.float64)
    assert paired_bootstrap(a, a.clone(), 500, seed=1) == {"diff": 0.0, "low": 0.0, "high": 0.0}
    got = paired_bootstrap(a, a + 0.25, 500, seed=1)
    assert got["diff"] == pytest.approx(0.25, abs=1e-12)
    assert got["low"] == pytest.approx(0.25, abs=1e-12) and got["high"] == pytest.approx(0.25, abs=1e-12)


def test_bootstrap_interval_matches_the_normal_interval_of_a_mean():
    """For n = 400 pairs whose differences are normal with sd s, the bootstrap distribution of the mean
    difference is close to normal with sd sigma_m = s / sqrt(n), so the percentile interval is close to
    mean +- 1.96 sigma_m. Its error: a 2.5% quantile estimated from B = 4000 resamples has standard error
    sqrt(p(1-p)/B) / phi(1.96) x sigma_m = 0.043 sigma_m; the bound allows 5 of those plus the bootstrap's
    own (1/sqrt(n) = 0.05 relative) deviation from normality: 0.3 sigma_m."""
    g = torch.Generator().manual_seed(7)
    n, B = 400, 4000
    a = torch.randn(n, generator=g, dtype=torch.float64)
    b = a + 0.1 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)  # paired: b shares a's pair effect
    d = b - a
    sigma_m = float(d.std(unbiased=False)) / math.sqrt(n)
    got = paired_bootstrap(a, b, B, seed=3)
    assert got["diff"] == pytest.approx(float(d.mean()), abs=1e-12)
    assert abs(got["low"] - (got["diff"] - 1.96 * sigma_m)) < 0.3 * sigma_m
    assert abs(got["high"] - (got["diff"] + 1.96 * sigma_m)) < 0.3 * sigma_m
    # Seeded: the same resamples give the same interval; another seed gives another (the test is not vacuous).
    assert paired_bootstrap(a, b, B, seed=3) == got and paired_bootstrap(a, b, B, seed=4) != got
    # Unpaired, the interval would be wider by the shared pair effect: pairing is what makes it this narrow.
    assert got["high"] - got["low"] < 2 * 1.96 * math.sqrt(float(a.var()) + float(b.var())) / math.sqrt(n) / 2


def test_stratified_bootstrap_pools_strata_without_their_spread_between_them():
    """Two seeds' pairs (n = 300 and 200) whose differences have means 0 and 2 and sds 1 and 0.5. The pooled mean is
    (300 x 0 + 200 x 2) / 500 = 0.8; drawing within each stratum, its sd is sqrt(300 x 1 + 200 x 0.25) / 500 =
    0.0374, so the interval is close to 0.8 +- 1.96 x 0.0374 (within 0.3 of that sd, as in the normal-interval test
    above). Resampling the 500 pairs as one sample adds the spread between the seeds (per pair 0.6 x 0.8^2 + 0.4 x
    1.2^2 = 0.96 to the within-seed 0.7): an interval sqrt(1.66 / 0.7) = 1.5x as wide. One stratum is
    paired_bootstrap."""
    g = torch.Generator().manual_seed(11)
    first = [torch.randn(300, generator=g, dtype=torch.float64), torch.randn(200, generator=g, dtype=torch.float64)]
    noise = [torch.randn(300, generator=g, dtype=torch.float64), 0.5 * torch.randn(200, generator=g, dtype=torch.float64)]
    other = [first[0] + noise[0], first[1] + 2.0 + noise[1]]
    d = [b - a for a, b in zip(first, other)]
    mean = float(torch.cat(d).mean())
    sigma_m = math.sqrt(sum(x.numel() * float(x.var(unbiased=False)) for x in d)) / 500
    got = stratified_paired_bootstrap(first, other, 4000, seed=2)
    assert got["diff"] == pytest.approx(mean, abs=1e-12)
    assert abs(got["low"] - (mean - 1.96 * sigma_m)) < 0.3 * sigma_m
    assert abs(got["high"] - (mean + 1.96 * sigma_m)) < 0.3 * sigma_m
    pooled = paired_bootstrap(torch.cat(first), torch.cat(other), 4000, seed=2)
    assert got["high"] - got["low"] < 0.8 * (pooled["high"] - pooled["low"])
    one, alone = stratified_paired_bootstrap(first[:1], other[:1], 500, seed=5), paired_bootstrap(first[0], other[0],
                                                                                                   500, seed=5)
    assert one == pytest.approx(alone, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError):
        stratified_paired_bootstrap(first, other[:1], 500, seed=5)


def test_metrics_and_pareto_front():
    assert metrics(torch.tensor([1.0, -1.0, 0.0, 2.0])) == {"accuracy": 0.5, "margin": 0.5}
    front = pareto_front({"a": [0.9, 0.2], "b": [0.5, 0.5], "c": [0.4, 0.4], "d": [0.9, 0.2]})
    assert front == ["a", "b", "d"]  # c is dominated by b; equal points do not dominate each other


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """`trained`: two stages, 3 steps each. `frozen`: the same, with a learning rate (1e-30) below half an ulp
    of every weight, so its stage models are the base model bit for bit (checked below). `copy`: a copy of
    `trained`. `other` and `other-frozen`: as `trained` and `frozen`, on prepared data whose held-out pairs differ
    (a second seed)."""
    from spoctl.engine.align import align

    root = tmp_path_factory.mktemp("compare")
    model = make_model_dir(root / "model")
    prepared = make_prepared(root / "prepared", model, DIMS, n_train=16, n_eval=24)
    other_prepared = make_prepared(root / "prepared-other", model, DIMS, n_train=16, n_eval=24, seed=5)
    common = dict(dims=DIMS, max_steps=3, batch_size=4, micro_batch_size=4, beta=0.5, alpha=0.5)
    align(AlignConfig(data=prepared, out=root / "trained", learning_rate=5e-3, **common), Output(quiet=True))
    align(AlignConfig(data=prepared, out=root / "frozen", learning_rate=1e-30, **common), Output(quiet=True))
    align(AlignConfig(data=other_prepared, out=root / "other", learning_rate=5e-3, **common), Output(quiet=True))
    align(AlignConfig(data=other_prepared, out=root / "other-frozen", learning_rate=1e-30, **common),
          Output(quiet=True))
    shutil.copytree(root / "trained", root / "copy")
    return {"root": root, "model": model, "trained": root / "trained", "frozen": root / "frozen",
            "copy": root / "copy", "other": root / "other", "other-frozen": root / "other-frozen"}


def compare(*args: str):
    return runner.invoke(app, ["compare", *args])


def test_a_run_whose_final_model_is_its_base(runs, tmp_path):
    from safetensors.torch import load_file

    base = load_file(str(runs["model"] / "model.safetensors"))
    final = load_file(str(runs["frozen"] / "stages" / "02-harmless" / "model" / "model.safetensors"))
    assert base.keys() == final.keys() and all(torch.equal(base[k], final[k]) for k in base)

    plot = tmp_path / "pareto.png"
    res = compare(str(runs["trained"]), str(runs["frozen"]), str(runs["copy"]), "--json", "--plot", str(plot),
                  "--set", "bootstrap_resamples=500")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["plot"] == str(plot)
    trained, frozen, copy = result["runs"]
    assert trained["vs_first"] is None and trained["pairs"] == {"helpful": 24, "harmless": 24}

    # The frozen run's final model is its base: every margin of log(pi/pi_0) is exactly 0.
    for d in DIMS:
        assert frozen["final"][d] == {"accuracy": 0.0, "margin": 0.0}
        # ... so its difference from the trained run is minus the trained run's numbers, exactly.
        assert frozen["vs_first"][d]["margin"]["diff"] == pytest.approx(-trained["final"][d]["margin"], abs=1e-9)
        assert frozen["vs_first"][d]["accuracy"]["diff"] == pytest.approx(-trained["final"][d]["accuracy"], abs=1e-12)
        for c in frozen["vs_first"][d].values():
            assert c["low"] <= c["diff"] <= c["high"]
        # A copy of the first run differs by nothing, with an interval of zero width.
        assert copy["final"][d] == trained["final"][d]
        assert all(c == {"diff": 0.0, "low": 0.0, "high": 0.0} for c in copy["vs_first"][d].values())
    # The trained run moved (a comparison of three identical models would show nothing).
    assert any(trained["final"][d]["margin"] != 0.0 for d in DIMS)
    assert "trained" in result["pareto"] and "copy" in result["pareto"]

    # Retention: the earlier dimension after its own stage and after the next one.
    (t,) = trained["retention"]
    assert (t["dim"], t["own_stage"], t["after_stage"]) == ("helpful", 1, 2)
    assert t["accuracy"] == trained["final"]["helpful"]["accuracy"]
    assert t["own_accuracy"] == trained["stages"][0]["dims"]["helpful"]["accuracy"]


def test_numbers_agree_with_the_eval_scorecard(runs):
    """compare reads the same log-prob store as `spoctl eval`: the final stage's accuracy and margin of
    log(pi_K/pi_0) are the scorecard's, and every stage's too."""
    from spoctl.evaluate import evaluate

    report = evaluate(EvalConfig(run=runs["trained"], plot=False), Output(quiet=True))
    res = compare(str(runs["trained"]), str(runs["frozen"]), "--json", "--no-plot", "--set",
                  "bootstrap_resamples=200")
    assert res.exit_code == 0, res.output
    trained = json.loads(res.stdout)["runs"][0]
    for st in trained["stages"]:
        row = report["scorecard"][st["k"]]
        for d in DIMS:
            assert st["dims"][d]["accuracy"] == pytest.approx(row["dims"][d]["vs_base"]["accuracy"])
            assert st["dims"][d]["margin"] == pytest.approx(row["dims"][d]["vs_base"]["margin"], abs=1e-5)


def test_table_on_the_terminal(runs):
    res = compare(str(runs["trained"]), str(runs["frozen"]), "--no-plot", "--set", "bootstrap_resamples=200")
    assert res.exit_code == 0, res.output
    assert "final model: accuracy / mean margin" in res.stdout
    assert "difference from trained" in res.stdout and "retention" in res.stdout
    assert "helpful > harmless" in res.stdout


def test_runs_whose_held_out_pairs_differ_are_refused(runs):
    res = compare(str(runs["trained"]), str(runs["other"]), "--no-plot")
    assert res.exit_code == 2
    assert "the held-out pairs of 'helpful' differ" in res.stderr
    assert str(runs["other"]) in res.stderr and "differs" in res.stderr  # which pair, and which text


def test_usage_errors(runs, tmp_path):
    assert compare(str(runs["trained"]), "--no-plot").exit_code == 2
    res = compare(str(runs["trained"]), str(runs["trained"]), "--no-plot")
    assert res.exit_code == 2 and "given twice" in res.stderr
    res = compare(str(runs["trained"]), str(tmp_path), "--no-plot")
    assert res.exit_code == 2 and "not a spoctl run directory" in res.stderr
    res = compare(str(runs["trained"]), str(runs["frozen"]), "--dims", "nosuch", "--no-plot")
    assert res.exit_code == 2 and "no dimension 'nosuch'" in res.stderr


def test_judged_win_rates_beside_when_every_run_judged_the_same_prompts(runs):
    from fake_openai import FakeOpenAI

    key = "sk-compare-test"

    def judged_eval(run: Path, url: str, prompts: str) -> None:
        res = runner.invoke(app, ["eval", str(run), "--judge", "openai:m", "--judge-url", url, "--judge-key-env",
                                  "SPOCTL_COMPARE_KEY", "--num-prompts", prompts, "--max-new-tokens", "3", "--set",
                                  "judge.calibration_pairs=1", "--no-plot", "--quiet"],
                            env={"SPOCTL_COMPARE_KEY": key})
        assert res.exit_code == 0, res.output

    with FakeOpenAI(key) as server:
        judged_eval(runs["trained"], server.url, "2")
        judged_eval(runs["copy"], server.url, "2")
        judged_eval(runs["frozen"], server.url, "3")
    res = compare(str(runs["trained"]), str(runs["copy"]), "--json", "--no-plot", "--set", "bootstrap_resamples=100")
    assert res.exit_code == 0, res.output
    judged = json.loads(res.stdout)["judged"]
    assert judged["judge"] == "openai" and set(judged["runs"]) == {"trained", "copy"}
    assert judged["runs"]["trained"] == judged["runs"]["copy"]  # the same models, prompts and (cached) verdicts
    assert all(c["n"] == 2 for c in judged["runs"]["trained"].values())

    res = compare(str(runs["trained"]), str(runs["frozen"]), "--json", "--no-plot", "--set", "bootstrap_resamples=100")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["judged"] is None and "other 'helpful' prompts" in result["judged_note"]


def test_runs_on_two_seeds_pool_their_held_out_pairs(runs):
    """`trained,other` against `frozen,other-frozen`: two seeds, each with its own 24 held-out pairs per dimension.
    Pooled, a group's accuracy and margin are those of its 48 pairs: the pair-weighted mean of each seed's own
    numbers (from single-run compares). The frozen group's final models are their bases, so its difference from the
    trained group is minus the trained group's numbers, exactly, and its interval holds it."""
    single = {}
    for seed_runs in (("trained", "frozen"), ("other", "other-frozen")):
        res = compare(*(str(runs[r]) for r in seed_runs), "--json", "--no-plot", "--set", "bootstrap_resamples=200")
        assert res.exit_code == 0, res.output
        single[seed_runs[0]] = json.loads(res.stdout)["runs"][0]
    res = compare(f"{runs['trained']},{runs['other']}", f"{runs['frozen']},{runs['other-frozen']}", "--json",
                  "--no-plot", "--set", "bootstrap_resamples=500")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["bootstrap"]["seeds_pooled"] == 2 and result["bootstrap"]["stratified"]
    trained, frozen = result["runs"]
    assert trained["run_dirs"] == [str(runs["trained"]), str(runs["other"])]
    for d in DIMS:
        assert trained["pairs"][d] == 48
        for key in ("accuracy", "margin"):
            want = (single["trained"]["final"][d][key] + single["other"]["final"][d][key]) / 2
            assert trained["final"][d][key] == pytest.approx(want, abs=1e-6)
        assert frozen["final"][d] == {"accuracy": 0.0, "margin": 0.0}
        for key in ("accuracy", "margin"):
            c = frozen["vs_first"][d][key]
            assert c["diff"] == pytest.approx(-trained["final"][d][key], abs=1e-9)
            assert c["low"] <= c["diff"] <= c["high"]
    (t,) = trained["retention"]
    assert t["own_accuracy"] == pytest.approx(
        (single["trained"]["stages"][0]["dims"]["helpful"]["accuracy"]
         + single["other"]["stages"][0]["dims"]["helpful"]["accuracy"]) / 2)
    assert "2 seeds pooled" in res.stderr or "2 seeds pooled" in res.output
    assert "judged" in result and result["judged"] is None and "seeds" in result["judged_note"]


def test_seed_groups_that_do_not_line_up_are_refused(runs):
    # The seeds in another order: the first seed of one group is the second of the other.
    res = compare(f"{runs['trained']},{runs['other']}", f"{runs['other-frozen']},{runs['frozen']}", "--no-plot")
    assert res.exit_code == 2 and "the held-out pairs of 'helpful' differ" in res.stderr
    assert "same place in every group" in res.stderr
    res = compare(f"{runs['trained']},{runs['other']}", str(runs["frozen"]), "--no-plot")
    assert res.exit_code == 2 and "is 1 run," in res.stderr and "one run per seed" in res.stderr
