"""What prepare may replace and when: --force only over its own output (never a run, a folder holding a source, or
anything else), never under a reader (a real second process holds the lock), stale temporary folders cleaned,
and --out problems and write failures (disk full, file too large) as exit 2 with nothing half-written."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from prepare_helpers import cli_process, pairs, run_prepare, siblings, write_jsonl
from spoctl import locks
from spoctl.data.store import load_prepared
from spoctl.errors import UsageError


@pytest.fixture
def src(tmp_path) -> Path:
    return write_jsonl(tmp_path / "d.jsonl", pairs(8))


def prepared(tmp_path: Path, tok: Path, src: Path, name: str = "out") -> Path:
    res = run_prepare(tok, tmp_path / name, "--data", f"d={src}")
    assert res.exit_code == 0, res.output
    return tmp_path / name


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- --force
def test_force_refuses_a_run_directory(tmp_path, tiny_tokenizer_dir, src):
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"run_key": "abc", "stages": [], "format_version": 1,
                                                   "dimensions": {"d": {}}}))
    before = tree(run)
    res = run_prepare(tiny_tokenizer_dir, run, "--data", f"d={src}", "--force")
    assert res.exit_code == 2 and "it is a spoctl run directory" in res.stderr
    assert tree(run) == before


def test_force_refuses_a_folder_holding_a_source_it_reads(tmp_path, tiny_tokenizer_dir, src):
    out = prepared(tmp_path, tiny_tokenizer_dir, src)
    inside = write_jsonl(out / "more.jsonl", pairs(5, "x"))
    before = tree(out)
    res = run_prepare(tiny_tokenizer_dir, out, "--data", f"d={inside}", "--force")
    assert res.exit_code == 2, res.output
    assert f"not replacing it, because it contains {inside}, which this prepare reads" in res.stderr
    assert tree(out) == before


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda out: (out / "manifest.json").write_text('{"hello": 1}'), "does not have prepare's format_version"),
        (lambda out: (out / "manifest.json").write_text("not json"), "cannot be read as prepared data"),
        (lambda out: __import__("shutil").rmtree(out / "d" / "eval"), "lacks the prepared layout (d/train, d/eval)"),
    ],
)
def test_force_refuses_anything_not_recognisably_prepared(tmp_path, tiny_tokenizer_dir, src, damage, reason):
    out = prepared(tmp_path, tiny_tokenizer_dir, src)
    damage(out)
    before = tree(out)
    res = run_prepare(tiny_tokenizer_dir, out, "--data", f"d={src}", "--force")
    assert res.exit_code == 2 and "not replacing it even with --force, because" in res.stderr and reason in res.stderr
    assert tree(out) == before


READER = """
import sys
from spoctl.data.store import load_prepared
data = load_prepared(sys.argv[1])
print("reading", flush=True)
sys.stdin.read()  # hold the data (and its lock) until the test closes our stdin
data.close()
"""


def test_force_waits_for_no_one_while_an_align_reads(tmp_path, tiny_tokenizer_dir, src):
    out = prepared(tmp_path, tiny_tokenizer_dir, src)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        before = tree(out)
        res = run_prepare(tiny_tokenizer_dir, out, "--data", f"e={src}", "--force")
        assert res.exit_code == 2, res.output
        assert f"not replacing it, because pid {reader.pid}" in res.stderr and "is reading it" in res.stderr
        assert "wait for it to finish, or choose another --out" in res.stderr
        assert tree(out) == before
    finally:
        reader.stdin.close()
        reader.wait(timeout=60)
    res = run_prepare(tiny_tokenizer_dir, out, "--data", f"e={src}", "--force")
    assert res.exit_code == 0, res.output
    assert load_prepared(out).dims == ["e"]


WRITER = """
import sys
from pathlib import Path
from spoctl.locks import lock_exclusive
lock = lock_exclusive(Path(sys.argv[1]))
print("writing", flush=True)
sys.stdin.read()
"""


def test_a_reader_refuses_a_folder_prepare_is_writing(tmp_path, tiny_tokenizer_dir, src, monkeypatch):
    out = prepared(tmp_path, tiny_tokenizer_dir, src)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        monkeypatch.setattr(locks, "READER_WAIT_S", 0.3)
        with pytest.raises(UsageError) as exc:
            load_prepared(out)
        assert f"spoctl prepare (pid {writer.pid}" in str(exc.value) and "wait for it to finish" in str(exc.value)
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    with load_prepared(out) as data:
        assert data.dims == ["d"]


def test_two_readers_share_the_folder_and_close_releases(tmp_path, tiny_tokenizer_dir, src):
    out = prepared(tmp_path, tiny_tokenizer_dir, src)
    a, b = load_prepared(out), load_prepared(out)
    assert a.dims == b.dims == ["d"]
    res = run_prepare(tiny_tokenizer_dir, out, "--data", f"e={src}", "--force")
    assert res.exit_code == 2 and "this process" in res.stderr
    a.close()
    b.close()
    assert run_prepare(tiny_tokenizer_dir, out, "--data", f"e={src}", "--force").exit_code == 0


def test_readers_work_on_a_read_only_folder(tmp_path, tiny_tokenizer_dir, src, monkeypatch):
    """Where the lock file cannot be opened for writing (read-only media), readers still read: with the existing
    lock file opened read-only, or with no lock at all where there is none to open."""
    out = prepared(tmp_path, tiny_tokenizer_dir, src)
    real_open = os.open

    def read_only_fs(path, flags, *args):
        if str(path).endswith("/.lock") and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(locks.os, "open", read_only_fs)
    with load_prepared(out) as data:
        assert data._lock.held and len(data.split("d", "train")) > 0
    (out / ".lock").unlink()
    with load_prepared(out) as data:
        assert not data._lock.held and len(data.split("d", "train")) > 0


# ------------------------------------------------------------------------------------------- litter
def test_stale_temporary_folders_are_cleaned_but_live_ones_kept(tmp_path, tiny_tokenizer_dir, src):
    out = tmp_path / "out"
    dead = tmp_path / ".out.dead1234.tmp"
    (dead / "d").mkdir(parents=True)
    (dead / ".lock").write_text("")
    live = tmp_path / ".out.live1234.tmp"
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", WRITER, str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    foreign = [tmp_path / ".out.notmine.tmp", tmp_path / ".other.abcd1234.tmp"]
    for f in foreign:
        f.mkdir()
    try:
        assert holder.stdout.readline().strip() == "writing"
        res = run_prepare(tiny_tokenizer_dir, out, "--data", f"d={src}", "--verbose")
        assert res.exit_code == 0, res.output
        assert f"removed {dead}, left by an earlier prepare" in res.stdout
        assert not dead.exists() and live.exists() and all(f.exists() for f in foreign)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


CRASH = """
import os, sys
import datasets
def crash(self, *a, **k):
    os._exit(9)  # the process dies in the middle of writing, as with kill -9
