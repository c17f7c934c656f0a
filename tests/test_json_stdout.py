"""`--json`: stdout is exactly one JSON document on every path of every command -- success, --print-config, usage
and input errors, a resumed run (whose "resuming from step N" line goes to stderr), a failed eval gate, several
processes -- in real processes, where a library or C code writing to file descriptor 1 would otherwise land there."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import warm
from test_engine_align import _env
from test_distributed_runs import torchrun
from tinyworld import checkpoints, make_world, stop_in_process

ARGS = ["--lr", "1e-3", "--batch-size", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("json-world"), ["helpful", "harmless"])


def spoctl(*args: str, cmd: list[str] | None = None, cwd: Path | None = None) -> tuple[int, dict, str]:
    """Run `spoctl ARGS --json` in its own process; (exit code, the one JSON document of stdout, stderr)."""
    done = subprocess.run([*warm.python_cmd("-m", "spoctl"), *args, "--json"] if cmd is None else [*cmd, "--json"],
                          capture_output=True, text=True, env=_env(), timeout=900, cwd=cwd)
    try:
        doc = json.loads(done.stdout)  # one document, nothing before or after it (whitespace aside)
    except json.JSONDecodeError as err:
        raise AssertionError(f"stdout is not one JSON document ({err}):\n{done.stdout}\n--- stderr:\n{done.stderr}")
    assert isinstance(doc, dict), doc
    return done.returncode, doc, done.stderr


@pytest.mark.parametrize("args", [
    ["prepare", "--print-config"], ["align", "--print-config"], ["eval", "--print-config"],
    ["export", "--print-config"], ["demo", "--print-config"],
    ["align", "--no-such-flag"],  # Click's usage error
    ["align", "--lr", "-1"],  # a configuration error named by flag
    ["align", "--weight", "helpful"],  # a DIM=VALUE flag without its value
    ["align", "--config", "/dev/zero"],  # the config-file cap
    ["eval", "no-such-run"], ["export", "--run", "no-such-run", "--out", "x"],  # missing inputs
    ["prepare", "--data", "helpful=missing.jsonl", "--model", "m"],
])
def test_documents_and_errors_before_any_work(args, tmp_path):
    code, doc, err = spoctl(*args, cwd=tmp_path)
    if "--print-config" in args:
        assert code == 0 and len(doc) == 1, (doc, err)
    else:
        assert code == 2 and doc["exit_code"] == 2 and doc["error"], (doc, err)
        assert err.strip().splitlines()[-1].lower().startswith("error: ")


def test_prepare_align_resume_eval_gate_and_export(world, tmp_path):
    root, model, prepared = world
    raw = tmp_path / "helpful.jsonl"
    raw.write_text("".join(json.dumps({"prompt": f"question {i}?", "chosen": f"a good answer {i}",
                                       "rejected": f"bad {i}"}) + "\n" for i in range(12)))
    code, doc, err = spoctl("prepare", "--data", f"helpful={raw}", "--model", str(model), "--out",
                            str(tmp_path / "prep"))
    assert code == 0 and "helpful" in json.dumps(doc), err

    run = tmp_path / "run"
    align = ["align", "--dims", "helpful,harmless", "--data", str(prepared), *ARGS, "--epochs", "8", "--max-steps",
             "12", "--set", "save_every=2", "--out", str(run)]
    # Stopped in stage 1 (SIGTERM, in this process: what is checked here is the resume's stdout).
    stopped, out = stop_in_process([*align, "--quiet"], lambda: bool(checkpoints(run / "stages" / "01-helpful" /
                                                                                   "checkpoints")))
    assert stopped == 143, out
    code, doc, err = spoctl(*align, "--resume")
    assert code == 0 and doc["run_dir"] == str(run), err
    assert "resuming from step" in err, err  # said, on stderr

    code, doc, err = spoctl("eval", str(run), "--no-plot", "--fail-under", "helpful=1.0")
    assert code == 1 and doc["gate"]["passed"] is False, err  # the report is the one document, its gate failed
    assert err.strip().splitlines()[-1].startswith("error: gate:")

    code, doc, err = spoctl("export", "--run", str(run), "--out", str(tmp_path / "exported"))
    assert code == 0 and doc, err


@pytest.mark.slow
def test_two_processes_print_one_document(world, tmp_path):
    _, _, prepared = world
    cmd = torchrun(2, "align", "--dims", "helpful", "--data", str(prepared), *ARGS, "--max-steps", "2", "--out",
                   str(tmp_path / "two"))
    code, doc, err = spoctl(cmd=cmd)
    assert code == 0 and doc["run_dir"] == str(tmp_path / "two"), err
    # Fresh processes: one fails at once and the launcher stops the other with SIGTERM. Fresh, that signal comes
    # after both have imported for seconds, long after spoctl holds signals; a warm process may still be starting
    # (Python's own start, which spoctl cannot cover), where a user's never is.
    code, doc, err = spoctl(cmd=torchrun(2, "align", "--dims", "helpful", "--data", str(prepared), "--lr", "-1",
                                         warm_processes=False))
    assert code != 0 and doc["exit_code"] == 2, err


def test_a_tracker_that_cannot_start_is_a_usage_error(world, tmp_path, monkeypatch):
    """A tracker's own refusal (MLflow 3 and a file: store without MLFLOW_ALLOW_FILE_STORE, W&B without a login) is
    the user's environment: exit 2 naming the tracker and what it said -- not exit 70, 'a bug in spoctl'."""
    from typer.testing import CliRunner

    import accelerate.tracking
    from spoctl.cli import app

    def refuse(self, *args, **kwargs):
        raise RuntimeError("the store at file:///x refuses: set MLFLOW_ALLOW_FILE_STORE")

    monkeypatch.setattr(accelerate.tracking.TensorBoardTracker, "__init__", refuse)
    _, _, prepared = world
    res = CliRunner().invoke(app, ["align", "--dims", "helpful", "--data", str(prepared), *ARGS, "--max-steps", "1",
                                   "--report-to", "tensorboard", "--out", str(tmp_path / "t"), "--json"])
    assert res.exit_code == 2, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "usage" and "the tensorboard tracker could not start" in doc["error"]
    assert "MLFLOW_ALLOW_FILE_STORE" in doc["error"] and "Traceback" not in res.stderr
