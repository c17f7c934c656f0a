"""`--replay DIM=SHARE` (engine/replay.py) and the stage-extension protocol (engine/extension.py) on a tiny model:
validation in one place, the pure rules, a stage without replay that is plain SPO bit for bit, a replaying stage
whose replay loss is the closed form at its first step and whose earlier dimension ends better kept, a resume that
equals an uninterrupted run, and a toy extension added from a test, touching no engine file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.engine import extensions
from spoctl.engine import replay as R
from spoctl.engine.extension import Idle

from tinyworld import make_world

FAST = ["--lr", "1e-3", "--batch-size", "4", "--max-steps", "6", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("replay"), ["helpful", "harmless"])


def align(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["align", *args], catch_exceptions=False)
    return result.exit_code, result.output


def weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "stages" / stage / "model" / "model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- pure rules
def test_replay_size_and_draw():
    assert R.replay_size(0.2, 10, 1) == 2 and R.replay_size(0.25, 4, 1) == 1 and R.replay_size(1.0, 8, 1) == 8
    assert R.replay_size(0.01, 4, 1) == 1  # at least one pair
    assert R.replay_size(0.5, 6, 2) == 4  # 3, rounded up to a multiple of the processes
    draw = R.replay_draw(0, 2, "helpful", 5, pool=24, size=6)
    assert draw == R.replay_draw(0, 2, "helpful", 5, pool=24, size=6) and len(set(draw)) == 6
    assert draw != R.replay_draw(0, 2, "helpful", 6, pool=24, size=6)
    cycled = R.replay_draw(0, 2, "x", 0, pool=3, size=5)  # more than the pool: it cycles through it
    assert sorted(cycled[:3]) == [0, 1, 2] and cycled[3:] == cycled[:2]


@pytest.mark.parametrize("args,message", [
    (["--replay", "helpful=0"], "replay.helpful=0: SHARE"),
    (["--replay", "helpful=1.5"], "in (0, 1]"),
    (["--replay", "harmless=0.5"], "replay.harmless: 'harmless' is the last stage"),
    (["--replay", "nope=0.5"], "replay.nope: no such dimension"),
    (["--set", "stages.helpful.replay={harmless: 0.5}"], "may only name dimensions aligned before"),
])
def test_bad_replay_settings_are_usage_errors(world, tmp_path, args, message):
    _, _, prepared = world
    result = CliRunner().invoke(app, ["align", "--data", str(prepared), "--dims", "helpful,harmless", *FAST, "--out",
                                      str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """Plain SPO, a run whose stage 2 replays helpful (share 1.0), and one whose global replay stage 2 switches off
    (6 steps a stage: 24 training pairs, batches of 4, one epoch)."""
    _, _, prepared = world
    root = tmp_path_factory.mktemp("replayruns")
    common = ["--data", str(prepared), "--dims", "helpful,harmless", *FAST]
    assert align(*common, "--out", str(root / "plain"))[0] == 0
    assert align(*common, "--out", str(root / "replay"), "--replay", "helpful=1.0")[0] == 0
    assert align(*common, "--out", str(root / "off"), "--replay", "helpful=0.5",
                 "--set", "stages.harmless.replay={}")[0] == 0
    return root


def test_a_stage_that_replays_nothing_is_plain_spo_bit_for_bit(runs):
    for stage in ("01-helpful", "02-harmless"):
        assert same(weights(runs / "plain", stage), weights(runs / "off", stage)), stage
    plan = manifest(runs / "off")["stages"][1]["plan"]
    assert "replay" not in plan and "replay" not in manifest(runs / "off")["stages"][1]


def test_replay_trains_stage_two_on_helpful_pairs_with_the_replay_loss(runs, world):
    plain, replay = runs / "plain", runs / "replay"
    assert same(weights(plain, "01-helpful"), weights(replay, "01-helpful"))  # stage 1 has nothing to replay
    assert not same(weights(plain, "02-harmless"), weights(replay, "02-harmless"))
    st = manifest(replay)["stages"][1]
    r = st["replay"]["helpful"]
    assert r == {"share": 1.0, "own_stage": 1, "pool": 24, "pairs_per_step": 4, "replayed_pairs": 6 * 4}
    assert st["plan"]["replay"] == {"targets": [{"dim": "helpful", "stage": 1, "share": 1.0}]}
    assert st["replay_shares"] == {"helpful": 1.0}
    assert st["cost"]["replay_pairs"] == 24 and st["cost"]["replay_tokens"] > 0
    losses = [x["stage2/helpful/replay/loss"] for x in metrics(replay) if "stage2/helpful/replay/loss" in x]
    assert len(losses) == 6
    # At the first step the policy is pi_1, the replay loss's reference: h = 0 and the sigmoid loss is log 2 per
    # pair. The reference's log-probs come from a frozen pass in other batches: the sequence sums (a few hundred
    # nats, float32) agree to ~1e-4 nats, times beta 0.1 and the loss's slope 1/2 at 0: far below 1e-4.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[-1] < losses[0]  # training on those pairs lowers their loss
    # The end-of-run summary carries it.
    assert "replay" not in manifest(plain)["stages"][1]


def test_replay_keeps_the_earlier_dimension_on_its_pairs(runs, world):
    """helpful's implicit-reward margin log(pi_2/pi_0) on its training pairs (which replay trains on) ends higher
    with replay than after plain SPO."""
    from transformers import AutoModelForCausalLM

    from spoctl.data.store import load_prepared
    from spoctl.engine.batching import pairs_from_split
    from spoctl.engine.frozen import compute_logps

    _, model_dir, prepared = world
    data = load_prepared(prepared)
    try:
        pairs = pairs_from_split(data.split("helpful", "train"))
    finally:
        data.close()

    def logps(folder: Path):
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        return compute_logps(model, pairs, batch_size=8, pad_token_id=0, chunk_size=64, device=torch.device("cpu"))

    base = logps(model_dir)

    def margin(run: Path) -> float:
        pol = logps(run / "stages" / "02-harmless" / "model")
        return float(((pol.chosen - base.chosen) - (pol.rejected - base.rejected)).mean())

    assert margin(runs / "replay") > margin(runs / "plain")


def test_a_resumed_replaying_stage_ends_where_an_uninterrupted_one_does(world, tmp_path, monkeypatch):
    _, _, prepared = world
    common = ["--data", str(prepared), "--dims", "helpful,harmless", *FAST, "--replay", "helpful=0.5", "--set",
              "save_every=2"]
    assert align(*common, "--out", str(tmp_path / "straight"))[0] == 0
    real = R.Replayer.after_step

    def crash_at_5(self, done, scorer):
        if done == 5:
            raise RuntimeError("simulated crash")
        return real(self, done, scorer)

    monkeypatch.setattr(R.Replayer, "after_step", crash_at_5)
    result = CliRunner().invoke(app, ["align", *common, "--out", str(tmp_path / "resumed")])
    assert result.exit_code == 70 and "simulated crash" in result.stderr, result.output
    monkeypatch.setattr(R.Replayer, "after_step", real)
    code, out = align(*common, "--out", str(tmp_path / "resumed"), "--resume")
    assert code == 0 and "resuming from step 4" in out, out
    assert same(weights(tmp_path / "straight", "02-harmless"), weights(tmp_path / "resumed", "02-harmless"))
    a, b = (manifest(tmp_path / n)["stages"][1] for n in ("straight", "resumed"))
    assert a["replay"] == b["replay"] and a["cost"]["replay_tokens"] == b["cost"]["replay_tokens"]


# ------------------------------------------------------------------------------------------- a toy extension
class ToyPlan:
    """Stage 2 and later: shift every pair's SPO offset by a constant, count steps (checkpointed)."""

    key = "toy"

    def __init__(self, shift: float):
        self.shift = shift

    def frozen_requests(self, index, dim):
        return {}

    def to_manifest(self):
        return {"shift": self.shift}

    def manifest_entry(self):
        return {"toy_shift": self.shift}

    def check_processes(self, strategy, world):
        return None

    def start(self, inputs):
        return Toy(self.shift, inputs.plan.index)


