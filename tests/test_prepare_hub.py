"""Hub datasets through a local dataset repository (the Hub is unreachable here): the spec syntax and its config
form, data_dir/split/data_files, streaming that stops once --max-pairs is met, and Hub *model* ids that fail at
once when the Hub cannot be reached (or load from the local cache)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spoctl import hub
from spoctl.cli import app
from spoctl.config import SourceSpec
from spoctl.data import reading
from spoctl.data.sources import resolve_source
from spoctl.data.store import load_prepared
from spoctl.errors import UsageError

REPO = Path(__file__).parent / "fixtures" / "data" / "hh_repo"
runner = CliRunner()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep `load_dataset`'s Arrow cache out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def prepare(tmp_path: Path, tok: Path, *args: str, out: str = "out"):
    return runner.invoke(app, ["prepare", "--model", str(tok), "--out", str(tmp_path / out), *args])


def hh_lines(part: str) -> list[dict]:
    with gzip.open(REPO / part / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------- the spec syntax
def test_spec_syntax_and_long_form_are_the_same():
    short = SourceSpec.parse("Anthropic/hh-rlhf?data_dir=helpful-base&split=test&revision=main&streaming=true")
    long = SourceSpec(source="Anthropic/hh-rlhf", data_dir="helpful-base", split="test", revision="main", streaming=True)
    assert short == long
    assert SourceSpec.parse("x/y?data_files=a.jsonl,b.jsonl").data_files == ["a.jsonl", "b.jsonl"]
    assert SourceSpec.parse("hub:imdb").is_hub and SourceSpec.parse("hub:imdb").location == "imdb"


def test_a_file_whose_name_has_a_question_mark_is_that_file(tmp_path):
    odd = tmp_path / "what?.jsonl"
    odd.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    assert SourceSpec.parse(str(odd)).source == str(odd)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("x/y?splt=test", "unknown option 'splt' (did you mean 'split'?)"),
        ("x/y?split=a&split=b", "option 'split' is given twice"),
        ("x/y?streaming=maybe", "option streaming: Input should be a valid boolean"),
        ("x/y?split", "cannot read the options after '?'"),
        ("hub:../x", "'../x' is not a Hub dataset id"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, expected):
    with pytest.raises(UsageError) as exc:
        resolve_source(spec, "helpful")
    assert str(exc.value).startswith("--data helpful=") and expected in str(exc.value)


def test_dataset_options_on_a_file_are_refused(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(UsageError, match="split only apply to a dataset folder or a Hub id, not to a file"):
        resolve_source(f"{f}?split=test", "d")


# ------------------------------------------------------------------------------------------- a local dataset repository
def test_one_repository_two_dimensions_by_data_dir(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={REPO}?data_dir=helpful-base&split=test",
                  "--data", f"harmless={REPO}?data_dir=harmless-base")  # the only split, test, is found
    assert res.exit_code == 0, res.output
    data = load_prepared(tmp_path / "out")
    for dim, part in (("helpful", "helpful-base"), ("harmless", "harmless-base")):
        info = data.dim_info(dim)
        assert info["source"] == str(REPO) and info["source_kind"] == "folder" and info["format"] == "hh-rlhf"
        assert info["counts"]["read"] == len(hh_lines(part))
        chosen = {r["chosen"].rpartition("\n\nAssistant:")[2].strip() for r in hh_lines(part)}
        assert set(data.split(dim, "train")["chosen"]) <= chosen
    assert data.dim_info("helpful")["source_options"] == {"data_dir": "helpful-base", "split": "test"}
    assert f"{REPO}?data_dir=helpful-base&split=test: detected hh-rlhf" in res.stdout


def test_config_long_form_and_data_files(tmp_path, tiny_tokenizer_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"prepare:\n  data:\n    harmless: {{source: {REPO}, data_files: [harmless-base/test.jsonl.gz], split: train}}\n")
    res = prepare(tmp_path, tiny_tokenizer_dir, "--config", str(cfg))
    assert res.exit_code == 0, res.output
    assert load_prepared(tmp_path / "out").dim_info("harmless")["counts"]["read"] == len(hh_lines("harmless-base"))


def test_a_split_that_does_not_exist(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={REPO}?data_dir=helpful-base&split=validation")
    assert res.exit_code == 2
    assert f"could not load dataset {REPO}?data_dir=helpful-base[validation]:" in res.stderr
    assert not (tmp_path / "out").exists()


def test_streaming_reads_only_what_max_pairs_needs(tmp_path, tiny_tokenizer_dir, monkeypatch):
    big = tmp_path / "repo" / "pairs"
    big.mkdir(parents=True)
    rows = [{"prompt": f"Question number {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."} for i in range(3000)]
    (big / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={tmp_path / 'repo'}?data_dir=pairs&streaming=true",
                  "--max-pairs", "20")
    assert res.exit_code == 0, res.output
    info = load_prepared(tmp_path / "out").dim_info("d")
    assert info["counts"]["read"] == reading.STREAM_CHUNK < len(rows)  # one block of rows, not the whole file
    assert info["counts"]["kept"] == 20 and info["source_complete"] is False
    assert "enough for --max-pairs 20" in res.stdout

    monkeypatch.setattr(reading, "STREAM_CHUNK", 2)
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={REPO}?data_dir=helpful-base&streaming=true",
                  "--max-pairs", "3", out="small")
    assert res.exit_code == 0, res.output
    c = load_prepared(tmp_path / "small").dim_info("helpful")["counts"]
    assert c["kept"] == 3 and c["read"] < len(hh_lines("helpful-base"))


def test_streaming_without_a_cap_reads_everything(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"harmless={REPO}?data_dir=harmless-base&streaming=true")
    assert res.exit_code == 0, res.output
    info = load_prepared(tmp_path / "out").dim_info("harmless")
    assert info["counts"]["read"] == len(hh_lines("harmless-base")) and info["source_complete"] is True


def test_offline_mode_skips_the_probe_and_reads_local_folders(tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(hub, "unreachable_reason", lambda: pytest.fail("offline mode must not probe the network"))
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={REPO}?data_dir=helpful-base")
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------------- Hub models
def test_an_unreachable_hub_fails_a_model_id_at_once(monkeypatch):
    import transformers

    from spoctl.models import load_causal_lm, load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "unreachable_reason", lambda: "huggingface.co:443: Network is unreachable")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("no retries"))
    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(UsageError) as exc:
            load("someone/not-cached-anywhere")
        msg = str(exc.value)
        assert msg.startswith("could not load model 'someone/not-cached-anywhere': the Hugging Face Hub could not be"
                              " reached (huggingface.co:443: Network is unreachable)")
        assert "not in the local Hugging Face cache" in msg and "--model" in msg


def _fake_hub_cache(root: Path, repo_id: str, tok_dir: Path) -> None:
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0" * 40
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in tok_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (snap / "config.json").write_text('{"model_type": "llama"}')  # a Hub model repo has one; AutoTokenizer reads it
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from spoctl.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_hub_model_ids_offline_end_to_end(tmp_path, tiny_tokenizer_dir):
    """A fresh process, the Hub endpoint a closed local port: a cached model id loads from the cache, an uncached
    one exits 2 with one message (and no retries: the probe answers before transformers is asked)."""
    cache = tmp_path / "hub-cache"
    _fake_hub_cache(cache, "someone/tiny-chat", tiny_tokenizer_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env |= {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(4)))
    ok = _cli(["prepare", "--data", f"d={src}", "--model", "someone/tiny-chat", "--out", str(tmp_path / "a")], env)
    assert ok.returncode == 0, ok.stderr
    assert load_prepared(tmp_path / "a").model == "someone/tiny-chat"
    bad = _cli(["prepare", "--data", f"d={src}", "--model", "someone/not-cached", "--out", str(tmp_path / "b")], env)
    assert bad.returncode == 2, bad.stderr
    assert "could not load model 'someone/not-cached': the Hugging Face Hub could not be reached (127.0.0.1:9" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "b").exists()
