"""The engine end to end on a tiny local model: determinism, LoRA lineage, NaN handling, locks, and the errors
`spoctl align` promises. Runs on several processes are in test_distributed_runs.py; resume after SIGKILL, SIGTERM
and SIGHUP in tests/test_resume_matrix.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.data.store import load_prepared
from spoctl.engine.batching import TokenPair, collate_pairs
from spoctl.engine.checkpoint import verify_checkpoint
from spoctl.engine.distributed import Processes
from spoctl.engine.logprobs import SequenceScorer, score_batch
from spoctl.locks import ExclusiveLock

from tinyworld import make_world

SPOCTL = [sys.executable, "-m", "spoctl"]
FAST = ["--lr", "1e-3", "--batch-size", "4", "--max-steps", "3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), ["helpful", "harmless", "concise"])


def run_cli(args: list[str]):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    return result.exit_code, result.output


def weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    folder = run / "stages" / stage / "model"
    name = "adapter_model.safetensors" if (folder / "adapter_config.json").exists() else "model.safetensors"
    return load_file(str(folder / name))


# Comparing two trainings that differ only in float rounding (another attention kernel, batch layout or process
# split). With AdamW's default epsilon (1e-8) an element whose gradient is near zero gets a sign-like update of up
# to the learning rate, so a rounding-size difference in its gradient can move it by `lr`: weights then measure
# the CPU's instruction set, not the computation (the AVX-512 vs AVX2 kernels put 0.4% vs 1.9% of the training
# update between the same two runs). With epsilon far above every gradient element, AdamW's update is Lipschitz in
# the gradient with constant 1/epsilon, so the weights of the two runs differ by at most
#     sum_t lr_t * |dg_t| / epsilon   (times (1 + lr * L / epsilon)^T for the drift that feeds back, ~1 here)
# while training moves them by about sum_t lr_t * |g_t| / epsilon. Their ratio is the relative rounding of a
# float32 gradient, around 1e-6 (unit roundoff 6e-8 times the reduction lengths of a tiny model; measured 2e-7
# with every ATEN_CPU_CAPABILITY). We assert 1e-3: a thousandfold margin for any CPU, while a real difference (a
# mask that lets the responses see each other, another data split, a desync) puts the runs as far apart as
# training moved them.
ROUNDING_RUN = ["--lr", "0.5", "--batch-size", "4", "--max-steps", "3", "--set", "adam_epsilon=1.0"]
ROUNDING_RATIO = 1e-3


def assert_same_to_rounding(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                            base: dict[str, torch.Tensor]) -> None:
    """Two ROUNDING_RUN trainings are the same computation: apart by at most ROUNDING_RATIO of how far they moved."""
    moved = max(float((a[k] - base[k]).abs().max()) for k in a)
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-2, f"training moved the weights by only {moved:.2e}; the comparison proves nothing"
    assert apart <= ROUNDING_RATIO * moved, (apart, moved)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_command_twice_gives_the_same_weights(world, tmp_path):
    _, _, prepared = world
    for name in ("a", "b"):
        code, out = run_cli(["align", "--dims", "helpful,harmless", "--data", str(prepared), "--out",
                             str(tmp_path / name), "--quiet", *FAST])
        assert code == 0, out
    for stage in ("01-helpful", "02-harmless"):
        assert_same(weights(tmp_path / "a", stage), weights(tmp_path / "b", stage))
    before = weights(tmp_path / "a", "02-harmless")
    base = load_file(str(world[1] / "model.safetensors"))
    assert any(not torch.equal(before[k], base[k]) for k in base), "training changed nothing"


def test_manifest_and_metrics_follow_the_documented_layout(world, tmp_path):
    _, _, prepared = world
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["align", "--dims", "helpful,harmless,concise", "--data", str(prepared), "--out",
                                   str(run), "--json", *FAST], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)  # --json: stdout is the one document (progress and hints go to stderr)
    assert result["run_dir"] == str(run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["dim"] for s in manifest["stages"]] == ["helpful", "harmless", "concise"]
    assert all(s["status"] == "completed" for s in manifest["stages"])
    s2, s3 = manifest["stages"][1], manifest["stages"][2]
    assert s2["reference_model"] == "stages/01-helpful/model"
    assert s3["reference_model"] == "stages/02-harmless/model"
    assert s3["offset_models"] == ["stages/01-helpful/model"]  # previous mode: pi_{n-2}
    assert s3["weights"] == {"helpful": 0.25, "harmless": 0.5}  # alpha^(n-i)
    assert s2["plan"]["beta"] == 0.1 and s2["data_hashes"]["train"]
    assert (run / "config.yaml").exists()
    for s in manifest["stages"]:
        assert s["cost"]["train_seconds"] > 0 and s["cost"]["frozen_pass_seconds"] >= 0, s["cost"]
    # pi_2 exists only from stage 3 on, so stage 3 scores it on its own training pairs (whatever earlier tests
    # cached); its eval pairs pi_2 already scored in stage 2's last forgetting view, which cached them.
    data = load_prepared(prepared)
    assert s3["cost"]["frozen_pairs_scored"] == len(data.split("concise", "train"))
    for s in manifest["stages"]:
        folder = run / s["checkpoint"]
        assert (folder / "config.json").exists() and (folder / "spoctl_stage.json").exists()
        assert not (run / s["dir"] / "checkpoints").exists()  # within-stage checkpoints are removed at stage end
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    for k in ("stage2/harmless/rewards/accuracies", "stage2/harmless/rewards/margins", "stage2/harmless/loss",
              "stage2/harmless/eval_rewards/accuracies", "stage3/helpful/eval_base_rewards/accuracies",
              "stage3/harmless/eval_base_rewards/accuracies", "stage1/helpful/logps/chosen"):
        assert k in keys, k


def test_attention_and_layout_settings_change_rounding_only(world, tmp_path):
    """Eager attention with padded batches trains the same weights as the default (SDPA, shared-prompt) to float
    rounding: the kernel and the layout are speed settings, not part of the computation."""
    _, _, prepared = world
    common = ["align", "--dims", "helpful,harmless", "--data", str(prepared), "--quiet", *ROUNDING_RUN]
    assert run_cli([*common, "--out", str(tmp_path / "default")])[0] == 0
    assert run_cli([*common, "--out", str(tmp_path / "eager"), "--set", "attention=eager",
                    "--set", "layout=padded"])[0] == 0
    for run, kernels in (("default", {"attention": "sdpa", "layout": "shared-prompt"}),
                         ("eager", {"attention": "eager", "layout": "padded"})):
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert all(s["kernels"].items() >= kernels.items() for s in manifest["stages"]), manifest["stages"]
    a, b = weights(tmp_path / "default", "02-harmless"), weights(tmp_path / "eager", "02-harmless")
    assert_same_to_rounding(a, b, load_file(str(world[1] / "model.safetensors")))


def test_frozen_log_probs_are_cached_and_reused(world, tmp_path):
    _, _, prepared = world
    args = ["align", "--dims", "harmless,helpful", "--data", str(prepared), *FAST, "--seed", "7"]
    code, first = run_cli([*args, "--out", str(tmp_path / "a")])
    assert code == 0 and "frozen pass: pi_1" in first
    code, second = run_cli([*args, "--out", str(tmp_path / "b")])
    assert code == 0
    assert "frozen pass" not in second  # every frozen log-prob came from the cache


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_the_final_view_is_cached_as_the_stage_models_eval_log_probs(world, tmp_path, tuning, monkeypatch):
    """The last view of a stage scores the trained policy on every eval split; cached under pi_n's fingerprint, it
    spares `spoctl eval` and `compare` a pass. It must be what a frozen pass of the saved model computes: bit for
    bit with full fine-tuning (the same weights, batches and kernels), to float rounding with LoRA (adapters
    unmerged in training, merged when pi_n is loaded: W x + B(A x) against (W + BA) x; 1e-4 relative on a
    summed log-prob is ~1000x float32's rounding of one)."""
    from spoctl.engine.chain import ModelChain
    from spoctl.engine.frozen import compute_logps, logps_cache_dir, LogpsCache
    from spoctl.models import load_tokenizer
    from spoctl.rundir import RunDir

    _, model_dir, prepared = world
    run = tmp_path / tuning
    extra = ["--lora", "--set", "lora.r=4", "--lr", "1e-2"] if tuning == "lora" else []
    code, out = run_cli(["align", "--dims", "helpful,harmless", "--data", str(prepared), "--out", str(run), *FAST,
                         *extra, "--quiet"])
    assert code == 0, out
    manifest = json.loads((run / "manifest.json").read_text())
    chain = ModelChain(str(model_dir), RunDir(run), manifest)
    data = load_prepared(prepared)
    cache = LogpsCache(logps_cache_dir(prepared, RunDir(run)), data, chain.fingerprint, torch.float32)
    pad = load_tokenizer(str(model_dir)).pad_token_id
    from spoctl.engine.batching import pairs_from_split

    for k in (1, 2):
        assert not cache.lookup(k, [("helpful", "eval"), ("harmless", "eval")])  # every stage views every dim
        model = chain.load(k)
        for dim in ("helpful", "harmless"):
            got = cache.get(k, dim, "eval")
            want = compute_logps(model, pairs_from_split(data.split(dim, "eval")), batch_size=16, pad_token_id=pad,
                                 chunk_size=256, device=torch.device("cpu"))
            for a, b in ((got.chosen, want.chosen), (got.rejected, want.rejected)):
                if tuning == "full":
                    assert torch.equal(a, b)
                else:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # ... so the eval scorecard (and compare, which reads it) scores nothing: pi_0's eval log-probs align cached too.
    from spoctl.config import EvalConfig
    from spoctl.console import Output
    from spoctl.engine.scoring import Scoring
    from spoctl.evaluate import evaluate

    passes, original = [], Scoring.score
    monkeypatch.setattr(Scoring, "score", lambda self, *a, **kw: passes.append(kw.get("label")) or original(self, *a, **kw))
    evaluate(EvalConfig(run=run, plot=False), Output(quiet=True))
    assert passes == [], passes


def test_alpha_zero_is_sequential_dpo_and_modes_agree(world, tmp_path):
    _, _, prepared = world
    common = ["align", "--dims", "helpful,harmless", "--data", str(prepared), "--quiet", *FAST]
    assert run_cli([*common, "--out", str(tmp_path / "prev"), "--alpha", "0.7"])[0] == 0
    assert run_cli([*common, "--out", str(tmp_path / "all"), "--mode", "all", "--set", "weights={helpful: 0.7}"])[0] == 0
    assert run_cli([*common, "--out", str(tmp_path / "dpo"), "--alpha", "0"])[0] == 0
    prev, full, dpo = (weights(tmp_path / n, "02-harmless") for n in ("prev", "all", "dpo"))
    for k in prev:
        torch.testing.assert_close(prev[k], full[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(prev[k], dpo[k]) for k in prev), "the SPO offset had no effect"
    # alpha = 0 needs no pi_{n-2}: the offset is exactly zero and no offset model is recorded.
    manifest = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert manifest["stages"][1]["offset_models"] == []


def test_lora_reference_is_the_previous_stage_model_not_the_base(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, model_dir, prepared = world
    run = tmp_path / "lora"
    code, out = run_cli(["align", "--dims", "helpful,harmless", "--data", str(prepared), "--out", str(run), "--lora",
                         "--set", "lora.r=4", "--quiet", "--lr", "1e-2", "--batch-size", "4", "--max-steps", "3"])
    assert code == 0, out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"][1]["reference_model"] == "stages/01-helpful/model"
    assert (run / "stages/02-harmless/model/adapter_config.json").exists()
    lineage = json.loads((run / "stages/02-harmless/model/spoctl_stage.json").read_text())
    assert lineage["earlier_adapters"] == ["stages/01-helpful/model"]

    # pi_1 built independently: base + stage-1 adapter (peft's own loader).
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    pi1 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                                    str(run / "stages/01-helpful/model")).merge_and_unload()
    from datasets import load_from_disk

    ds = load_from_disk(str(prepared / "harmless" / "train"))
    pairs = [TokenPair(p, c, r) for p, c, r in zip(ds["prompt_input_ids"], ds["chosen_input_ids"], ds["rejected_input_ids"])]
    with torch.no_grad():
        want, _, _, _ = score_batch(SequenceScorer(pi1.eval()), collate_pairs(pairs, 0))
        bare, _, _, _ = score_batch(SequenceScorer(base.eval()), collate_pairs(pairs, 0))
    cached = [load_file(str(p)) for p in (prepared / "cache" / "logps").glob("harmless-train-*.safetensors")]
    matches = [c for c in cached if torch.allclose(c["chosen"], want, atol=1e-4)]
    assert matches, "no cached reference equals base + stage-1 adapter"
    assert not torch.allclose(want, bare, atol=1e-4), "stage 1 did not move the model; the test proves nothing"


def test_nan_loss_stops_the_stage_and_keeps_the_last_checkpoint(world, tmp_path, monkeypatch):
    _, _, prepared = world
    run = tmp_path / "nan"
    # A loss that turns NaN from step 4 on (the configuration's ranges refuse the learning rates that used to
    # overflow a tiny model on purpose): the guard must stop before that step's optimizer update.
    from spoctl import losses

    calls = {"n": 0}
    real = losses.preference_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] > 3 else value  # batch 4, one micro-batch a step

    monkeypatch.setattr(losses, "preference_loss", poisoned)
    code, out = run_cli(["align", "--dims", "helpful", "--data", str(prepared), "--out", str(run),
                         "--batch-size", "4", "--max-steps", "6", "--set", "save_every=1", "--set", "warmup_ratio=0"])
    assert code == 2
    assert "at step 4" in out
    assert "became nan" in out.lower() or "became inf" in out.lower()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"][0]["status"] == "failed"
    assert not (run / "stages/01-helpful/model").exists()
    ckpts = sorted((run / "stages/01-helpful/checkpoints").iterdir())
    assert ckpts and all(c.name.startswith("step-") for c in ckpts)
    for c in ckpts:  # every checkpoint that exists is whole (as its checksums say) and finite
        assert verify_checkpoint(c, Processes()) == []
        files = sorted((c / "state").glob("*.safetensors"))
        assert files
        for f in files:
            assert all(torch.isfinite(t).all() for t in load_file(str(f)).values())


def test_errors_exit_2_with_actionable_messages(world, tmp_path):
    _, _, prepared = world
    code, out = run_cli(["align", "--dims", "helpful,bogus", "--data", str(prepared), "--out", str(tmp_path / "x")])
    assert code == 2 and "'bogus'" in out and "spoctl prepare" in out
    code, out = run_cli(["align", "--dims", "helpful", "--data", str(prepared), "--model", str(tmp_path / "nope")])
    assert code == 2 and "nope" in out
    code, out = run_cli(["align", "--dims", "helpful", "--data", str(tmp_path / "missing")])
    assert code == 2 and "spoctl prepare" in out
    code, out = run_cli(["align", "--dims", "helpful,helpful", "--data", str(prepared)])
    assert code == 2 and "twice" in out
    code, out = run_cli(["align", "--dims", "helpful", "--data", str(prepared), "--set", "bta=1"])
    assert code == 2 and "did you mean 'beta'" in out


def test_run_directory_belongs_to_one_run(world, tmp_path):
    _, _, prepared = world
    run = tmp_path / "run"
    base = ["align", "--dims", "helpful", "--data", str(prepared), "--out", str(run), "--quiet", *FAST]
    assert run_cli(base)[0] == 0
    code, out = run_cli(base)
    assert code == 2 and "--resume" in out
    code, out = run_cli([*base, "--beta", "0.5", "--resume"])
    assert code == 2 and "stage 1 (helpful) is finished" in out and "beta: 0.1 -> 0.5" in out, out
    code, out = run_cli([*base, "--resume"])
    assert code == 0  # all stages done: nothing to do


def test_two_writers_cannot_share_a_run_directory(world, tmp_path):
    _, _, prepared = world
    run = tmp_path / "locked"
    with ExclusiveLock(run, "run directory"):
        code, out = run_cli(["align", "--dims", "helpful", "--data", str(prepared), "--out", str(run), *FAST])
    assert code == 2 and "another spoctl process" in out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    tests = str(Path(__file__).parent)
    if env.get("PYTHONPATH", "").split(os.pathsep)[0] != tests:  # (a pytest started with it has it already)
        env["PYTHONPATH"] = os.pathsep.join([tests, env.get("PYTHONPATH", "")])
    return env


def test_label_smoothing_with_ipo_is_refused(world):
    _, _, prepared = world
    code, out = run_cli(["align", "--dims", "helpful", "--data", str(prepared), "--set", "loss.type=ipo",
                         "--set", "loss.label_smoothing=0.1"])
    assert code == 2 and "sigmoid" in out


def test_unavailable_attention_kernel_is_refused_before_any_work(world, tmp_path):
    _, _, prepared = world
    code, out = run_cli(["align", "--dims", "helpful", "--data", str(prepared), "--out", str(tmp_path / "run"),
                         "--set", "attention=flash_attention_2", *FAST])
    assert code == 2 and "needs the 'flash_attn' package" in out, out
    assert not (tmp_path / "run").exists()
