"""Reading local files (every extension, gzip) and Hub ids, and every reading error naming file and line/record."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spoctl import hub
from spoctl.data.sources import read_records, resolve_source
from spoctl.errors import InputError, UsageError

RECORDS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet_bytes(rows) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def csv_bytes(rows) -> bytes:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def read(path: Path):
    return read_records(resolve_source(str(path), "dim"))


# ------------------------------------------------------------------------------------------- every file kind
@pytest.mark.parametrize(
    "name, make, unit",
    [
        ("d.jsonl", jsonl_bytes, "line"),
        ("d.jsonl.gz", jsonl_bytes, "line"),
        ("d.json", lambda rows: json.dumps(rows).encode(), "record"),
        ("d.json.gz", lambda rows: json.dumps({"data": rows}).encode(), "record"),
        ("d.parquet", parquet_bytes, "record"),
        ("d.parquet.gz", parquet_bytes, "record"),
        ("d.csv", csv_bytes, "record"),
        ("d.CSV.gz", csv_bytes, "record"),
    ],
)
def test_every_file_kind_reads_the_same_records(tmp_path, name, make, unit):
    path = write(tmp_path / name, make(RECORDS))
    records, digest = read(path)
    assert [r for _, r in records] == RECORDS
    assert [w.unit for w, _ in records] == [unit, unit]
    assert [w.index for w, _ in records] == [1, 2]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_jsonl_skips_blank_lines_and_a_bom_and_counts_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS[0]).encode() + b"\n\n  \n" + json.dumps(RECORDS[1]).encode())
    records, _ = read(path)
    assert [w.index for w, _ in records] == [1, 4]


def test_csv_keeps_text_columns_as_strings_and_infers_numbers(tmp_path):
    path = write(tmp_path / "d.csv", b"prompt,response,helpfulness\nq,42,3\nq,7,1.5\n")
    records, _ = read(path)
    assert records[0][1] == {"prompt": "q", "response": "42", "helpfulness": 3.0}
    assert records[1][1]["helpfulness"] == 1.5


# ------------------------------------------------------------------------------------------- reading errors
def error_of(path: Path) -> str:
    with pytest.raises(InputError) as exc:
        read(path)
    return str(exc.value)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", jsonl_bytes(RECORDS) + b'{"prompt": "x", "chosen": \n')
    msg = error_of(path)
    assert msg.startswith(f"{path}: line 3: malformed JSON")


def test_non_object_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", jsonl_bytes(RECORDS[:1]) + b'["a", "b"]\n')
    assert error_of(path) == f"{path}: line 2: expected a JSON object per line, got a list"


def test_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "bad.jsonl.gz", jsonl_bytes(RECORDS[:1]) + b'{"prompt": "caf\xe9"}\n')
    msg = error_of(path)
    assert msg.startswith(f"{path}: line 2: invalid UTF-8")


def test_invalid_utf8_in_json_and_csv_names_the_line(tmp_path):
    assert f"{tmp_path / 'bad.json'}: line 2: invalid UTF-8" in error_of(write(tmp_path / "bad.json", b'[\n{"a": "\xff"}]'))
    assert f"{tmp_path / 'bad.csv'}: line 3: invalid UTF-8" in error_of(write(tmp_path / "bad.csv", b"prompt\nok\n\xff\n"))


@pytest.mark.parametrize("name, data", [("e.jsonl", b""), ("e.jsonl", b"\n \n"), ("e.json", b"[]"), ("e.csv", b""), ("e.jsonl.gz", b"")])
def test_empty_file(tmp_path, name, data):
    path = write(tmp_path / name, data)
    assert error_of(path) == f"{path}: the file is empty: it holds no records"


def test_json_errors(tmp_path):
    path = write(tmp_path / "a.json", b'[\n{"a": 1},\n{"a": }\n]')
    assert error_of(path).startswith(f"{path}: line 3: malformed JSON")
    path = write(tmp_path / "b.json", b'{"rows": []}')
    assert 'expected a list of records or {"data": [...]}, got an object' in error_of(path)
    path = write(tmp_path / "c.json", b'[{"a": 1}, "oops"]')
    assert error_of(path) == f"{path}: record 2: expected an object, got a string"


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"this is not gzip")
    assert "not a valid gzip file" in error_of(path)


def test_unreadable_parquet(tmp_path):
    path = write(tmp_path / "d.parquet", b"PAR1 garbage")
    assert error_of(path).startswith(f"{path}: not a readable Parquet file")


# ------------------------------------------------------------------------------------------- resolving SOURCE
def test_missing_file(tmp_path):
    with pytest.raises(InputError) as exc:
        resolve_source(str(tmp_path / "nope.jsonl"), "helpful")
    assert str(exc.value) == f"{tmp_path / 'nope.jsonl'}: file does not exist (--data helpful={tmp_path / 'nope.jsonl'})"


@pytest.mark.parametrize("spec", ["data/nope.jsonl", "./x", "a/b/c", "nope.txt", "has space"])
def test_things_that_look_like_paths_are_missing_files(spec):
    with pytest.raises(InputError, match="file does not exist"):
        resolve_source(spec, "d")


@pytest.mark.parametrize("spec", ["Anthropic/hh-rlhf", "PKU-Alignment/PKU-SafeRLHF", "imdb", "nvidia/HelpSteer2"])
def test_hub_ids(spec):
    assert resolve_source(spec, "d").kind == "hub"


@pytest.mark.parametrize("name, shown", [("d.txt", ".txt"), ("d.tsv.gz", ".tsv.gz"), ("README", "(none)")])
def test_unsupported_extension(tmp_path, name, shown):
    path = write(tmp_path / name, b"x")
    with pytest.raises(InputError) as exc:
        resolve_source(str(path), "d")
    assert str(exc.value).startswith(f"{path}: unsupported file extension {shown}; use .jsonl, .json, .parquet, .csv")


def test_a_folder_is_a_dataset_repository_and_one_without_data_says_so(tmp_path):
    assert resolve_source(str(tmp_path), "d").kind == "folder"
    with pytest.raises(UsageError, match=f"could not load dataset {tmp_path}"):
        read(tmp_path)


# ------------------------------------------------------------------------------------------- the Hub, offline
def test_hub_unreachable_fails_fast_without_loading(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "unreachable_reason", lambda: "huggingface.co:443: no route")
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not try to download"))
    with pytest.raises(UsageError) as exc:
        read_records(resolve_source("Anthropic/hh-rlhf", "helpful"))
    msg = str(exc.value)
    assert "Hub dataset 'Anthropic/hh-rlhf'" in msg and "could not be reached (huggingface.co:443: no route)" in msg
    assert "local file" in msg


def test_hub_load_errors_become_usage_errors(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="could not be reached"):
        read_records(resolve_source("x/y?split=train", "d"))

    def bad_split(*args, **kwargs):
        raise ValueError('Unknown split "test". Should be one of [\'train\'].')

    monkeypatch.setattr(datasets, "load_dataset", bad_split)
    with pytest.raises(UsageError, match="could not load dataset x/y\\[test\\]: ValueError: Unknown split"):
        read_records(resolve_source("x/y?split=test", "d"))


def test_hub_rows_are_records(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    seen = {}

    def load(path, **kwargs):
        seen.update(kwargs, path=path)
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", load)
    records, digest = read_records(resolve_source("x/y?data_dir=helpful-base&revision=v1", "d"), default_split="test")
    assert [r for _, r in records] == RECORDS
    assert str(records[1][0]) == "x/y?data_dir=helpful-base&revision=v1[test]: record 2"
    assert seen == {"path": "x/y", "split": "test", "streaming": False, "name": None, "data_dir": "helpful-base",
                    "data_files": None, "revision": "v1"}
    assert len(digest) == 64


def test_hub_offline_end_to_end_exits_2(tmp_path, tiny_tokenizer_dir):
    """The real `datasets.load_dataset` path in a fresh process with the Hub switched off (no network is touched)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-c", "from spoctl.cli import main; main()", "prepare", "--data", "helpful=Anthropic/hh-rlhf",
         "--model", str(tiny_tokenizer_dir), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "could not load Hub dataset 'Anthropic/hh-rlhf'" in proc.stderr
    assert "could not be reached" in proc.stderr and "local file" in proc.stderr
    assert not (tmp_path / "out").exists()
