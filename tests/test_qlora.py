"""QLoRA (`align.quantize: 4bit`): the base model in 4 bits (bitsandbytes, which runs 4-bit layers and their
backward on CPU), LoRA adapters trained on it, each stage's reference the quantized chain it trained against."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency (pip install -e '.[test]')")

from spoctl.cli import app  # noqa: E402
from spoctl.data.store import load_prepared  # noqa: E402
from spoctl.engine.batching import pairs_from_split  # noqa: E402
from spoctl.engine.chain import ModelChain, merge_adapter  # noqa: E402
from spoctl.engine.frozen import LogpsCache, compute_logps  # noqa: E402
from spoctl.models import Quantization, load_causal_lm, load_tokenizer  # noqa: E402
from spoctl.rundir import RunDir  # noqa: E402

from tinyworld import make_model_dir, make_prepared  # noqa: E402

QLORA = ["--lora", "--set", "quantize=4bit", "--lr", "1e-2", "--batch-size", "4", "--max-steps", "3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    model = make_model_dir(root / "model", hidden=64)
    prepared = make_prepared(root / "prepared", model, ["helpful", "harmless"])
    return root, model, prepared


@pytest.fixture(scope="module")
def qlora_run(world, tmp_path_factory):
    """Two QLoRA stages on the world, made once: the tests below read it and never write into it."""
    run = tmp_path_factory.mktemp("qlora-run") / "run"
    code, out = align(world[2], run, *QLORA)
    assert code == 0, out
    return run


def align(prepared, out, *args):
    r = CliRunner().invoke(app, ["align", "--dims", "helpful,harmless", "--data", str(prepared), "--out", str(out),
                                 "--quiet", *args], catch_exceptions=False)
    return r.exit_code, r.output


def test_two_qlora_stages_train_adapters_on_the_quantized_chain(world, qlora_run):
    _, model_dir, prepared = world
    manifest = json.loads((qlora_run / "manifest.json").read_text())
    assert manifest["quantize"] == {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "fp32"}
    for st in manifest["stages"]:
        folder = qlora_run / st["checkpoint"]
        assert (folder / "adapter_model.safetensors").exists() and not (folder / "model.safetensors").exists()

    # Stage 2's reference, rebuilt independently: the 4-bit base with stage 1's adapter merged into it. Its
    # log-probs are what the frozen pass cached for stage 2's training pairs.
    q = Quantization("nf4", True, "fp32")
    pi1 = merge_adapter(load_causal_lm(str(model_dir), quantization=q), qlora_run / "stages/01-helpful/model").eval()
    assert type(pi1.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    data = load_prepared(prepared)
    pairs = pairs_from_split(data.split("harmless", "train"))
    want = compute_logps(pi1, pairs, batch_size=8, pad_token_id=load_tokenizer(str(model_dir)).pad_token_id,
                         chunk_size=256, device=torch.device("cpu"))
    chain = ModelChain(str(model_dir), RunDir(qlora_run), manifest)
    cached = LogpsCache(prepared / "cache" / "logps", data, chain.fingerprint, torch.float32).get(1, "harmless", "train")
    torch.testing.assert_close(cached.chosen, want.chosen, rtol=1e-5, atol=1e-4)

    # The float chain of the same adapters (what export merges) is another model: close, not equal, and keyed apart.
    float_chain = ModelChain(str(model_dir), RunDir(qlora_run), manifest, quantized=False)
    assert float_chain.fingerprint(0) != chain.fingerprint(0)
    floats = compute_logps(float_chain.load(1), pairs, batch_size=8, pad_token_id=load_tokenizer(str(model_dir)).pad_token_id,
                           chunk_size=256, device=torch.device("cpu"))
    assert not torch.allclose(floats.chosen, want.chosen, atol=1e-4)
    assert float((floats.chosen - want.chosen).abs().max()) < 0.1 * float(want.chosen.abs().max())


def test_qlora_is_refused_without_lora_and_for_a_gguf_base(world, tmp_path, smollm2_gguf):
    _, _, prepared = world
    code, out = align(prepared, tmp_path / "a", "--set", "quantize=4bit")
    assert code == 2 and "add --lora" in out
    code, out = align(prepared, tmp_path / "b", *QLORA, "--model", str(smollm2_gguf))
    assert code == 2 and "GGUF base cannot be loaded in 4 bits" in out, out
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_merges_qlora_adapters_into_a_float_model(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    r = CliRunner().invoke(app, ["export", "--run", str(qlora_run), "--out", str(tmp_path / "exp"),
                                 "--dtype", "fp32", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exp"), dtype=torch.float32)
    assert not any("4bit" in type(m).__name__ for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not (tmp_path / "exp" / "adapter_config.json").exists()
