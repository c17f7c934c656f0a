"""Runs that can be recovered, and nothing read back unverified: cheap checks before a run directory exists,
starting again in the same --out, what --resume may change, divergence, damaged caches, changed stage models,
litter left by a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.errors import UsageError
from spoctl.fsutil import remove_litter

from test_engine_align import assert_same, weights
from tinyworld import checkpoints, make_model_dir, make_prepared, make_tokenizer, make_world, stop_in_process

FAST = ["--lr", "1e-3", "--batch-size", "4", "--max-steps", "3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("recovery"), ["helpful", "harmless", "concise"])


def align(prepared: Path, out: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["align", "--data", str(prepared), "--out", str(out), *args],
                                catch_exceptions=False)
    return result.exit_code, result.output


# ------------------------------------------------------------------------------------------- before the run exists
def test_a_batch_larger_than_the_data_is_refused_before_the_run_directory_exists(world, tmp_path):
    code, out = align(world[2], tmp_path / "run", "--dims", "helpful", "--batch-size", "64")
    assert code == 2 and "24 training pairs" in out and "--batch-size" in out, out
    assert not (tmp_path / "run").exists()


def test_a_tracker_whose_package_is_missing_is_refused_before_the_run_directory_exists(world, tmp_path):
    code, out = align(world[2], tmp_path / "run", "--dims", "helpful", "--set", "report_to=swanlab", *FAST)
    assert code == 2 and "pip install swanlab" in out, out
    code, out = align(world[2], tmp_path / "run", "--dims", "helpful", "--set", "report_to=tensorbord", *FAST)
    assert code == 2 and "did you mean 'tensorboard'" in out, out
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_run_is_left_untouched(world, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, out = align(world[2], other, "--dims", "helpful", *FAST)
    assert code == 2 and "not a spoctl run" in out
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]  # not even a lock file was written


# ------------------------------------------------------------------------------------------- divergence, restarts
def test_divergence_is_detected_and_a_run_that_saved_nothing_starts_again(world, tmp_path):
    """--lr 1 (the largest rate the configuration accepts) blows the weights up without a NaN (log-probs stay
    finite, just absurd; a NaN has its own guard): the stage stops and says so. Nothing was saved, so the corrected command in the same --out
    simply starts again."""
    _, _, prepared = world
    code, out = align(prepared, tmp_path / "run", "--dims", "helpful", "--lr", "1", "--batch-size", "4",
                      "--max-steps", "3")
    assert code == 2 and "diverged" in out and "lower --lr" in out, out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"][0]["status"] == "failed" and "diverged" in manifest["stages"][0]["error"]

    code, out = align(prepared, tmp_path / "run", "--dims", "helpful", *FAST)
    assert code == 0 and "starting again" in out, out
    assert align(prepared, tmp_path / "straight", "--dims", "helpful", *FAST)[0] == 0
    assert_same(weights(tmp_path / "run", "01-helpful"), weights(tmp_path / "straight", "01-helpful"))


def test_resume_starts_an_unfinished_stage_again_when_its_settings_change(world, tmp_path):
    """Stage 2 diverges after saving a checkpoint; --resume with its settings fixed starts stage 2 from its
    beginning (its checkpoint was made with the other settings: beta and learning rate) and keeps stage 1: the result is the straight run's."""
    _, _, prepared = world
    common = ["--dims", "helpful,harmless", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3",
              "--set", "save_every=1"]
    code, out = align(prepared, tmp_path / "run", *common, "--set", "stages.harmless.learning_rate=1",
                      "--set", "stages.harmless.beta=1000")
    assert code == 2 and "diverged" in out, out
    assert (tmp_path / "run" / "stages" / "02-harmless" / "checkpoints").is_dir()

    code, out = align(prepared, tmp_path / "run", *common, "--resume")
    assert code == 0, out
    assert "stage 1/2 (helpful): already completed" in out
    assert "stage 2 (harmless) starts again from its beginning: beta: 1000.0 -> 0.1; learning_rate: 1.0 -> 0.001" in out, out
    assert align(prepared, tmp_path / "straight", *common)[0] == 0
    for stage in ("01-helpful", "02-harmless"):
        assert_same(weights(tmp_path / "run", stage), weights(tmp_path / "straight", stage))
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["stage"] == 2 and "stage2/harmless/loss" in r]
    assert steps == [1, 2, 3], "lines of the abandoned attempt were kept"


