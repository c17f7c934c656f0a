"""Every artifact read back is verified (edits, truncation and bit flips after prepare stop with the file's name),
and hostile input is refused with exit 2 before it costs memory: huge fields, huge or endless files, FIFOs read
once, deep nesting, lone surrogates, broken CSV/Parquet."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from prepare_helpers import cli_process, pairs, run_prepare, siblings, write_jsonl
from spoctl.data.store import dataset_hash, load_prepared
from spoctl.errors import UsageError


@pytest.fixture
def out_dir(tmp_path, tiny_tokenizer_dir) -> Path:
    src = write_jsonl(tmp_path / "d.jsonl", pairs(12))
    res = run_prepare(tiny_tokenizer_dir, tmp_path / "out", "--data", f"d={src}")
    assert res.exit_code == 0, res.output
    return tmp_path / "out"


def arrow_file(out: Path, split: str = "train") -> Path:
    (f,) = (out / "d" / split).glob("*.arrow")
    return f


# ------------------------------------------------------------------------------------------- verification
def test_the_manifest_records_every_file_of_every_split(out_dir):
    m = json.loads((out_dir / "manifest.json").read_text())
    files = m["dimensions"]["d"]["files"]
    for split in ("train", "eval"):
        on_disk = {p.name for p in (out_dir / "d" / split).iterdir()}
        assert set(files[split]) == on_disk and len(on_disk) >= 3  # data-*.arrow, dataset_info.json, state.json
        for name, rec in files[split].items():
            f = out_dir / "d" / split / name
            assert rec == {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-7]), "bytes, but prepare wrote"),
        (lambda f: f.write_bytes(f.read_bytes() + b"\0"), "bytes, but prepare wrote"),
        (lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 0x01]) + f.read_bytes()[1:]), "sha256 mismatch"),
    ],
    ids=["truncated", "appended", "bit-flip"],
)
def test_a_changed_split_file_stops_the_load_naming_it(out_dir, damage, expected):
    f = arrow_file(out_dir)
    damage(f)
    with pytest.raises(UsageError) as exc:
        load_prepared(out_dir)
    msg = str(exc.value)
    assert msg.startswith(f"{f}: ") and expected in msg and f"run spoctl prepare again with --out {out_dir} --force" in msg


def test_a_bit_flip_in_the_middle_of_a_token_column(out_dir):
    """A change that still parses as Arrow (a token id one off) is caught too: it is the hash, not the parser."""
    f = arrow_file(out_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="sha256 mismatch"):
        load_prepared(out_dir)


def test_a_split_changed_after_loading_is_caught_when_opened(out_dir):
    data = load_prepared(out_dir)
    f = arrow_file(out_dir, "eval")
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(UsageError, match=f"{f}: .* bytes, but prepare wrote"):
        data.split("d", "eval")
    data.close()


def test_an_edited_state_file_is_caught(out_dir):
    state = out_dir / "d" / "train" / "state.json"
    state.write_text(state.read_text().replace("\n", " \n", 1))
    with pytest.raises(UsageError, match=f"{state}: "):
        load_prepared(out_dir)


def test_data_without_file_records_is_checked_by_its_token_hash(out_dir):
    """Prepared data from before file records (format version 1) is still read, verified by re-hashing its ids."""
    m = json.loads((out_dir / "manifest.json").read_text())
    del m["dimensions"]["d"]["files"]
    m["format_version"] = 1
    (out_dir / "manifest.json").write_text(json.dumps(m))
    with load_prepared(out_dir) as data:
        assert data.data_hash("d", "train") == dataset_hash(data.split("d", "train"))
    m["dimensions"]["d"]["hashes"]["train"] = "0" * 64  # what an edited split looks like to this check
    (out_dir / "manifest.json").write_text(json.dumps(m))
    with load_prepared(out_dir) as data, pytest.raises(UsageError, match="token ids do not match the hash"):
        data.data_hash("d", "train")


def test_a_manifest_of_the_wrong_shape(out_dir):
    m = json.loads((out_dir / "manifest.json").read_text())
    m["dimensions"]["d"]["hashes"] = "oops"
    (out_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError, match="manifest.json: damaged \\(dimensions.d has no hashes\\)"):
        load_prepared(out_dir)


# ------------------------------------------------------------------------------------------- resources
def test_a_huge_field_is_refused_before_tokenizing_and_the_limit_can_be_raised(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import spoctl.models

    rows = pairs(3) + [{"prompt": "q", "chosen": "x" * 300_001, "rejected": "no"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    real = spoctl.models.load_tokenizer
    monkeypatch.setattr(spoctl.models, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded before the check"))
    res = run_prepare(tiny_tokenizer_dir, tmp_path / "out", "--data", f"d={src}")
    assert res.exit_code == 2
    assert (f"{src}: line 4: field 'chosen': 300,001 characters, more than max_record_chars (200,000)" in res.stderr
            and "--set max_record_chars=N" in res.stderr)
    monkeypatch.setattr(spoctl.models, "load_tokenizer", real)
    res = run_prepare(tiny_tokenizer_dir, tmp_path / "out", "--data", f"d={src}", "--set", "max_record_chars=400000",
                      "--max-length", "64")
    assert res.exit_code == 0, res.output


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", pairs(100))
    res = run_prepare(tiny_tokenizer_dir, tmp_path / "out", "--data", f"d={src}", "--set", "max_source_bytes=2KB")
    assert res.exit_code == 2
    assert f"{src}: {src.stat().st_size:,} bytes, larger than max_source_bytes (2,000)" in res.stderr


def test_a_gzip_bomb_is_stopped_while_reading(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "bomb.jsonl.gz"
    src.write_bytes(gzip.compress(b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + b" " * 5_000_000))
    assert src.stat().st_size < 10_000
    res = run_prepare(tiny_tokenizer_dir, tmp_path / "out", "--data", f"d={src}", "--set", "max_source_bytes=1MB")
    assert res.exit_code == 2 and "larger than max_source_bytes (1,000,000 bytes after decompression)" in res.stderr


def test_a_fifo_source_is_read_once(tmp_path, tiny_tokenizer_dir):
    """A named pipe can be read only once: prepare must not hang (it used to read it twice: hash, then parse)."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    payload = "".join(json.dumps(r) + "\n" for r in pairs(6)).encode()

    def feed():
        with open(fifo, "wb") as f:  # blocks until prepare opens the pipe
            f.write(payload)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    proc = cli_process(["prepare", "--model", str(tiny_tokenizer_dir), "--data", f"d={fifo}", "--out",
                        str(tmp_path / "out")], timeout=180)
    writer.join(timeout=10)
    assert proc.returncode == 0, proc.stderr
    info = load_prepared(tmp_path / "out").dim_info("d")
    assert info["hashes"]["source"] == hashlib.sha256(payload).hexdigest() and info["counts"]["read"] == 6


