"""`--keep DIM=FRACTION` (engine/keep.py): the pure rules and
the engine end to end on a tiny model: a slack constraint is plain SPO bit for bit, an impossible one grows its
multiplier, replays and says it was violated, a resumed keeping stage ends where an uninterrupted one does, and
the eval gate reads the same fractions."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from spoctl import losses
from spoctl.cli import app
from spoctl.config import AlignConfig
from spoctl.engine import keep as K
from spoctl.engine.plan import stage_plans
from spoctl.evaluate import gate

import warm
from test_distributed_runs import free_port
from test_engine_align import _env
from tinyworld import make_world

FAST = ["--lr", "1e-3", "--batch-size", "4", "--max-steps", "6", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("keep"), ["helpful", "harmless", "concise"])


def align(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["align", *args], catch_exceptions=False)
    return result.exit_code, result.output


def weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "stages" / stage / "model" / "model.safetensors"))


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- pure rules
def test_replay_loss_is_the_stage_loss_against_the_previous_model():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -3.0])
    got = losses.replay_loss(0.5, pc, pr, rc, rr)
    h = 0.5 * ((pc - pr) - (rc - rr))
    torch.testing.assert_close(got, -torch.nn.functional.logsigmoid(h))
    # The pair whose margin fell below pi_{n-1}'s (h < 0) pulls harder than the one whose margin rose.
    assert h[1] < 0 < h[0] and got[1] > got[0]


def test_the_keep_constraint_term_is_minus_beta_times_the_margin_and_its_gradient_is_the_constraints():
    pc = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0, -2.0], dtype=torch.float64, requires_grad=True)
    bc, br = torch.tensor([-3.5, -4.0], dtype=torch.float64), torch.tensor([-3.5, -3.0], dtype=torch.float64)
    got = losses.keep_constraint_loss(0.5, pc, pr, bc, br)
    v = losses.log_ratio_margin(pc, pr, bc, br)
    torch.testing.assert_close(got, -0.5 * v)
    got.sum().backward()
    # Linear: the same pull (raise y_w, lower y_l) at every margin, unlike the sigmoid replay loss.
    assert pc.grad.tolist() == [-0.5, -0.5] and pr.grad.tolist() == [0.5, 0.5]


def test_the_pi_dual_step_is_projected_normalised_and_counts_time_in_shares_of_the_stage():
    from spoctl.engine import dual

    bound = dual.threshold(2.0, 0.9)
    assert bound == pytest.approx(1.8) == pytest.approx(0.9 * 2.0)  # FRACTION x start for a start >= 0
    assert dual.threshold(-1.0, 0.9) == pytest.approx(-1.1)  # never above the start for FRACTION <= 1
    assert dual.threshold(-1.0, 1.2) == pytest.approx(-0.8)  # above 1 asks for more, whatever the sign
    # The same relative violation gives the same step on any scale of margins.
    e = dual.violation(1.6, bound, 2.0)
    assert e == pytest.approx(0.1) == pytest.approx(dual.violation(16.0, 18.0, 20.0))
    s = dual.dual_step(dual.Dual(), e, elapsed=0.05)
    assert s.integral == pytest.approx(dual.KI * 0.05 * 0.1)
    assert s.multiplier == pytest.approx(s.integral + dual.KP * 0.1)
    # Slack with no integral: exactly zero (the stage stays plain SPO); never below zero.
    assert dual.dual_step(dual.Dual(), -0.3, 0.05) == dual.Dual(0.0, 0.0)
    assert dual.dual_step(dual.Dual(0.01, 0.05), -0.5, 0.5).multiplier == 0.0
    # A margin scale of zero (stage i moved none of the pairs) is 1 nat, not a division by zero.
    assert dual.margin_scale(0.0) == 1.0 and dual.margin_scale(0.4) == 0.4


def test_the_lr_clock_is_the_share_of_the_stages_learning_rate_budget():
    cfg = AlignConfig(dims=["a", "b"], scheduler="linear", warmup_ratio=0.1)
    clock = K.lr_clock(cfg, 40)
    assert clock[0] == 0.0 and clock[-1] == pytest.approx(1.0) and len(clock) == 41
    assert all(b >= a for a, b in zip(clock, clock[1:]))
    flat = K.lr_clock(AlignConfig(dims=["a", "b"], scheduler="constant", warmup_ratio=0.0), 40)
    assert flat[4] == pytest.approx(0.1)


def test_constraint_split_is_seeded_disjoint_and_bounded():
    c, pool = K.constraint_split(100, 25, seed=3, dim="helpful")
    assert len(c) == 25 and len(pool) == 75 and not set(c) & set(pool) and sorted(c + pool) == list(range(100))
    assert (c, pool) == K.constraint_split(100, 25, seed=3, dim="helpful")
    assert c != K.constraint_split(100, 25, seed=4, dim="helpful")[0]
    assert c != K.constraint_split(100, 25, seed=3, dim="harmless")[0]
    assert K.constraint_split(10, 10, seed=0, dim="x") == (list(range(10)), list(range(10)))  # all: overlap
    assert K.constraint_size(None, 100) == 25 and K.constraint_size(None, 10_000) == K.MAX_CONSTRAINT_PAIRS
    assert K.constraint_size(500, 100) == 100
    assert K.replay_size(None, 16, 1) == 4 and K.replay_size(3, 16, 2) == 4 and K.replay_size(None, 2, 1) == 1
    assert K.every_steps(None, 40) == 2 and K.every_steps(None, 5) == 1 and K.every_steps(7, 40) == 7


def test_plans_resolve_keep_per_stage():
    cfg = AlignConfig(dims=["a", "b", "c"], keep={"a": 0.9}, stages={"c": {"keep": {"b": 1.0}}})
    p1, p2, p3 = stage_plans(cfg)
    assert p1.keep is None and "keep" not in p1.to_manifest()
    assert p2.keep.targets == (K.KeepTarget("a", 1, 0.9),)
    assert p3.keep.targets == (K.KeepTarget("b", 2, 1.0),)  # the stage's own map replaces the global one
    # Frozen models for stage 3 keeping b: pi_0 (the constraint's base) and pi_2 (b's own stage: the start value) on
    # b's training pairs; pi_1 is not needed there (the multiplier no longer re-weights the offset).
    need = p3.frozen_requests(["a", "b", "c"])
    assert ("b", "train") in need[0] and ("b", "train") in need[2] and ("b", "train") not in need[1]
    # Without keep the plan is what it was: no key in the manifest, the same identity.
    plain = stage_plans(AlignConfig(dims=["a", "b"]))[1]
    assert "keep" not in plain.to_manifest() and "keep_fractions" not in plain.manifest_entry(str)


@pytest.mark.parametrize("args,message", [
    (["--keep", "harmless=0.9"], "last stage"),
    (["--keep", "helpful=95"], "0.95 keeps 95%"),
    (["--keep", "nothere=0.9"], "no such dimension"),
    (["--keep", "helpful"], "expected DIM=VALUE"),
    (["--set", "stages.helpful.keep={harmless: 0.5}"], "may only name dimensions aligned before"),
])
def test_bad_keep_settings_exit_2_and_say_what_to_do(world, tmp_path, args, message):
    _, _, prepared = world
    result = CliRunner().invoke(app, ["align", "--data", str(prepared), "--dims", "helpful,harmless", "--out",
                                      str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- the engine
def test_a_slack_constraint_keeps_the_multiplier_at_zero_and_the_run_bit_identical(world, tmp_path):
    """Constraint split = all of helpful's training data, a loose bound: measured every step, never acted on."""
    _, _, prepared = world
    common = ["--data", str(prepared), "--dims", "helpful,harmless", *FAST]
    assert align(*common, "--out", str(tmp_path / "plain"))[0] == 0
    code, out = align(*common, "--out", str(tmp_path / "kept"), "--keep", "helpful=0.05", "--set",
                      "keep_control.pairs=1000", "--set", "keep_control.every=1")
    assert code == 0, out
    for stage in ("01-helpful", "02-harmless"):
        a, b = weights(tmp_path / "plain", stage), weights(tmp_path / "kept", stage)
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    kept = manifest(tmp_path / "kept")["stages"][1]
    k = kept["keep"]["helpful"]
    assert k["constraint_pairs"] == k["train_pairs"] == 24 and k["overlap"]
    assert [p["step"] for p in k["trajectory"]] == [1, 2, 3, 4, 5, 6]
    assert all(p["multiplier"] == 0.0 for p in k["trajectory"]) and k["final"]["satisfied"]
    assert k["replayed_pairs"] == 0 and kept["keep_violations"] == []
    assert k["trajectory"][0]["margin"] != k["trajectory"][-1]["margin"], "the measurement saw no training"
    assert kept["cost"]["keep_measured_pairs"] == 6 * 24 and kept["cost"]["keep_replay_tokens"] == 0
    # The losses logged are those of plain SPO; the keep metrics sit beside them under stage2/helpful/keep/.
    loss = {n: [r["stage2/harmless/loss"] for r in metrics(tmp_path / n) if "stage2/harmless/loss" in r]
            for n in ("plain", "kept")}
    assert loss["plain"] == loss["kept"]
    logged = [r for r in metrics(tmp_path / "kept") if "stage2/helpful/keep/multiplier" in r]
    assert len(logged) == 6 and all("stage2/helpful/keep/margin" in r for r in logged)


