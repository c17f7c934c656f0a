"""The command line's shared conventions: options declared once, readable help, completion, `--json` errors, flags
named in configuration errors, one voice under several processes, no stray library warnings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.cli.common import SHARED_OPTIONS, examples_epilog
from spoctl.console import Output
from spoctl.errors import CheckFailed, InputError, TrainingError, UsageError, describe_error
from spoctl.launcher import is_main_process, world_size

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["prepare", "align", "eval", "export", "demo"]
runner = CliRunner()


def spoctl(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """The real entry point in a child process (what a user runs)."""
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "spoctl", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=600, **kw)


@pytest.fixture
def demo_home(tmp_path, monkeypatch, demo_stand_in) -> Path:
    """An empty working directory with SPOCTL_HOME set, whose demo base model is a 20-step stand-in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPOCTL_HOME", str(tmp_path / "home"))
    demo_stand_in(tmp_path / "home")
    return tmp_path


# ------------------------------------------------------------------------------------------------ shared options
@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_lists_the_shared_options(command):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    for text in ("-c, --config PATH", "--set KEY=VALUE", "--print-config", "--json", "-q, --quiet", "-v, --verbose"):
        assert text in res.output, f"{command} --help lacks {text!r}"


def test_shared_options_are_declared_in_one_place():
    declared = {}
    for path in sorted((ROOT / "src" / "spoctl" / "cli").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for flag in ('"--print-config"', '"--json"', '"--quiet"', '"--verbose"', '"--config"', '"--set"'):
            if flag in text:
                declared.setdefault(flag, []).append(path.name)
    assert declared and all(files == ["common.py"] for files in declared.values()), declared
    assert list(SHARED_OPTIONS) == ["config", "set", "print_config", "json", "quiet", "verbose"]


@pytest.mark.parametrize("command", ["prepare", "align", "eval", "export"])
def test_shared_options_still_work(command, tmp_path):
    """--config, --set, --print-config and --json reach every command's configuration."""
    key, value = {"prepare": ("seed", 7), "align": ("beta", 0.25), "eval": ("batch_size", 3),
                  "export": ("check_pairs", 2)}[command]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{command}:\n  {key}: {value}\n")
    res = runner.invoke(app, [command, "-c", str(cfg), "--print-config", "--json", "--data", "x"]
                        if command == "align" else [command, "-c", str(cfg), "--print-config", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[command][key] == value
    res = runner.invoke(app, [command, "--config", str(cfg), "--set", f"{key}={value * 2}", "--print-config", "-q"])
    assert res.exit_code == 0 and f"{key}: {value * 2}" in res.stdout, res.output


# ------------------------------------------------------------------------------------------------ help
def test_metavars_are_readable():
    helps = {c: runner.invoke(app, [c, "--help"], env={"COLUMNS": "200"}).output for c in COMMANDS}
    for command, text in helps.items():
        assert not re.search(r"<(list\[str\]|str|int|float)>", text), f"{command}: typed metavar left\n{text}"
    assert "--data DIM=SOURCE" in helps["prepare"] and "--out PATH" in helps["prepare"]
    assert "--max-length INT" in helps["prepare"]
    assert "--weight DIM=W" in helps["align"] and "--lr FLOAT" in helps["align"]
    assert "--dims DIM,DIM,..." in helps["align"]
    assert "--judge-model DIM=PATH" in helps["eval"] and "--fail-under DIM=VALUE" in helps["eval"]
    assert "[RUN_DIR]" in helps["eval"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_examples_are_printed_verbatim_on_a_narrow_terminal(command):
    cmd = typer.main.get_command(app).commands[command]
    examples = [ln.strip() for ln in cmd.epilog.split("\b", 1)[1].splitlines() if ln.strip()]
    assert examples and any(len(e) > 60 for e in examples + ["x" * 61]), examples
    out = runner.invoke(app, [command, "--help"], env={"COLUMNS": "60"}).output
    lines = [ln.strip() for ln in out.splitlines()]
    for example in examples:
        assert example in lines, f"example re-wrapped or missing in `spoctl {command} --help`: {example}"


def test_examples_epilog_marks_its_paragraph_as_preformatted():
    epilog = examples_epilog(["spoctl a --long " + "x" * 100, "spoctl b"])
    assert "\b\n" in epilog and epilog.endswith("spoctl b")
    assert examples_epilog([]) is None


def test_shell_completion_script_and_completions():
    assert "--install-completion" in runner.invoke(app, ["--help"]).output
    # Typer finds the user's shell from the process tree; with detection off, --show-completion takes its name.
    fixed = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    res = spoctl("--show-completion", "bash", env={**fixed, "SHELL": "/bin/bash"})
    assert res.returncode == 0, res.stderr
    # registered for `spoctl`, also when started as `python -m spoctl`
    assert "_SPOCTL_COMPLETE=complete_bash" in res.stdout and "complete -o default -F _spoctl_completion spoctl" in res.stdout
    res = spoctl("--show-completion", "zsh", env={**fixed, "SHELL": "/bin/zsh"})
    assert res.returncode == 0 and "#compdef spoctl" in res.stdout, res.stderr
    # the script's callback really completes: subcommands, then a subcommand's options
    done = spoctl(env={"_SPOCTL_COMPLETE": "complete_bash", "COMP_WORDS": "spoctl al", "COMP_CWORD": "1"})
    assert done.stdout.split() == ["align"], done
    done = spoctl(env={"_SPOCTL_COMPLETE": "complete_bash", "COMP_WORDS": "spoctl align --lo", "COMP_CWORD": "2"})
    assert "--lora" in done.stdout.split(), done


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("args", [["eval", "no-such-run"], ["eval"], ["export", "--run", "no-such-run", "--out", "x"],
                                  ["export", "--out", "x"], ["align", "--dims", "helpful", "--out", "afile/run"],
                                  ["align", "--dims", "helpful", "--out", "afile"],
                                  ["align", "--dims", "helpful", "--data", "no-such-run"],
                                  ["align", "--dims", "helpful", "--data", "afile"]])
def test_a_mistyped_run_data_or_out_is_told_before_the_model_libraries_load(args, tmp_path):
    """`spoctl eval`/`export` with a mistyped run (or none), `spoctl align` with a --data folder that is not there
    (or not prepared data) or an --out it cannot use: the error comes before torch is imported (half a second, not
    the ~3 s torch's import alone takes, or the demo's assets), in the real entry point. The child says at exit
    whether torch was imported."""
    (tmp_path / "afile").write_text("x")
    code = ("import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, "
            "file=sys.stderr)); from spoctl.cli import main; main()")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600, env={**os.environ, "SPOCTL_HOME": str(tmp_path / "home")})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and lines[-2].startswith("error: ") and ("run" in lines[-2] or "afile" in lines[-2]), \
        res.stderr
    assert lines[-1] == "torch imported: False", res.stderr


def test_json_usage_error_is_one_object_on_stdout():
    res = runner.invoke(app, ["align", "--bta", "1", "--json"])
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["kind"] == "usage" and doc["exit_code"] == 2 and "--bta" in doc["error"]
    assert "No such option" in res.stderr


def test_json_config_error_names_the_flag():
    res = runner.invoke(app, ["align", "--data", "prepared", "--lr", "-1", "--json"])
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc == {"error": doc["error"], "exit_code": 2, "kind": "usage"}
    assert doc["error"].startswith("configuration error: --lr -1.0: invalid value for 'align.learning_rate'")
    assert res.stderr.strip() == f"error: {doc['error']}"


def test_json_input_error_carries_the_path(tmp_path, tiny_tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    res = runner.invoke(app, ["prepare", "--data", f"helpful={bad}", "--model", str(tiny_tokenizer_dir),
                              "--out", str(tmp_path / "p"), "--json"])
    assert res.exit_code == 2, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "input" and doc["path"] == str(bad) and "line 2" in doc["error"]
    assert not (tmp_path / "p").exists()


def test_flags_are_named_in_configuration_errors():
    res = runner.invoke(app, ["prepare", "--data", "helpful=x.jsonl", "--model", "m", "--max-length", "256",
                              "--set", "length.max_prompt_tokens=300"])
    assert res.exit_code == 2
    assert "--max-length 256: invalid value for 'prepare.length'" in res.stderr
    assert "must be smaller than --max-length (256)" in res.stderr  # the rule's sentence says the flag too
    assert "related: --max-prompt-tokens, --overflow" in res.stderr  # what else the user can pass
    res = runner.invoke(app, ["eval", "runs/x", "--num-prompts", "0"])
    assert res.exit_code == 2 and "--num-prompts 0: invalid value for 'eval.generation.num_prompts'" in res.stderr
    res = runner.invoke(app, ["export", "--run", "r", "--max-shard-size", "0"])
    assert res.exit_code == 2 and "--max-shard-size 0:" in res.stderr
    # a key set with --set is not a flag: the key is named, as before
    res = runner.invoke(app, ["align", "--data", "p", "--set", "learning_rate=-1"])
    assert res.exit_code == 2 and "invalid value for 'align.learning_rate'" in res.stderr and "--lr" not in res.stderr


def test_every_flag_maps_to_its_config_key():
    """Each command's flag table (the one declaration behind its options, error messages and the docs): every
    flag's key is a key of its configuration, and every flag is an option of the command."""
    from spoctl.cli.flags import COMMAND_FLAGS, field_of
    from spoctl.config import AlignConfig, CompareConfig, EvalConfig, ExportConfig, PrepareConfig

    models = {"prepare": PrepareConfig, "align": AlignConfig, "demo": AlignConfig, "eval": EvalConfig,
              "compare": CompareConfig, "export": ExportConfig}
    expected = {
        "prepare": {"data": "--data", "format": "--format", "model": "--model", "out": "--out",
                    "length.max_prompt_tokens": "--max-prompt-tokens", "length.max_length": "--max-length",
                    "length.overflow": "--overflow", "eval_fraction": "--eval-fraction", "max_pairs": "--max-pairs",
                    "seed": "--seed", "force": "--force", "columns": "--columns",
                    "length.prompt_truncation": "--prompt-truncation"},
        "align": {"dims": "--dims", "data": "--data", "model": "--model", "out": "--out", "mode": "--mode",
                  "alpha": "--alpha", "weights": "--weight", "beta": "--beta", "lora.enabled": "--lora/--full",
                  "learning_rate": "--lr", "epochs": "--epochs", "batch_size": "--batch-size",
                  "max_steps": "--max-steps", "seed": "--seed", "resume": "--resume", "keep": "--keep", "replay": "--replay",
                  "quantize": "--quantize", "report_to": "--report-to"},
        "eval": {"run": "--run", "dims": "--dims", "data": "--data", "judge.name": "--judge", "judge.arg": "--judge",
                 "judge.models": "--judge-model", "judge.url": "--judge-url", "judge.api_key_env": "--judge-key-env",
                 "judge.concurrency": "--judge-concurrency", "generation.num_prompts": "--num-prompts",
                 "generation.max_new_tokens": "--max-new-tokens", "generation.temperature": "--temperature",
                 "generation.top_p": "--top-p", "generation.seed": "--seed", "gate.fail_under": "--fail-under",
                 "gate.max_regression": "--max-regression", "gate.allow_incomplete": "--allow-incomplete",
                 "plot": "--no-plot"},
        "export": {"run": "--run", "stage": "--stage", "out": "--out", "adapter_only": "--adapter-only",
                   "max_shard_size": "--max-shard-size", "dtype": "--dtype", "push_to_hub": "--push-to-hub",
                   "force": "--force"},
    }
    for command, mapping in expected.items():
        assert {key: f.name for f in COMMAND_FLAGS[command] for key in f.keys} == mapping, command
    for command, table in COMMAND_FLAGS.items():
        help_text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        for f in table:
            for key in f.keys:
                field_of(models[command], key)  # KeyError: a flag for a key its configuration lacks
            for decl in f.decls:
                assert all(d in help_text for d in decl.split("/")), (command, decl)


def test_flag_help_is_the_config_description():
    from spoctl.config import AlignConfig

    text = " ".join(runner.invoke(app, ["align", "--help"], env={"COLUMNS": "200"}).output.split())
    for key in ("beta", "epochs", "report_to", "resume"):
        assert " ".join(AlignConfig.model_fields[key].description.split()) in text, key


def test_describe_error_kinds_and_codes():
    assert describe_error(UsageError("u")).as_json() == {"error": "u", "exit_code": 2, "kind": "usage"}
    assert describe_error(InputError("bad", path="a.jsonl", line=3)).as_json() == {
        "error": "a.jsonl: line 3: bad", "exit_code": 2, "kind": "input", "path": "a.jsonl"}
    assert describe_error(CheckFailed("gate")).exit_code == 1 and describe_error(CheckFailed("g")).kind == "check"
    assert describe_error(TrainingError("nan")).kind == "training"
    assert describe_error(KeyboardInterrupt()).exit_code == 130
    info = describe_error(OSError(28, "No space left on device", "runs/x/model.safetensors"))
    assert info.kind == "os" and info.path == "runs/x/model.safetensors" and "no space left" in info.message
    assert "out of memory" in describe_error(MemoryError()).message
    assert describe_error(RecursionError()).kind == "input"
    assert describe_error(ValueError("a bug")) is None


def test_unexpected_exception_keeps_the_traceback_and_asks_for_a_report(monkeypatch):
    import spoctl.evaluate

    def boom(cfg, out):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(spoctl.evaluate, "evaluate", boom)
    res = runner.invoke(app, ["eval", "some-run", "--json"])
    assert res.exit_code == 70
    assert "Traceback (most recent call last)" in res.stderr and "ZeroDivisionError: a bug" in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: internal error (ZeroDivisionError: a bug)") and "spoctl issue tracker" in last
    assert json.loads(res.stdout)["kind"] == "internal"


def test_a_check_that_fails_in_json_mode_leaves_one_document(demo_home):
    res = runner.invoke(app, ["align", "--dims", "helpful", "--max-steps", "1", "--out", "runs/a", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "runs/a", "--json", "--no-plot", "--fail-under", "helpful=1.0"])
    assert res.exit_code == 1
    report = json.loads(res.stdout)  # exactly one document: the report, whose gate says what failed
    assert report["gate"]["passed"] is False, report["gate"]
    assert res.stderr.strip().splitlines()[-1].startswith("error: gate:")


def test_ctrl_c_exits_130(demo_home):
    import signal
    import time

    env = {**os.environ, "SPOCTL_HOME": str(demo_home / "fresh-home")}  # no base model: it is built first (seconds)
    # SIGINT as a terminal gives it: a suite started in the background (`make test &`, nohup) passes SIGINT on
    # ignored, and Python then never turns it into KeyboardInterrupt (the run went on and exited 0).
    proc = subprocess.Popen([sys.executable, "-m", "spoctl", "align", "--dims", "helpful", "--out", "r"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=demo_home,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()
    assert "building the demo base model" in line or "built-in demo" in line, line
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130, or ended by SIGINT, which a shell reports as the same 130: now and then (measured: 1 run in 4) CPython
    # re-raises SIGINT at exit, after spoctl handled the interrupt, when the interrupt first surfaced in C-level code
    # (CPython's unhandled-KeyboardInterrupt flag stays set); the message and the absence of a traceback hold always.
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ several processes
@pytest.mark.parametrize("env,main", [({}, True), ({"RANK": "0", "WORLD_SIZE": "2"}, True),
                                      ({"RANK": "1", "WORLD_SIZE": "2"}, False),
                                      ({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, True),
                                      ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False)])
def test_main_process_from_the_launcher_environment(env, main):
    assert is_main_process(env) is main


@pytest.mark.parametrize("value,n", [(None, 1), ("", 1), (" ", 1), ("1", 1), ("2", 2), (" 8 ", 8), ("0", 1),
                                     ("two", 1), ("-2", 1)])
def test_the_number_of_processes_from_the_launcher_environment(value, n):
    assert world_size({} if value is None else {"WORLD_SIZE": value}) == n


@pytest.mark.parametrize("name", ["WORLD_SIZE", "RANK", "LOCAL_RANK"])
def test_a_launcher_variable_that_is_not_a_number_is_an_input_error(name, monkeypatch, tmp_path):
    """An empty `WORLD_SIZE=` left in a shell: accelerate stopped on int('') after the model was loaded (`align`,
    exit 70 'a bug in spoctl'), and so did `eval`'s process setup. Now exit 2, before any work, naming it."""
    import torch

    from spoctl.engine.processes import Processes

    monkeypatch.setenv(name, "")
    res = runner.invoke(app, ["align", "--dims", "helpful", "--data", str(tmp_path / "prepared")])
    assert res.exit_code == 2 and f"environment variable {name} is ''" in res.output, res.output
    assert f"unset {name}" in res.output
    with pytest.raises(UsageError, match=name):
        Processes.from_launcher(torch.device("cpu"))


def test_only_the_main_process_prints(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for args in (["align", "--print-config"], ["align", "--print-config", "--json"], ["prepare", "--print-config"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and res.stdout == "" and res.stderr == "", (args, res.output)
    # an error still prints on the process that has it (stderr), but no JSON document
    res = runner.invoke(app, ["align", "--dims", "helpful,honest", "--json"])
    assert res.exit_code == 2 and res.stdout == "" and "no dimension 'honest'" in res.stderr
    monkeypatch.setenv("RANK", "0")
    res = runner.invoke(app, ["align", "--print-config"])
    assert res.exit_code == 0 and "align:" in res.stdout
    out = Output(main_process=False)
    assert out.quiet and not out.verbose


def test_only_the_main_process_prints_under_a_real_launcher_environment():
    """The real entry point, as torchrun starts it on the second process."""
    res = spoctl("align", "--print-config", env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res
    res = spoctl("align", "--print-config", env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert res.returncode == 0 and res.stdout.count("align:") == 1, res


# ------------------------------------------------------------------------------------------------ library warnings
def test_lora_run_prints_no_library_warning(demo_home):
    res = spoctl("align", "--dims", "helpful", "--lora", "--max-steps", "1", "--out", "runs/l", cwd=demo_home,
                 env={"SPOCTL_HOME": str(demo_home / "home")})
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr and "warnings.warn" not in res.stderr, res.stderr
    # stdout a pipe in a real process: plain progress lines, no terminal codes (tests/test_progress_lines.py
    # checks every phase's lines in-process)
    assert "stage 1/1 helpful step 1/1 loss" in res.stdout and "\x1b[" not in res.stdout, res.stdout
    assert res.stdout.rstrip().splitlines()[-1] == "next: spoctl eval --run runs/l", res.stdout


def test_the_warning_filter_is_targeted():
    from spoctl.cli.common import quiet_library_output

    quiet_library_output()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_library_output()  # installs its filter again, in front
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("some other deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["some other deprecation"]