datasets.Dataset.save_to_disk = crash
from spoctl.cli import main
main()
"""


def test_the_litter_of_a_crashed_prepare_goes_with_the_next_success(tmp_path, tiny_tokenizer_dir, src):
    out = tmp_path / "out"
    crashed = subprocess.run([sys.executable, "-c", CRASH, "prepare", "--model", str(tiny_tokenizer_dir),
                              "--data", f"d={src}", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert crashed.returncode == 9
    litter = [n for n in siblings(out) if n.startswith(".out.") and n.endswith(".tmp")]
    assert len(litter) == 1 and not out.exists()
    assert run_prepare(tiny_tokenizer_dir, out, "--data", f"d={src}").exit_code == 0
    assert siblings(out) == ["out"]


# ------------------------------------------------------------------------------------------- --out problems
def test_out_whose_parent_is_a_file(tmp_path, tiny_tokenizer_dir, src):
    (tmp_path / "file").write_text("x")
    res = run_prepare(tiny_tokenizer_dir, tmp_path / "file" / "out", "--data", f"d={src}")
    assert res.exit_code == 2 and f"{tmp_path / 'file'}: is a file, so --out" in res.stderr


def test_out_in_a_folder_that_cannot_be_written(tmp_path, tiny_tokenizer_dir, src):
    if os.geteuid() != 0:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    elif Path("/sys").is_dir():
        parent = Path("/sys")  # sysfs: even root may not create files at its top
    else:
        pytest.skip("running as root without /sys: no folder here refuses writes")
    res = run_prepare(tiny_tokenizer_dir, parent / "spoctl-out", "--data", f"d={src}")
    assert res.exit_code == 2, res.output
    assert f"{parent}: cannot write there" in res.stderr and "choose another --out" in res.stderr


def test_out_that_is_the_current_directory(tmp_path, tiny_tokenizer_dir, src, monkeypatch):
    out = prepared(tmp_path, tiny_tokenizer_dir, src)
    monkeypatch.chdir(out / "d")
    res = run_prepare(tiny_tokenizer_dir, out, "--data", f"d={src}", "--force")
    assert res.exit_code == 2 and "is the current directory or contains it" in res.stderr
    res = run_prepare(tiny_tokenizer_dir, Path("."), "--data", f"d={src}", "--force")
    assert res.exit_code == 2 and "other than the current directory" in res.stderr


def test_file_too_large_while_writing_is_exit_2_and_leaves_nothing(tmp_path, tiny_tokenizer_dir):
    """A real EFBIG: the writing process runs under RLIMIT_FSIZE (SIGXFSZ ignored, so write() fails instead)."""
    big = write_jsonl(tmp_path / "big.jsonl", pairs(2000))
    out = tmp_path / "out"
    assert run_prepare(tiny_tokenizer_dir, out, "--data", f"d={write_jsonl(tmp_path / 's.jsonl', pairs(6))}").exit_code == 0
    before = tree(out)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = cli_process(["prepare", "--model", str(tiny_tokenizer_dir), "--data", f"d={big}", "--out", str(out),
                        "--force"], preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr
    assert "writing the prepared data failed: File too large" in proc.stderr and "nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert siblings(out) == ["out"] and tree(out) == before


def test_out_empty_string_is_refused_before_anything(tmp_path, tiny_tokenizer_dir, src, monkeypatch):
    from prepare_helpers import runner
    from spoctl.cli import app

    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["prepare", "--model", str(tiny_tokenizer_dir), "--data", f"d={src}", "--out", ""])
    assert res.exit_code == 2 and "--out: invalid value for 'prepare.out'" in res.stderr and "is empty" in res.stderr


def test_out_is_checked_before_sources_and_tokenizer(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """The out folder is checked before any source is read and before the tokenizer loads."""
    import spoctl.models

    monkeypatch.setattr(spoctl.models, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded too early"))
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    res = run_prepare(tiny_tokenizer_dir, tmp_path / "file" / "out", "--data", f"d={bad}")
    assert res.exit_code == 2 and "is a file, so --out" in res.stderr, res.output
