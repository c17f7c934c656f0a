"""The warm test processes (tests/warm.py) behave as fresh ones where the suite relies on it: the same exit code,
stdout and stderr, working folder, stdin and environment; a signal to the client reaches the command and ends
both as it ends a fresh process; a client killed takes its command with it; a different import-time environment
gets a server of its own (the value a library read at import is the command's, not the server's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import warm



@pytest.fixture(autouse=True)
def _on():
    if os.environ.get("SPOCTL_TEST_WARM", "1") == "0":
        pytest.skip("warm processes are off (SPOCTL_TEST_WARM=0)")
    assert warm.available(), "tests/conftest.py did not set up warm processes"


def both(argv: list[str], **kw) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """(warm, fresh) runs of `python *argv`."""
    return (subprocess.run(warm.python_cmd(*argv), capture_output=True, text=True, timeout=120, **kw),
            subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, **kw))


def same(a: subprocess.CompletedProcess, b: subprocess.CompletedProcess) -> None:
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)


@pytest.mark.parametrize("argv", [
    ["-m", "spoctl", "--help"],
    ["-m", "spoctl", "eval", "no-such-run", "--json"],  # an input error: exit 2, a JSON document, an error line
    ["-m", "spoctl", "align", "--no-such-flag"],  # Click's usage error
    ["-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)", "x"],
    ["-c", "import sys; sys.exit('a message')"],
    ["-c", "raise ValueError('boom')"],
])
def test_a_warm_command_ends_as_a_fresh_one(argv, tmp_path):
    warm_run, fresh = both(argv, cwd=tmp_path)
    same(warm_run, fresh)


def test_folder_stdin_environment_and_arguments_are_the_clients(tmp_path):
    script = ("import os, sys, torch; print(os.getcwd(), sys.argv[1:], os.environ['SOME_VAR'], sys.stdin.read(), "
              "torch.get_num_threads(), 'spoctl' in sys.modules)")
    env = {**os.environ, "SOME_VAR": "a value"}
    got = [subprocess.run(cmd, cwd=tmp_path, env=env, input="from stdin", capture_output=True, text=True, timeout=120)
           for cmd in (warm.python_cmd("-c", script, "a", "b"), [sys.executable, "-c", script, "a", "b"])]
    assert got[0].returncode == 0, got[0].stderr
    head = lambda r: r.stdout.rsplit(" ", 1)[0]  # noqa: E731 (what the server imported is not the point)
    assert head(got[0]) == head(got[1]) == f"{tmp_path} ['a', 'b'] a value from stdin 1"


def test_a_signal_to_the_client_is_the_commands(tmp_path):
    """SIGTERM to the client reaches the command, whose own handling decides the end (here spoctl's "stopped by
    SIGTERM" and 143, in a fresh process as in a warm one); a handler-less death is the client's death too."""
    code = "import signal, time; print('ready', flush=True); time.sleep(60)"
    for cmd in (warm.python_cmd("-c", code), [sys.executable, "-c", code]):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    code = ("import sys; from spoctl.signals import exit_before_start; exit_before_start([]); "
            "print('ready', flush=True); import time; time.sleep(60)")
    ends = []
    for cmd in (warm.python_cmd("-c", code), [sys.executable, "-c", code]):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        ends.append((proc.returncode, err))
    assert ends[0] == ends[1] and ends[0][0] == 143 and "stopped by SIGTERM" in ends[0][1], ends


def test_a_killed_client_takes_its_command_with_it(tmp_path):
    marker = tmp_path / "pid"
    code = (f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    proc = subprocess.Popen(warm.python_cmd("-c", code))
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = int(marker.read_text())
    assert pid != proc.pid  # the command is the server's child, not the client
    proc.kill()
    proc.wait(timeout=60)
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    pytest.fail(f"the command (pid {pid}) outlived its killed client")


def test_an_import_time_variable_gets_a_server_of_its_own(tmp_path):
    """huggingface_hub reads HF_HUB_OFFLINE when imported: a command that sets it sees it, as a fresh one does.
    (Offline as tests/test_readme_commands.py's commands are, whose server this may share: a server costs seconds.)"""
    script = "import huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))}
    for env, expect in ((base, "False"), ({**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, "True")):
        got = subprocess.run(warm.python_cmd("-c", script), env=env, capture_output=True, text=True, timeout=120)
        assert got.stdout.strip() == expect, got.stderr


def test_the_processes_of_a_torchrun_launch_are_warm(tmp_path):
    """torchrun gives each process variables of its own (TORCHELASTIC_ERROR_FILE is per rank): not read at import,
    they must not cost each process a server of its own, i.e. the imports the warm processes are there to save."""
    from test_distributed_runs import free_port

    script = "import os, sys; print(os.environ['RANK'], 'transformers' in sys.modules)"  # imported: a warm process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *warm.torchrun_entry("-c", script)]
    servers = lambda: {p for p in os.listdir(os.environ[warm.DIR_VAR]) if p.endswith(".sock")}  # noqa: E731
    before = servers()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line for line in done.stdout.splitlines() if line.strip()) == ["0 True", "1 True"], done.stdout
    assert len(servers() - before) <= 1  # at most the one for this environment


def test_what_warm_leaves_out_of_a_servers_choice_is_what_spoctl_sets_for_itself(monkeypatch):
    """warm.SPOCTL_SETS are values every spoctl command sets itself: the list must follow spoctl's."""
    from spoctl.cli.common import quiet_library_output

    for name in warm.SPOCTL_SETS:
        monkeypatch.delenv(name, raising=False)
    quiet_library_output()
    assert {name: os.environ.get(name) for name in warm.SPOCTL_SETS} == warm.SPOCTL_SETS
