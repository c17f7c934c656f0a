"""`spoctl prepare` end to end through the CLI with a tiny local tokenizer: layout, manifest, columns, splits,
the reader API, and every bad input refused with exit code 2 and nothing left behind."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.data.store import COLUMNS, dataset_hash, load_prepared
from spoctl.errors import UsageError

runner = CliRunner()


def write_jsonl(path: Path, rows, *, raw_tail: bytes = b"") -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode() + raw_tail
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def pairs(n: int, tag: str = ""):
    return [{"prompt": f"Question {tag}{i}: how do I do thing {i}?", "chosen": f"Carefully, step {i}.", "rejected": f"No idea {i}."} for i in range(n)]


def pku_rows():
    rows = []
    for i in range(6):
        rows.append({"prompt": f"PKU question {i}?", "response_0": f"answer zero {i}", "response_1": f"answer one {i}",
                     "better_response_id": 1, "safer_response_id": 0 if i == 2 else 1})
    return rows


def prepare(tmp_path: Path, tok: Path, *args: str, out: str = "out"):
    return runner.invoke(app, ["prepare", "--model", str(tok), "--out", str(tmp_path / out), *args])


def leftovers(tmp_path: Path) -> list[str]:
    """Anything prepare may have left next to or at --out (temp folders are hidden siblings)."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".out"))


# ------------------------------------------------------------------------------------------- happy paths
def test_prepare_pairwise_layout_manifest_and_columns(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "helpful.jsonl", pairs(30) + [pairs(1)[0]] + [{"prompt": "tie", "chosen": "same", "rejected": "same"}])
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={src}")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "helpful", "manifest.json"]
    assert sorted(p.name for p in (out / "helpful").iterdir()) == ["eval", "train"]
    assert "helpful" in res.stdout and "kept" in res.stdout  # the summary table

    data = load_prepared(out)
    m = data.manifest
    assert m["format_version"] == 2 and m["spoctl_version"] and m["columns"] == list(COLUMNS)
    assert m["model"] == str(tiny_tokenizer_dir.resolve()) == data.model
    assert m["tokenizer"]["has_chat_template"] and len(m["tokenizer"]["sha256"]) == 64
    assert m["config"]["data"] == {"helpful": str(src)} and m["config"]["seed"] == 0
    info = m["dimensions"]["helpful"]
    assert info["source"] == str(src) and info["format"] == "pairwise" and info["data_key"] == "helpful"
    assert info["counts"] == {"read": 32, "candidates": 32, "kept": 30, "train": 27, "eval": 3,
                              "dropped": {"duplicate": 1, "tie": 1}, "truncated": 0,
                              "truncation": {"prompts": 0, "turns_dropped": 0, "messages_cut": 0, "responses": 0}}
    assert set(info["tokens"]) == {"prompt", "chosen", "rejected", "total"}
    assert set(info["tokens"]["total"]) == {"min", "mean", "median", "p95", "max"}
    import hashlib

    assert info["hashes"]["source"] == hashlib.sha256(src.read_bytes()).hexdigest()

    train, ev = data.split("helpful", "train"), data.split("helpful", "eval")
    assert train.column_names == list(COLUMNS) == ev.column_names
    assert len(train) == 27 and len(ev) == 3
    assert not set(train["pair_id"]) & set(ev["pair_id"])
    assert data.data_hash("helpful", "train") == dataset_hash(train) and data.data_hash("helpful", "eval") == dataset_hash(ev)
    row = train[0]
    assert row["prompt"] == "<|im_start|>user\nQuestion 0: how do I do thing 0?<|im_end|>\n<|im_start|>assistant\n"
    assert row["chosen"] == "Carefully, step 0." and row["rejected"] == "No idea 0."
    assert json.loads(row["prompt_messages"]) == [{"role": "user", "content": "Question 0: how do I do thing 0?"}]
    assert row["chosen_input_ids"][-1] == 2  # <|im_end|> closes every response


def test_json_result_is_the_only_stdout(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "h.jsonl", pairs(10))
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={src}", "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["out"] == str(tmp_path / "out") and result["dims"] == ["helpful"]
    assert result["dimensions"]["helpful"]["counts"]["kept"] == 10
    assert result["manifest"].endswith("manifest.json") and result["dimensions"]["helpful"]["mean_tokens"] > 0