def test_resume_appends_dimensions_after_the_finished_ones(world, tmp_path):
    _, _, prepared = world
    assert align(prepared, tmp_path / "run", "--dims", "helpful", *FAST)[0] == 0
    code, out = align(prepared, tmp_path / "run", "--dims", "helpful,harmless", *FAST, "--resume")
    assert code == 0 and "already completed" in out, out
    assert align(prepared, tmp_path / "straight", "--dims", "helpful,harmless", *FAST)[0] == 0
    assert_same(weights(tmp_path / "run", "02-harmless"), weights(tmp_path / "straight", "02-harmless"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["dims"] == ["helpful", "harmless"] and [s["status"] for s in manifest["stages"]] == ["completed"] * 2


def test_resume_refuses_changes_to_what_finished_stages_computed_and_lists_them(world, tmp_path):
    _, _, prepared = world
    assert align(prepared, tmp_path / "run", "--dims", "helpful", *FAST)[0] == 0
    code, out = align(prepared, tmp_path / "run", "--dims", "helpful", *FAST, "--seed", "3", "--resume")
    assert code == 2 and "seed: 0 -> 3" in out, out
    code, out = align(prepared, tmp_path / "run", "--dims", "helpful", *FAST, "--seed", "3")
    assert code == 2 and "holds a different run" in out and "seed: 0 -> 3" in out, out


@pytest.mark.slow
def test_resume_with_more_steps_continues_the_unfinished_stage_from_its_checkpoint(world, tmp_path):
    _, _, prepared = world
    run = tmp_path / "run"
    args = ["align", "--dims", "helpful", "--data", str(prepared), "--lr", "1e-3", "--batch-size", "4",
            "--epochs", "8", "--set", "save_every=1", "--out", str(run)]
    ckpts = run / "stages" / "01-helpful" / "checkpoints"
    # Stopped inside the stage (SIGTERM, in this process: a run after a real kill is test_resume_matrix's).
    code, out = stop_in_process([*args, "--max-steps", "30", "--quiet"],
                                lambda: any(p.name >= "step-000003" for p in checkpoints(ckpts)))
    reached = max(int(p.name[5:]) for p in checkpoints(ckpts))
    assert code == 143 and reached < 30, ("the stop did not land inside the stage", code, out)

    result = CliRunner().invoke(app, [*args, "--max-steps", "34", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "continuing from its latest checkpoint with a new schedule (max_steps: 30 -> 34)" in result.output
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "stage1/helpful/loss" in r]
    assert steps == list(range(1, 35))


# ------------------------------------------------------------------------------------------- verified artifacts
def test_a_damaged_frozen_log_prob_cache_is_recomputed_not_trained_on(world, tmp_path):
    _, _, prepared = world
    assert align(prepared, tmp_path / "a", "--dims", "helpful", *FAST, "--seed", "11")[0] == 0
    caches = sorted((prepared / "cache" / "logps").glob("helpful-train-*.safetensors"))
    assert caches
    for path in caches:  # flip one bit inside the tensor bytes (past the header)
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x10
        path.write_bytes(bytes(raw))
    code, out = align(prepared, tmp_path / "b", "--dims", "helpful", *FAST, "--seed", "11")
    assert code == 0 and "is damaged (its checksum does not match its contents); computing it again" in out, out
    assert_same(weights(tmp_path / "a", "01-helpful"), weights(tmp_path / "b", "01-helpful"))


def test_a_stage_model_changed_after_its_run_is_refused_when_read(world, tmp_path):
    _, _, prepared = world
    run = tmp_path / "run"
    assert align(prepared, run, "--dims", "helpful,harmless", *FAST)[0] == 0
    target = run / "stages" / "02-harmless" / "model" / "model.safetensors"
    tensors = load_file(str(target))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    from safetensors.torch import save_file

    save_file(tensors, str(target), metadata={"format": "pt"})
    kept = {name: (run / name).read_bytes() for name in ("manifest.json", "config.yaml")}
    code, out = align(prepared, run, "--dims", "helpful,harmless,concise", *FAST, "--resume")
    assert code == 2 and str(target) in out and "changed after it was written" in out, out
    # Refused before anything was written: the run is as it was (found by the chaos test, fault 'changed stage
    # model' followed by a resume that appends a dimension).
    assert {name: (run / name).read_bytes() for name in kept} == kept


def test_litter_left_by_a_crash_is_removed_on_the_next_run(world, tmp_path):
    _, _, prepared = world
    run = tmp_path / "run"
    assert align(prepared, run, "--dims", "helpful", *FAST)[0] == 0
    litter = [run / ".manifest.json.k2j3.tmp", run / "stages" / "01-helpful" / ".model.x81.tmp",
              run / "stages" / ".02-harmless.old"]
    litter[0].write_text("{")
    for folder in litter[1:]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    assert align(prepared, run, "--dims", "helpful,harmless", *FAST, "--resume")[0] == 0
    assert not litter[0].exists() and not litter[1].exists()
    # `.X.old` with no X beside it is what a kill between atomic_directory's two renames leaves: the previous
    # complete folder, which is restored rather than deleted (here it then stands for stage 2 and is replaced).
    assert not litter[2].exists()


def test_remove_litter_restores_an_old_folder_whose_replacement_never_arrived(tmp_path):
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "w").write_text("complete")
    (tmp_path / ".model.a1b2.tmp").mkdir()
    (tmp_path / ".manifest.json.x.tmp").write_text("half")
    (tmp_path / ".lock").write_text("1")
    removed = remove_litter(tmp_path)
    assert (tmp_path / "model" / "w").read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "model"]
    assert len(removed) == 2


def test_a_refused_resume_changes_nothing(world, tmp_path):
    _, _, prepared = world
    run = tmp_path / "run"
    assert align(prepared, run, "--dims", "helpful", *FAST)[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert align(prepared, run, "--dims", "helpful", *FAST, "--beta", "0.3", "--resume")[0] == 2
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert before == after


def test_settings_added_after_a_run_was_made_do_not_block_its_resume_at_their_defaults():
    """A run recorded by an earlier spoctl has no `quantize` (say); resumed by this one at the default, nothing
    changed. Set to something else, it is a change like any other, named."""
    from spoctl.config import AlignConfig
    from spoctl.engine.plan import stage_plans
    from spoctl.engine.resume import reopen, run_identity

    cfg = AlignConfig(dims=["helpful", "harmless"])
    identity = run_identity(cfg, stage_plans(cfg), "base", {"helpful": {"train": "h"}, "harmless": {"train": "g"}})
    old = {**identity, "shared": {k: v for k, v in identity["shared"].items() if k != "quantize"}}
    manifest = {"identity": old, "stages": [{"index": 1, "dim": "helpful", "status": "completed"},
                                            {"index": 2, "dim": "harmless", "status": "pending"}]}
    decision = reopen(manifest, identity, resume=True, has_checkpoints=lambda i, d: False, where="run")
    assert not decision.fresh and not decision.restart
    changed = run_identity(cfg.model_copy(update={"quantize": "4bit"}), stage_plans(cfg), "base",
                           {"helpful": {"train": "h"}, "harmless": {"train": "g"}})
    with pytest.raises(UsageError, match="quantize: <unset> -> 4bit"):
        reopen(manifest, changed, resume=True, has_checkpoints=lambda i, d: False, where="run")


def test_a_setting_no_finished_stage_reads_does_not_block_appending_a_dimension():
    """Stage 1 never reads alpha (no earlier dimension; later stages' weights use the alphas of stages 2..n), so a
    finished `helpful` stage made with the default alpha continues as `helpful,harmless --alpha 1`; its beta, which
    stage 2's offset does read, still blocks."""
    from spoctl.config import AlignConfig
    from spoctl.engine.plan import stage_plans
    from spoctl.engine.resume import reopen, run_identity

    hashes = {"helpful": {"train": "h"}, "harmless": {"train": "g"}}

    def identity(**update):
        cfg = AlignConfig(dims=["helpful", "harmless"], **update)
        return run_identity(cfg, stage_plans(cfg), "base", hashes)

    manifest = {"identity": identity(alpha=0.0), "stages": [{"index": 1, "dim": "helpful", "status": "completed"},
                                                            {"index": 2, "dim": "harmless", "status": "pending"}]}
    decision = reopen(manifest, identity(alpha=1.0), resume=True, has_checkpoints=lambda i, d: False, where="run")
    assert not decision.fresh and not decision.restart
    with pytest.raises(UsageError, match="beta: 0.1 -> 0.5"):
        reopen(manifest, identity(alpha=1.0, beta=0.5), resume=True, has_checkpoints=lambda i, d: False, where="run")
    # A finished stage 2 does read its alpha.
    manifest["stages"][1]["status"] = "completed"
    with pytest.raises(UsageError, match="alpha: 0.0 -> 1.0"):
        reopen(manifest, identity(alpha=1.0), resume=True, has_checkpoints=lambda i, d: False, where="run")


# ------------------------------------------------------------------------------------------- what resume skips
def test_resume_refuses_to_skip_a_finished_stage_whose_model_is_gone(world, tmp_path):
    """A finished stage is skipped only while its model is there as saved (eval and export read it next): a
    deleted model folder, or a file of it deleted, is named with what to do, exit 2, and nothing is rewritten."""
    _, _, prepared = world
    run = tmp_path / "run"
    assert align(prepared, run, "--dims", "helpful", *FAST)[0] == 0
    model = run / "stages" / "01-helpful" / "model"
    kept = {name: (run / name).read_bytes() for name in ("manifest.json", "config.yaml")}

    (model / "tokenizer.json").unlink()
    code, out = align(prepared, run, "--dims", "helpful", *FAST, "--resume")
    assert code == 2 and f"{model / 'tokenizer.json'} is missing" in out and "Restore it" in out, out

    shutil.rmtree(model)
    code, out = align(prepared, run, "--dims", "helpful", *FAST, "--resume")
    assert code == 2 and f"{model}: stage 1's model is missing" in out and "restore the folder" in out, out
    assert "already completed" not in out
    assert {name: (run / name).read_bytes() for name in kept} == kept


# ------------------------------------------------------------------------------------------- models that cannot work
def test_a_model_with_fewer_embedding_rows_than_its_tokenizer_has_tokens_is_refused(world, tmp_path):
    """Token ids past the embedding would crash the first forward pass (IndexError, exit 70): refused before any
    work, naming both sizes."""
    root, _, _ = world
    model = make_model_dir(tmp_path / "small", vocab_size=258)  # the pad token (257) fits, <|user|> and the rest do not
    prepared = make_prepared(tmp_path / "prepared", model, ["helpful"])
    n_tokens = len(make_tokenizer())
    code, out = align(prepared, tmp_path / "run", "--dims", "helpful", "--model", str(model), *FAST)
    assert code == 2 and "vocabulary has 258 tokens" in out and f"its tokenizer has {n_tokens}" in out, out
    assert not (tmp_path / "run").exists()