def test_a_device_is_not_a_source(tmp_path, tiny_tokenizer_dir):
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    res = run_prepare(tiny_tokenizer_dir, tmp_path / "out", "--data", f"d={link}")
    assert res.exit_code == 2 and "not a regular file" in res.stderr


def test_the_source_hash_is_of_the_bytes_read(tmp_path):
    """Hashing while reading gives the file's sha256, gzip'd or not (the hash covers the compressed bytes)."""
    from spoctl.data.sources import read_records, resolve_source

    for name in ("a.jsonl", "a.jsonl.gz"):
        data = "".join(json.dumps(r) + "\n" for r in pairs(50)).encode()
        path = tmp_path / name
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        _, digest = read_records(resolve_source(str(path), "d"))
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- malformed input: exit 2
BAD = {
    "deep.jsonl": (b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 1: JSON nested too deeply"),
    "deep_object.jsonl": (b'{"prompt": ' + b"[" * 200 + b"]" * 200 + b', "chosen": "a", "rejected": "b"}\n',
                          "line 1: field 'prompt[0][0]"),
    "deep.json": (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    "surrogate.jsonl": (b'{"prompt": "q", "chosen": "ok \\ud800 there", "rejected": "b"}\n',
                        "line 1: field 'chosen': not valid Unicode text: a lone surrogate '\\ud800' at character 3"),
    "surrogate_key.jsonl": (b'{"prompt": "q", "chosen": "a", "rejected": "b", "\\udc00": 1}\n',
                            "line 1: field '\\udc00': not valid Unicode text"),
    "ragged.csv": (b'prompt,chosen,rejected\nq,a,b\nq2,a2\n', "not a readable CSV file"),
    "broken.parquet": (b"PAR1" + b"\x00" * 64 + b"PAR1", "not a readable Parquet file"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_input_is_exit_2_with_file_line_field(tmp_path, tiny_tokenizer_dir, name):
    data, expected = BAD[name]
    src = tmp_path / name
    src.write_bytes(data)
    proc = cli_process(["prepare", "--model", str(tiny_tokenizer_dir), "--data", f"d={src}", "--out", str(tmp_path / "out")])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {src}: ") and "Traceback" not in proc.stderr
    assert expected in proc.stderr
    assert siblings(tmp_path / "out") == []
