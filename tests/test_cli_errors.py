"""File-system and resource failures under real conditions, through the real entry point: each ends with one
`error: ...` line that says what failed, where, and what to do, exit code 2, and no traceback (issue 11.4).

Root ignores file permissions, so the permission cases drop the two capabilities that let it (CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH) from the child process when the tests run as root."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import warm
from spoctl.cli import app

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
DEMO_ALIGN = ["align", "--dims", "helpful", "--max-steps", "1"]  # the demo, one step


def _drop_root_file_powers() -> None:
    """In the child, before exec: drop the capabilities that let root ignore permissions (a bounding-set drop
    survives exec, so the new program's root keeps to the mode bits)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture(scope="module")
def permissions_apply():
    """A preexec function under which chmod'ed folders refuse writes, or a skip saying why there is none."""
    if os.geteuid() != 0:
        return None
    probe = subprocess.run(["true"], preexec_fn=_drop_root_file_powers, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without CAP_SETPCAP: file permissions cannot be made to apply")
    return _drop_root_file_powers


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, preexec=None,
        stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    # Warm (tests/warm.py) unless `preexec` changes the process itself (its powers), which a warm command would not get.
    python = [sys.executable] if preexec is not None else warm.python_cmd()
    return subprocess.run([*python, "-m", "spoctl", *args], cwd=cwd, env={**os.environ, **(env or {})},
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600, preexec_fn=preexec)


def assert_clean_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, the last stderr line is `error: ...` containing every needle; returns that line."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), res.stderr
    for needle in needles:
        assert needle in last, (needle, last)
    return last


@pytest.fixture(scope="module")
def home(tmp_path_factory, demo_stand_in) -> Path:
    """SPOCTL_HOME with the demo's base model (a 20-step stand-in) and its prepared data built."""
    root = tmp_path_factory.mktemp("errors-home")
    demo_stand_in(root)
    # Once in this process, so that the demo's prepared data is built before the tests' own processes start.
    res = demo_here(root, "--out", str(root / "warm"), "-q")
    assert res.exit_code == 0, res.output
    return root


def demo_here(home: Path, *args: str):
    """`spoctl align` on the demo (one step), in this process (CliRunner), with `home` as SPOCTL_HOME."""
    return CliRunner().invoke(app, [*DEMO_ALIGN, *args], env={"SPOCTL_HOME": str(home)}, catch_exceptions=False)


@pytest.fixture
def demo(home, tmp_path):
    """Run `spoctl align` on the demo (one step) in tmp_path."""

    def go(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
        return run([*DEMO_ALIGN, *args], cwd=tmp_path,
                   env={"SPOCTL_HOME": str(home), **(env or {})}, **kw)

    return go


def test_out_inside_a_read_only_folder(demo, tmp_path, permissions_apply):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        res = demo("--out", "ro/run", preexec=permissions_apply)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert_clean_error(res, "ro/run", "permission denied", "--out")
    assert list((tmp_path / "ro").iterdir()) == []


def test_unreadable_data_file(tmp_path, permissions_apply, tiny_tokenizer_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    data.chmod(0o000)
    try:
        res = run(["prepare", "--data", f"helpful={data}", "--model", str(tiny_tokenizer_dir), "--out", "p"],
                  cwd=tmp_path, preexec=permissions_apply)
    finally:
        data.chmod(0o644)
    assert_clean_error(res, "pairs.jsonl", "cannot read the file: Permission denied")
    assert not (tmp_path / "p").exists()


def test_out_below_a_file(demo, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_clean_error(demo("--out", "afile/run"), "afile/run", "a part of the path is a file")


def test_spoctl_home_is_a_file(tmp_path):
    (tmp_path / "home").write_text("not a folder")
    res = run(["align", "--dims", "helpful", "--max-steps", "1", "--out", "r", "--json"], cwd=tmp_path,
              env={"SPOCTL_HOME": str(tmp_path / "home")})
    line = assert_clean_error(res, "home", "a part of the path is a file")
    doc = json.loads(res.stdout)
    assert doc["kind"] == "os" and doc["exit_code"] == 2 and doc["path"].startswith(str(tmp_path / "home")), doc
    assert doc["error"] == line.removeprefix("error: ")


def test_lock_that_is_a_folder(demo, tmp_path):
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    assert_clean_error(demo("--out", "run"), ".lock", "is a folder, where spoctl keeps its lock file")


def test_empty_out(demo):
    res = demo("--out", "")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "Invalid value for '--out'" in res.stderr and "empty path" in res.stderr


def test_file_size_limit(demo, home, tmp_path, monkeypatch):
    """RLIMIT_FSIZE (ulimit -f) below the size of the stage's model file: the kernel refuses the write (EFBIG)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    res = demo("--out", "run", preexec=limit)
    assert_clean_error(res, "file too large", "ulimit -f", "--resume")
    # and the run can go on once the limit is lifted (in this process: the limit was the child's)
    monkeypatch.chdir(tmp_path)
    res = demo_here(home, "--out", "run", "--resume")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"][0]["status"] == "completed"


def test_disk_full_on_stdout(home, tmp_path):
    """/dev/full answers every write with ENOSPC."""
    with open("/dev/full", "w") as full:
        res = run(["align", "--print-config", "--json"], cwd=tmp_path, env={"SPOCTL_HOME": str(home)}, stdout=full)
    assert_clean_error(res, "no space left on the device")
    assert "Exception ignored" not in res.stderr


def test_too_many_open_files(tmp_path, tiny_tokenizer_dir):
    """Every file descriptor below the limit in use when the command starts: the first open fails (EMFILE)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    script = (
        "import os, resource, sys\n"
        "import datasets, transformers, spoctl.cli, spoctl.data.prepare, typer._click.decorators\n"
        "top = max(int(f) for f in os.listdir('/proc/self/fd'))\n"
        "for fd in range(top):\n"
        "    try: os.fstat(fd)\n"
        "    except OSError: os.dup2(2, fd)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "sys.argv = ['spoctl'] + sys.argv[1:]\n"
        "spoctl.cli.main()\n"
    )
    res = subprocess.run([sys.executable, "-c", script, "prepare", "--data", f"helpful={data}", "--model",
                          str(tiny_tokenizer_dir), "--out", "p"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert_clean_error(res, "too many open files", "ulimit -n")


def test_deeply_nested_json_record(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "deep.jsonl"
    data.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "a", "rejected": "b"}\n')
    res = run(["prepare", "--data", f"helpful={data}", "--model", str(tiny_tokenizer_dir), "--out", "p"],
              cwd=tmp_path)
    assert_clean_error(res)
    assert not (tmp_path / "p").exists()


def test_lone_surrogate_in_a_record(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "sur.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "a\\ud800b", "rejected": "c"}\n')
    res = run(["prepare", "--data", f"helpful={data}", "--model", str(tiny_tokenizer_dir), "--out", "p"],
              cwd=tmp_path)
    assert_clean_error(res)
    assert not (tmp_path / "p").exists()