def test_an_impossible_constraint_grows_the_multiplier_replays_and_reports_the_violation(world, tmp_path):
    _, _, prepared = world
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["align", "--data", str(prepared), "--dims", "helpful,harmless", "--lr", "1e-3",
                                      "--batch-size", "4", "--max-steps", "6", "--out", str(run), "--json",
                                      "--keep", "helpful=2", "--set", "keep_control.every=1"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    (violation,) = payload["keep_violations"]
    assert violation["stage"] == 2 and violation["kept"] == "helpful" and violation["margin"] < violation["threshold"]
    assert "VIOLATED" in result.stderr and "keeping helpful cost" in result.stderr
    st = manifest(run)["stages"][1]
    k = st["keep"]["helpful"]
    mus = [p["multiplier"] for p in k["trajectory"]]
    assert mus[0] > 0 and all(b > a for a, b in zip(mus[:-2], mus[1:-1])), mus  # grows at every update
    assert mus[-1] == mus[-2]  # the last measurement only reports: nothing is left to act on
    assert not k["final"]["satisfied"] and k["threshold"] == pytest.approx(2 * k["start"]["margin"])
    # Replay ran at every step after the first update, its tokens counted in the stage's cost.
    assert k["replayed_pairs"] == 5 * k["replay_pairs_per_step"] and st["cost"]["keep_replay_tokens"] > 0
    assert st["cost"]["keep_seconds"] > 0 and 0 < st["cost"]["keep_share"]
    replayed = [r["stage2/helpful/keep/replay_loss"] for r in metrics(run) if "stage2/helpful/keep/replay_loss" in r]
    assert len(replayed) == 5
    # The summary row and the manifest agree on the end state.
    row = payload["summary"][1]
    assert row["keep"]["helpful"]["satisfied"] is False and row["keep_seconds"] == st["cost"]["keep_seconds"]


def test_the_multiplier_protects_the_kept_dimension(world, tmp_path):
    """The same stage with and without an impossible bound on helpful: with it (replaying the constraint split
    itself, so the effect cannot hide in generalisation), helpful's margin ends higher than plain SPO leaves it."""
    _, _, prepared = world
    common = ["--data", str(prepared), "--dims", "helpful,harmless", "--lr", "1e-3", "--batch-size", "4",
              "--max-steps", "8", "--quiet", "--set", "keep_control.pairs=1000", "--set", "keep_control.every=1"]
    assert align(*common, "--out", str(tmp_path / "loose"), "--keep", "helpful=0.01")[0] == 0
    assert align(*common, "--out", str(tmp_path / "tight"), "--keep", "helpful=2")[0] == 0
    loose = manifest(tmp_path / "loose")["stages"][1]["keep"]["helpful"]
    tight = manifest(tmp_path / "tight")["stages"][1]["keep"]["helpful"]
    assert loose["max_multiplier"] == 0.0 and tight["max_multiplier"] > 0
    assert tight["start"] == loose["start"]
    assert tight["final"]["margin"] > loose["final"]["margin"], (tight["final"], loose["final"])


def test_a_resumed_keeping_stage_ends_where_an_uninterrupted_one_does(world, tmp_path, monkeypatch):
    """Crash stage 2 after its checkpoint at step 4 (multipliers positive, replay running), resume: the same weights,
    multipliers and trajectory as one uninterrupted run."""
    _, _, prepared = world
    common = ["--data", str(prepared), "--dims", "helpful,harmless", *FAST, "--keep", "helpful=2", "--set",
              "keep_control.every=1", "--set", "save_every=2"]
    assert align(*common, "--out", str(tmp_path / "straight"))[0] == 0

    real = K.Keeper.after_step

    def crash_at_5(self, done, scorer):
        if self.plan.index == 2 and done == 5:
            raise RuntimeError("simulated crash")
        return real(self, done, scorer)

    monkeypatch.setattr(K.Keeper, "after_step", crash_at_5)
    result = CliRunner().invoke(app, ["align", *common, "--out", str(tmp_path / "resumed")])
    # An unexpected exception is a bug to the CLI: its traceback, a report line, exit 70 (cli/common.py).
    assert result.exit_code == 70 and "simulated crash" in result.stderr, result.output
    assert manifest(tmp_path / "resumed")["stages"][1]["status"] == "running"
    monkeypatch.setattr(K.Keeper, "after_step", real)
    code, out = align(*common, "--out", str(tmp_path / "resumed"), "--resume")
    # It continues from its checkpoint (the settings are the same: nothing restarts the stage)...
    assert code == 0 and "resuming from step 4" in out and "starts again" not in out, out

    a, b = weights(tmp_path / "straight", "02-harmless"), weights(tmp_path / "resumed", "02-harmless")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ka = manifest(tmp_path / "straight")["stages"][1]["keep"]["helpful"]
    kb = manifest(tmp_path / "resumed")["stages"][1]["keep"]["helpful"]
    assert ka["trajectory"] == kb["trajectory"] and ka["replayed_pairs"] == kb["replayed_pairs"]


def test_a_finished_keeping_stage_is_the_same_run_when_resumed(world, tmp_path):
    """The identity recorded for a stage that kept something equals the one the same settings give again (its keep
    plan holds tuples, the manifest lists): --resume appends a stage instead of refusing the finished ones."""
    _, _, prepared = world
    args = ["--data", str(prepared), *FAST, "--keep", "helpful=0.9", "--out", str(tmp_path / "run")]
    assert align("--dims", "helpful,harmless", *args)[0] == 0
    code, out = align("--dims", "helpful,harmless,concise", *args, "--resume")
    assert code == 0, out
    assert [st["status"] for st in manifest(tmp_path / "run")["stages"]] == ["completed"] * 3


def test_three_stages_keep_each_earlier_dimension_in_its_own_way(world, tmp_path):
    """Global keep applies to every later stage; stage 3 keeps two dimensions, each with its own multiplier."""
    _, _, prepared = world
    run = tmp_path / "run"
    code, out = align("--data", str(prepared), "--dims", "helpful,harmless,concise", *FAST, "--out", str(run),
                      "--keep", "helpful=0.5", "--keep", "harmless=2", "--set", "keep_control.every=2")
    assert code == 0, out
    st = manifest(run)["stages"]
    assert "keep" not in st[0] and list(st[1]["keep"]) == ["helpful"] and list(st[2]["keep"]) == ["helpful", "harmless"]
    assert st[2]["keep"]["harmless"]["own_stage"] == 2 and st[2]["keep"]["harmless"]["max_multiplier"] > 0
    assert st[2]["keep_fractions"] == {"helpful": 0.5, "harmless": 2.0}


# ------------------------------------------------------------------------------------------- the gate
def test_the_gate_reads_the_runs_keep_fractions():
    stages = [{"index": 1, "dim": "helpful"}, {"index": 2, "dim": "harmless", "keep_fractions": {"helpful": 0.9}}]
    constraints = gate.keep_constraints(stages)
    assert constraints == [(2, "helpful", 1, 0.9)]
    held = gate.check({"helpful": [0.80, 0.73], "harmless": [0.5, 0.8]}, {}, {}, "acc", keep=constraints)
    assert held["passed"] and held["checks"][0]["bound"] == pytest.approx(0.72)
    broken = gate.check({"helpful": [0.80, 0.70], "harmless": [0.5, 0.8]}, {}, {}, "acc", keep=constraints)
    assert not broken["passed"] and "keep bound 0.7200" in broken["reason"]
    assert gate.check({"helpful": [0.8, 0.1]}, {}, {}, "acc")["passed"]  # not asked: not checked


def test_eval_gate_keep_checks_the_runs_constraints_on_the_eval_accuracy(world, tmp_path):
    _, _, prepared = world
    run = tmp_path / "run"
    assert align("--data", str(prepared), "--dims", "helpful,harmless", *FAST, "--out", str(run), "--keep",
                 "helpful=2")[0] == 0
    result = CliRunner().invoke(app, ["eval", str(run), "--no-plot", "--quiet", "--json", "--set", "gate.keep=true"])
    report = json.loads(result.stdout)
    (check,) = [c for c in report["gate"]["checks"] if c["kind"] == "keep"]
    acc = [r["dims"]["helpful"]["vs_base"]["accuracy"] for r in report["scorecard"] if r["k"] > 0]
    assert check["dim"] == "helpful" and check["stage"] == 2
    assert check["bound"] == pytest.approx(2 * acc[0]) and check["value"] == acc[1]
    assert check["passed"] == (acc[1] >= 2 * acc[0]) and result.exit_code == (0 if check["passed"] else 1)
    # Without gate.keep the same run passes an empty gate.
    plain = CliRunner().invoke(app, ["eval", str(run), "--no-plot", "--quiet", "--json"])
    assert plain.exit_code == 0 and not [c for c in json.loads(plain.stdout)["gate"]["checks"] if c["kind"] == "keep"]


@pytest.mark.slow
def test_two_processes_keep_like_one_process(world, tmp_path):
    """Replay under no_sync and the multiplier step agree between one process and two with the same global batch."""
    _, model_dir, prepared = world
    args = ["align", "--dims", "helpful,harmless", "--data", str(prepared), "--lr", "0.5", "--batch-size", "4",
            "--max-steps", "3", "--set", "adam_epsilon=1.0", "--keep", "helpful=2", "--set", "keep_control.every=1",
            "--set", "keep_control.replay_pairs=2", "--quiet"]
    env = _env()  # (the environment of the suite's other launches: their warm processes, tests/warm.py)
    code, output = align(*args[1:], "--out", str(tmp_path / "one"))  # in this process
    assert code == 0, output
    two = [*warm.python_cmd("-m", "torch.distributed.run"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    subprocess.run([*two, *warm.torchrun_entry("-m", "spoctl", *args, "--out", str(tmp_path / "two"))], check=True,
                   env=env)
    k1, k2 = (manifest(tmp_path / r)["stages"][1]["keep"]["helpful"] for r in ("one", "two"))
    assert k2["replayed_pairs"] == k1["replayed_pairs"] == 4
    assert [p["multiplier"] for p in k2["trajectory"]] == pytest.approx([p["multiplier"] for p in k1["trajectory"]],
                                                                        rel=1e-3)
    one, two = weights(tmp_path / "one", "02-harmless"), weights(tmp_path / "two", "02-harmless")
    base = load_file(str(model_dir / "model.safetensors"))
    moved = max(float((one[k] - base[k]).abs().max()) for k in one)
    apart = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert moved > 1e-2 and apart <= 1e-3 * moved, (apart, moved)
