"""`spoctl align` on real weights and real data: SmolLM2-135M-Instruct (GGUF) with LoRA, HH-RLHF helpful then
harmless. Tiny on purpose (a dozen pairs, two steps a stage): it proves the real path works end to end, the
numbers of a longer run are in the issue notes and docs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spoctl.cli import app

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_two_stage_lora_run_on_hh_rlhf_with_smollm2(shared_dir, smollm2_gguf, tmp_path):
    hh = shared_dir / "data" / "hh-rlhf"
    prepared, run = tmp_path / "prepared", tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", "--data", f"helpful={hh / 'helpful-base' / 'test.jsonl.gz'}",
                              "--data", f"harmless={hh / 'harmless-base' / 'test.jsonl.gz'}", "--model", str(smollm2_gguf),
                              "--max-pairs", "12", "--max-length", "128", "--max-prompt-tokens", "96",
                              "--eval-fraction", "0.25", "--out", str(prepared), "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["align", "--dims", "helpful,harmless", "--data", str(prepared), "--out", str(run),
                              "--lora", "--set", "lora.r=4", "--lr", "5e-4", "--batch-size", "2", "--max-steps", "2",
                              "--set", "frozen_batch_size=8", "--json"])
    assert res.exit_code == 0, res.output
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


def test_full_fine_tuning_of_smollm2_checkpoints_its_tied_embeddings(shared_dir, smollm2_gguf, tmp_path):
    """SmolLM2 ties its input embedding and output head (tie_word_embeddings). Full fine-tuning past save_every
    used to die at its first checkpoint (safetensors: "Some tensors share memory", exit 70). Three steps, a
    checkpoint after each of the first two; the stage model is written as save_pretrained writes it (the head not
    stored apart) and loads back tied."""
    from safetensors import safe_open

    from spoctl.models import load_causal_lm

    hh = shared_dir / "data" / "hh-rlhf"
    prepared, run = tmp_path / "prepared", tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", "--data", f"helpful={hh / 'helpful-base' / 'test.jsonl.gz'}",
                              "--model", str(smollm2_gguf), "--max-pairs", "8", "--max-length", "96",
                              "--max-prompt-tokens", "64", "--eval-fraction", "0.25", "--out", str(prepared),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["align", "--dims", "helpful", "--data", str(prepared), "--out", str(run), "--full",
                              "--lr", "1e-5", "--batch-size", "2", "--max-steps", "3", "--set", "save_every=1",
                              "--set", "frozen_batch_size=8", "--quiet"])
    assert res.exit_code == 0, res.output
    folder = run / "stages" / "01-helpful" / "model"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    model = load_causal_lm(str(folder))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