class Toy(Idle):
    key = "toy"

    def __init__(self, shift: float, stage: int):
        self.shift, self.stage, self.steps = shift, stage, 0

    def offset(self, base):
        return base + self.shift

    def after_step(self, done, scorer):
        self.steps += 1
        return {f"stage{self.stage}/toy/steps": float(self.steps)}

    def state(self):
        return {"steps": self.steps}

    def load_state(self, state):
        self.steps = (state or {}).get("steps", 0)

    def finish(self, train_seconds, info, warn):
        info(f"toy: {self.steps} steps")
        return {"toy": {"steps": self.steps}}


class ToyKind:
    key = "toy"
    columns = (("toy steps", lambda row: row.get("toy_steps", "")),)

    @staticmethod
    def plan(cfg, index):
        return ToyPlan(0.5) if index > 1 else None

    @staticmethod
    def summary(entry):
        return {"toy_steps": entry["toy"]["steps"]} if "toy" in entry else {}

    @staticmethod
    def result(stages):
        return {"toy_stages": [st["index"] for st in stages if "toy" in st]}


def test_a_toy_extension_plugs_in_without_touching_the_engine(world, runs, tmp_path, monkeypatch):
    _, _, prepared = world
    monkeypatch.setattr(extensions, "KINDS", (*extensions.KINDS, ToyKind()))
    run = tmp_path / "toy"
    result = CliRunner().invoke(app, ["align", "--data", str(prepared), "--dims", "helpful,harmless", "--lr", "1e-3",
                                      "--batch-size", "4", "--max-steps", "6", "--json", "--out", str(run)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["toy_stages"] == [2] and payload["summary"][1]["toy_steps"] == 6
    st = manifest(run)["stages"]
    assert "toy" not in st[0]["plan"] and st[1]["plan"]["toy"] == {"shift": 0.5} and st[1]["toy_shift"] == 0.5
    assert st[1]["toy"] == {"steps": 6} and "toy: 6 steps" in result.stderr
    assert [x["stage2/toy/steps"] for x in metrics(run) if "stage2/toy/steps" in x] == [float(s) for s in range(1, 7)]
    # Stage 1 is untouched; stage 2's offset moved, and with it what the stage learnt.
    plain = runs / "plain"
    assert same(weights(plain, "01-helpful"), weights(run, "01-helpful"))
    assert not same(weights(plain, "02-harmless"), weights(run, "02-harmless"))