def test_pku_one_file_two_dimensions_and_same_eval_prompts(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "pku.jsonl", pku_rows())
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"pku={src}", "--format", "pku-saferlhf", "--eval-fraction", "0.3")
    assert res.exit_code == 0, res.output
    data = load_prepared(tmp_path / "out")
    assert data.dims == ["helpful", "harmless"]
    helpful = {r["prompt_messages"]: r for r in data.split("helpful", "train")}
    harmless = {r["prompt_messages"]: r for r in data.split("harmless", "train")}
    assert set(helpful) == set(harmless)  # eval holds out the same prompts in both dimensions
    key = json.dumps([{"role": "user", "content": "PKU question 2?"}])
    if key in helpful:
        assert helpful[key]["chosen"] == "answer one 2" and harmless[key]["chosen"] == "answer zero 2"
    assert data.dim_info("harmless")["counts"]["kept"] == 6


def test_helpsteer_dimensions_are_the_attributes(tmp_path, tiny_tokenizer_dir):
    rows = []
    for i in range(4):
        for j, (h, v) in enumerate([(4, 0), (1, 2), (3, 4)]):
            rows.append({"prompt": f"prompt {i}", "response": f"response {i}-{j}", "helpfulness": h, "verbosity": v})
    src = write_jsonl(tmp_path / "hs.jsonl", rows)
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"hs={src}", "--format", "helpsteer", "--set", "min_score_gap=2")
    assert res.exit_code == 0, res.output
    data = load_prepared(tmp_path / "out")
    assert data.dims == ["helpfulness", "verbosity"]
    c = data.dim_info("helpfulness")["counts"]
    assert (c["read"], c["candidates"], c["kept"], c["dropped"]) == (12, 12, 8, {"below_min_gap": 4})
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"hs={src}", "--set", "attributes=[verbosity]", out="out2")
    assert res.exit_code == 0, res.output
    assert load_prepared(tmp_path / "out2").dims == ["verbosity"]


def test_several_files_and_formats_in_one_run(tmp_path, tiny_tokenizer_dir):
    hh = [{"chosen": f"\n\nHuman: hi {i}\n\nAssistant: hello {i}", "rejected": f"\n\nHuman: hi {i}\n\nAssistant: go {i}"} for i in range(5)]
    a = write_jsonl(tmp_path / "a.jsonl.gz", hh)
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"data": pairs(5)}))
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"harmless={a}", "--data", f"helpful={b}", "--json")
    assert res.exit_code == 0, res.output
    data = load_prepared(tmp_path / "out")
    assert data.dims == ["harmless", "helpful"]
    assert data.dim_info("harmless")["format"] == "hh-rlhf" and data.dim_info("helpful")["format"] == "pairwise"


def test_length_policy_truncate_and_drop_are_counted(tmp_path, tiny_tokenizer_dir):
    rows = pairs(6) + [{"prompt": "long " * 100, "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "word " * 100, "rejected": "b"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--max-prompt-tokens", "64", "--max-length", "96")
    assert res.exit_code == 0, res.output
    data = load_prepared(tmp_path / "out")
    c = data.dim_info("d")["counts"]
    assert c["kept"] == 8 and c["truncated"] == 2 and c["dropped"] == {}
    rows_out = list(data.split("d", "train")) + list(data.split("d", "eval"))
    assert max(len(r["prompt_input_ids"]) for r in rows_out) <= 64
    assert max(len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows_out) <= 96
    assert data.dim_info("d")["tokens"]["prompt"]["max"] <= 64

    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--max-prompt-tokens", "64", "--max-length", "96",
                  "--overflow", "drop", out="out2")
    assert res.exit_code == 0, res.output
    c = load_prepared(tmp_path / "out2").dim_info("d")["counts"]
    assert c["kept"] == 6 and c["truncated"] == 0 and c["dropped"] == {"prompt_too_long": 1, "too_long": 1}


