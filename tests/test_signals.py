"""spoctl.signals on its own: what SIGTERM and SIGHUP do inside a command, inside `held()` (align's training), and
before a command has started. (Whole runs stopped by real signals: tests/test_resume_matrix.py, tests/chaos.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from spoctl import signals
from spoctl.errors import Stopped, describe_error


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_in_a_command_stops_it_with_exit_128_plus_its_number(sig):
    with signals.stop_signals(), pytest.raises(Stopped) as caught:
        os.kill(os.getpid(), sig)  # the handler runs in this thread as soon as the call returns
    info = describe_error(caught.value)
    assert (info.exit_code, info.kind) == (128 + sig, "interrupted") and sig.name in info.message


def test_a_held_signal_waits_for_the_holder_and_is_raised_if_it_never_acts():
    with signals.stop_signals():
        with pytest.raises(Stopped) as caught:
            with signals.held():
                os.kill(os.getpid(), signal.SIGHUP)
                assert signals.pending() == signal.SIGHUP  # recorded, nothing raised: the holder decides
        assert describe_error(caught.value).exit_code == 129 and signals.pending() is None
        with signals.held():  # the holder acted on it: nothing more is raised
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.pending() == signal.SIGTERM
            signals.acknowledge()


def test_a_signal_inside_a_librarys_error_handling_is_still_a_stop(tmp_path, monkeypatch):
    """Code that turns any Exception of a library into a clear error (here: a model that fails to load) must not
    turn a signal into that error: found by the chaos suite, SIGTERM during a model load ended as "could not load
    model ...: stopped by SIGTERM", exit 2, instead of 143."""
    import transformers

    from spoctl.models import load_causal_lm
    from tinyworld import make_model_dir

    model = make_model_dir(tmp_path / "model")

    def signalled(*args, **kwargs):  # the signal arrives while transformers loads the weights
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the load")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", signalled)
    with signals.stop_signals(), pytest.raises(Stopped) as caught:
        load_causal_lm(str(model))
    assert describe_error(caught.value).exit_code == 143


def test_the_previous_handlers_come_back_after_a_command():
    before = signal.getsignal(signal.SIGTERM)
    with signals.stop_signals():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_before_the_command_starts_ends_with_an_error_line_and_the_json_document():
    code = ("import os, signal, time; from spoctl.signals import exit_before_start; exit_before_start(['--json']);"
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 143 and done.stderr.startswith("error: stopped by SIGTERM"), done
    assert json.loads(done.stdout) == {"error": done.stderr[len("error: "):].strip(), "exit_code": 143,
                                       "kind": "interrupted"}


# Where the signal arrives: before the CLI's imports; once the command has started (inside `stop_signals`), before
# its configuration is checked (CI's second sighting: align importing its modules); in align's engine, before its
# data and model checks (check_inputs).
def _signal_before(module: str, name: str) -> str:
    return (f"from spoctl.cli import main\nimport {module} as where\nchecked = where.{name}\n"
            "def signalled(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return checked(*a, **k)\n"
            f"where.{name} = signalled\n")


_SIGNAL_AT = {
    "before-imports": "os.kill(os.getpid(), signal.SIGTERM)\nfrom spoctl.cli import main\n",
    "in-the-command": _signal_before("spoctl.cli.align", "execute"),
    "in-the-engine": _signal_before("spoctl.engine.align", "check_inputs"),
}


@pytest.mark.parametrize("at,args,code,says", [
    ("before-imports", ["--lr", "-1"], 2, "--lr"),
    ("in-the-command", ["--lr", "-1"], 2, "--lr"),
    # (an input error only the engine finds: a missing --data folder is told before the engine is imported)
    ("in-the-engine", ["--data", "{prepared}", "--batch-size", "4096", "--out", "{tmp}/run"], 2, "fewer than one batch"),
    ("before-imports", ["--print-config"], 143, "SIGTERM"),
    ("in-the-command", ["--print-config"], 143, "SIGTERM"),
    ("in-the-engine", ["--data", "{prepared}", "--out", "{tmp}/run"], 143, "SIGTERM"),
])
def test_under_a_launcher_a_signal_before_the_input_checks_waits_for_them(at, args, code, says, tmp_path):
    """torchrun ends the other processes with SIGTERM as soon as one fails; on an input error every process finds,
    the quickest one fails first, and the main process, not yet through its own checks, then said "stopped by
    SIGTERM" instead of the error (CI, twice: test_json_stdout's `--lr -1` under torchrun). Under a launcher the
    signal now waits for the input checks: an input error is the answer (exit 2), valid input stops with the
    signal (143) before any work -- no run folder."""
    if "{prepared}" in " ".join(args):
        from tinyworld import make_model_dir, make_prepared

        model = make_model_dir(tmp_path / "model")
        args = [a.replace("{prepared}", str(make_prepared(tmp_path / "prepared", model, ["helpful"]))) for a in args]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    script = ("import os, signal, sys\nfrom spoctl.signals import exit_before_start\nexit_before_start(sys.argv[1:])\n"
              f"{_SIGNAL_AT[at]}main()\n")
    done = subprocess.run([sys.executable, "-c", script, "align", "--dims", "helpful", *args, "--json"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "WORLD_SIZE": "2", "RANK": "0"})
    doc = json.loads(done.stdout)
    assert done.returncode == doc["exit_code"] == code and says in doc["error"], (done.returncode, done.stdout,
                                                                                  done.stderr)
    if code == 2:
        assert "SIGTERM" not in done.stderr, done.stderr
    else:
        assert doc["kind"] == "interrupted" and not (tmp_path / "run").exists(), doc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_after_the_command_ended_leaves_its_exit_code(sig):
    """Once `main` has its command's exit code, a signal changes nothing: Python's shutdown would otherwise put the
    default action back and the process would die by it, silently, after a finished run (chaos caught a -15 20 ms
    after align's last line). Here the signal comes right after `main`, then the script exits with main's code."""
    script = ("import os, sys, time\nfrom spoctl.cli import main\ntry:\n    main()\nexcept SystemExit as done:\n"
              "    code = done.code\n"
              f"os.kill(os.getpid(), {int(sig)})\ntime.sleep(0.2)\nprint('after', flush=True)\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script, "prepare", "--print-config"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("after"), (done.returncode, done.stderr)
    assert "error:" not in done.stderr, done.stderr