def test_max_pairs_and_seed_are_deterministic(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", pairs(40))
    runs = [prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--max-pairs", "20", "--seed", seed, out=name)
            for seed, name in (("1", "a"), ("1", "b"), ("2", "c"))]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    a, b, c = (load_prepared(tmp_path / n) for n in "abc")
    assert a.dim_info("d")["counts"]["kept"] == 20 and a.dim_info("d")["counts"]["dropped"] == {"max_pairs": 20}
    assert a.dim_info("d")["hashes"] == b.dim_info("d")["hashes"]
    assert a.dim_info("d")["hashes"]["train"] != c.dim_info("d")["hashes"]["train"]


def test_debug_prints_rendered_examples(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", pairs(10))
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--debug")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("--- d example") == 3
    assert "<|im_start|>user\nQuestion 0: how do I do thing 0?<|im_end|>\n<|im_start|>assistant\n" in res.stdout
    assert "Carefully, step 0.<|im_end|>" in res.stdout


def test_plain_tokenizer_renders_hh_text(tmp_path, tiny_plain_tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", pairs(4))
    res = prepare(tmp_path, tiny_plain_tokenizer_dir, "--data", f"d={src}", "--set", "system_prompt=Be kind.")
    assert res.exit_code == 0, res.output
    assert "has no chat template" in res.output
    row = load_prepared(tmp_path / "out").split("d", "train")[0]
    assert row["prompt"].startswith("Be kind.\n\nHuman: Question") and row["prompt"].endswith("\n\nAssistant:")
    assert json.loads(row["prompt_messages"])[0] == {"role": "system", "content": "Be kind."}


def test_force_replaces_prepared_data_only(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", pairs(6))
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}").exit_code == 0
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"e={src}")
    assert res.exit_code == 2 and "already exists and is not empty; pass --force" in res.stderr
    assert load_prepared(tmp_path / "out").dims == ["d"]
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"e={src}", "--force")
    assert res.exit_code == 0, res.output
    assert load_prepared(tmp_path / "out").dims == ["e"]
    assert leftovers(tmp_path) == ["out"]

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    res = runner.invoke(app, ["prepare", "--model", str(tiny_tokenizer_dir), "--data", f"e={src}", "--out", str(precious), "--force"])
    assert res.exit_code == 2 and "not a spoctl prepared-data directory" in res.stderr
    assert (precious / "thesis.tex").read_text() == "do not delete"


def test_an_existing_empty_out_dir_is_used(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "out").mkdir()
    src = write_jsonl(tmp_path / "d.jsonl", pairs(4))
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}").exit_code == 0
    assert (tmp_path / "out" / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------- refusals: exit 2
GOOD = pairs(3)


BAD_INPUTS = {
    # name: (how to write the file, what the message must say after "error: <file>: ")
    "bad.jsonl": (lambda p: write_jsonl(p, GOOD, raw_tail=b'{"prompt": "q", "chosen": "a", "rejected": "b"\n'), "line 4: malformed JSON"),
    "missing.jsonl": (lambda p: write_jsonl(p, [GOOD[0], {"prompt": "q", "chosen": "a"}]), "line 2: field 'rejected': missing field"),
    "type.jsonl": (lambda p: write_jsonl(p, [{"prompt": "q", "chosen": 5, "rejected": "b"}]),
                   "line 1: field 'chosen': expected a string or a list of chat messages, got a number"),
    "empty_resp.jsonl": (lambda p: write_jsonl(p, GOOD[:2] + [{"prompt": "q", "chosen": " \t", "rejected": "b"}]),
                         "line 3: field 'chosen': empty (whitespace-only) response"),
    "utf8.jsonl.gz": (lambda p: write_jsonl(p, GOOD, raw_tail=b'{"prompt": "\xff"}\n'), "line 4: invalid UTF-8"),
    "empty.jsonl": (lambda p: p.write_bytes(b""), "the file is empty"),
    "notes.txt": (lambda p: p.write_text("hello"), "unsupported file extension .txt"),
    "ties.jsonl": (lambda p: write_jsonl(p, [{"prompt": "q", "chosen": "x", "rejected": "x"}, {"prompt": "r", "chosen": "y", "rejected": "y "}]),
                   "dimension 'd' would keep no pairs (2 candidates; dropped: 2 tie)"),
    "bad.csv": (lambda p: p.write_text('prompt,chosen,rejected\nq,a,b\nq2,a2,""\n'), "record 2: field 'rejected': empty (whitespace-only) response"),
    "bad_id.jsonl": (lambda p: write_jsonl(p, [{**pku_rows()[0], "better_response_id": 3}]), "line 1: field 'better_response_id': expected 0 or 1, got 3"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_naming_file_line_field_and_leaves_nothing(tmp_path, tiny_tokenizer_dir, name):
    make, expected = BAD_INPUTS[name]
    path = tmp_path / name
    make(path)
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={path}")
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(f"error: {path}: "), res.stderr
    assert expected in res.stderr
    assert leftovers(tmp_path) == []


def test_file_that_does_not_exist(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={tmp_path / 'nope.jsonl'}")
    assert res.exit_code == 2 and f"error: {tmp_path / 'nope.jsonl'}: file does not exist" in res.stderr
    assert leftovers(tmp_path) == []


def test_dimension_given_twice(tmp_path, tiny_tokenizer_dir):
    a = write_jsonl(tmp_path / "a.jsonl", GOOD)
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={a}", "--data", f"d={a}")
    assert res.exit_code == 2 and "dimension 'd' is given twice" in res.stderr


def test_dimension_produced_twice_by_a_multi_dimension_format(tmp_path, tiny_tokenizer_dir):
    a = write_jsonl(tmp_path / "a.jsonl", GOOD)
    pku = write_jsonl(tmp_path / "pku.jsonl", pku_rows())
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={a}", "--data", f"pku={pku}")
    assert res.exit_code == 2
    assert f"dimension 'helpful' is produced twice: by --data helpful={a} (pairwise) and by --data pku={pku} (pku-saferlhf)" in res.stderr
    assert leftovers(tmp_path) == []


def test_model_is_required(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", GOOD)
    res = runner.invoke(app, ["prepare", "--data", f"d={src}", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "no model given: pass --model" in res.stderr


def test_unknown_model_folder(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", GOOD)
    res = runner.invoke(app, ["prepare", "--data", f"d={src}", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "no such file or folder" in res.stderr


def test_bad_format_name(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", GOOD)
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--format", "tsv")
    assert res.exit_code == 2 and "format" in res.stderr and "pku-saferlhf" in res.stderr


def test_forced_format_that_does_not_fit(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", GOOD)
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}", "--format", "pku-saferlhf")
    assert res.exit_code == 2 and f"{src}: line 1: field 'response_0': missing field" in res.stderr


# ------------------------------------------------------------------------------------------- the reader API
def test_load_prepared_errors_say_what_to_do(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(UsageError, match="no prepared data here .*run spoctl prepare"):
        load_prepared(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no manifest.json"):
        load_prepared(tmp_path / "empty")
    src = write_jsonl(tmp_path / "d.jsonl", GOOD)
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={src}").exit_code == 0
    data = load_prepared(tmp_path / "out")
    with pytest.raises(UsageError) as exc:
        data.split("foo")
    assert str(exc.value) == (f"prepared data in {tmp_path / 'out'} has no dimension 'foo' (it has: helpful);"
                              " run spoctl prepare with --data foo=...")
    with pytest.raises(UsageError, match="no split 'test'"):
        data.split("helpful", "test")
    import shutil

    shutil.rmtree(tmp_path / "out" / "helpful" / "eval")
    with pytest.raises(UsageError, match="incomplete"):
        data.split("helpful", "eval")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="format version 99"):
        load_prepared(tmp_path / "out")


def test_a_failure_while_writing_keeps_the_old_output_and_leaves_no_temp_dir(tmp_path, tiny_tokenizer_dir, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", pairs(6))
    assert prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}").exit_code == 0
    before = (tmp_path / "out" / "manifest.json").read_text()
    import datasets

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", disk_full)
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"e={src}", "--force")
    assert res.exit_code == 2
    assert "writing the prepared data failed: No space left on device; nothing was written" in res.stderr
    assert "the previous prepared data is untouched" in res.stderr
    assert leftovers(tmp_path) == ["out"]
    assert (tmp_path / "out" / "manifest.json").read_text() == before


def test_a_single_pair_goes_to_train_and_eval_is_empty_but_readable(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", pairs(1))
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={src}")
    assert res.exit_code == 0, res.output
    assert "only 1 pair, so no eval pair is held out" in res.output
    data = load_prepared(tmp_path / "out")
    assert len(data.split("d", "train")) == 1 and len(data.split("d", "eval")) == 0
    assert data.split("d", "eval").column_names == list(COLUMNS)
    assert data.data_hash("d", "eval") == dataset_hash(data.split("d", "eval"))


def test_the_same_sources_prepare_to_byte_identical_folders(tmp_path, tiny_tokenizer_dir):
    """Prepared data is content-addressed downstream (caches, run identity): preparing the same sources twice must
    write the same bytes -- datasets' own state files included, whose fingerprints would otherwise follow the random
    name of prepare's temporary spool file. Only the manifest's creation time differs."""
    src = write_jsonl(tmp_path / "h.jsonl", pairs(30))
    digests = []
    for out in ("one", "two"):
        res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={src}", out=out)
        assert res.exit_code == 0, res.output
        folder = tmp_path / out
        digests.append({p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                        if p.is_file() and p.name not in ("manifest.json", ".lock")})
    assert digests[0] and digests[0] == digests[1]
