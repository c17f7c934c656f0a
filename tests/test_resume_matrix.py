"""Checkpoint, interrupt, resume -- for every kind of run spoctl trains: a model with untied and with tied input and
output embeddings (tie_word_embeddings, as SmolLM2, Qwen2.5 and Llama-3.2 have) x LoRA and full fine-tuning x one
process, two DDP processes and two FSDP processes. Every cell is a two-stage run interrupted in stage 2, after a
checkpoint, by a real signal to real processes, then resumed; its two stage models must equal those of the same run
left alone, bit for bit, and its metrics log must hold every step once.

Each path (one process, DDP, FSDP) is interrupted once by SIGKILL (the checkpoint `save_every` wrote is all that
is left); the other cells by SIGTERM or SIGHUP, sent to every process or to some of them only (spoctl then saves a
checkpoint at the next step boundary, every process agreeing on the step, marks the stage interrupted and exits
143 or 129). Affordable on 2 cores: a tiny model, 10 steps a stage, and the two-process runs launched together --
the two SIGKILLed runs need a launch each (the kill ends it), then one torchrun launch runs the eight
uninterrupted runs, the six runs stopped by a signal and all eight resumes (tests/spoctl_sequence.py).

This module took over what these tests did (now removed): test_engine_align.py::
test_resume_after_sigkill_in_stage_2_gives_the_same_final_weights (cell untied/full/one) and
test_distributed_runs.py::test_a_killed_fsdp_process_then_resume_gives_the_uninterrupted_run (cell tied/full/fsdp,
and its resume on one process: test_a_checkpoint_written_by_two_fsdp_processes_resumes_on_one).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors import safe_open

from test_engine_align import SPOCTL, _env, assert_same, assert_same_to_rounding, run_cli, weights
import warm
from tinyworld import checkpoints, kill_when, make_model_dir, make_prepared, poll_until, stop_in_process

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MODELS, TUNINGS, LAYOUTS = ("untied", "tied"), ("full", "lora"), ("one", "ddp", "fsdp")
CELLS = [(m, t, lay) for lay in LAYOUTS for m in MODELS for t in TUNINGS]
STEPS, SAVE_EVERY = 10, 3
# How each cell is interrupted: the signal, and the ranks it is sent to (one process: "subprocess" is a separate
# `spoctl align`, "in-process" is this test's own process running the CLI).
INTERRUPT: dict[tuple[str, str, str], tuple[signal.Signals, object]] = {
    ("untied", "full", "one"): (signal.SIGKILL, "subprocess"),
    ("tied", "full", "one"): (signal.SIGTERM, "subprocess"),  # with --json: the error document is checked
    ("untied", "lora", "one"): (signal.SIGHUP, "in-process"),
    ("tied", "lora", "one"): (signal.SIGTERM, "in-process"),
    ("untied", "full", "ddp"): (signal.SIGKILL, (1,)),
    ("tied", "full", "ddp"): (signal.SIGTERM, (1,)),  # one rank only: the other must stop at the same step
    ("untied", "lora", "ddp"): (signal.SIGHUP, (0, 1)),
    ("tied", "lora", "ddp"): (signal.SIGTERM, (0,)),
    ("tied", "full", "fsdp"): (signal.SIGKILL, (0,)),
    ("untied", "full", "fsdp"): (signal.SIGTERM, (1,)),
    ("untied", "lora", "fsdp"): (signal.SIGHUP, (0,)),
    ("tied", "lora", "fsdp"): (signal.SIGTERM, (0, 1)),
}
# Learning rate and AdamW epsilon as in ROUNDING_RUN (test_engine_align.py), so the resume of a two-process
# checkpoint on one process can be compared to rounding; every other comparison here is bit for bit.
COMMON = ["--dims", "helpful,harmless", "--lr", "0.5", "--set", "adam_epsilon=1.0", "--batch-size", "4", "--epochs",
          "8", "--max-steps", str(STEPS), "--set", f"save_every={SAVE_EVERY}", "--quiet"]


def cell_id(cell: tuple[str, str, str]) -> str:
    return "-".join(cell)


def stage2_checkpoints(run: Path) -> list[Path]:
    return checkpoints(run / "stages" / "02-harmless" / "checkpoints")


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def metrics_steps(run: Path, stage: int, dim: str) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["stage"] == stage and f"stage{stage}/{dim}/loss" in r]


def litter(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]


def workers(proc: subprocess.Popen, ranks: tuple[int, ...]) -> list:
    import psutil

    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") in {str(r) for r in ranks} and "spoctl" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_for(ready, proc: subprocess.Popen | None = None, timeout: float = 1500) -> None:
    def ended() -> bool:
        return proc is not None and proc.poll() is not None

    if not poll_until(lambda: ready() or ended(), timeout):
        raise AssertionError("timed out waiting for a checkpoint")
    if not ready():
        raise AssertionError(f"the launch ended (exit {proc.returncode}) before it could be signalled")


def torchrun(port_args: list[str], *args: str, warm_processes: bool = False) -> list[str]:
    """`torchrun ... ARGS` on two processes. Its processes warm (tests/warm.py) where asked: not where one is
    SIGKILLed (a warm command dies a few milliseconds after its client). The launcher itself is never warm: the
    processes signalled are found among its children."""
    from test_distributed_runs import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), *port_args, *(warm.torchrun_entry(*args) if warm_processes else args)]


class Matrix:
    """Every cell's runs, made once for the module."""

    def __init__(self, root: Path):
        self.root = root
        self.models = {m: make_model_dir(root / f"model-{m}", tied=(m == "tied")) for m in MODELS}
        self.prepared = {m: make_prepared(root / f"prepared-{m}", self.models[m], ["helpful", "harmless"])
                         for m in MODELS}
        self.outcome: dict[tuple, dict] = {c: {} for c in CELLS}

    def args(self, cell: tuple[str, str, str], run: str, *extra: str) -> list[str]:
        model, tuning, layout = cell
        how = {"one": [], "ddp": ["--set", "distributed=ddp"], "fsdp": ["--set", "distributed=fsdp"]}[layout]
        lora = ["--lora", "--set", "lora.r=4"] if tuning == "lora" else ["--full"]
        return ["align", "--data", str(self.prepared[model]), "--out", str(self.run(cell, run)), *COMMON, *lora,
                *how, *extra]

    def run(self, cell: tuple[str, str, str], which: str) -> Path:
        return self.root / which / cell_id(cell)

    # -------------------------------------------------------------------------------- one process
    def one_process(self) -> None:
        cells = [c for c in CELLS if c[2] == "one"]
        for cell in cells:
            code, out = run_cli(self.args(cell, "straight"))
            assert code == 0, out
        for cell in cells:
            sig, how = INTERRUPT[cell]
            run = self.run(cell, "interrupted")
            if how == "subprocess":
                extra = ["--json"] if sig != signal.SIGKILL else []
                # Warm (tests/warm.py) where the signal is forwarded (SIGTERM), fresh where it is SIGKILL.
                python = [*SPOCTL] if sig == signal.SIGKILL else warm.python_cmd("-m", "spoctl")
                proc = subprocess.Popen([*python, *self.args(cell, "interrupted", *extra)], env=_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                if sig == signal.SIGKILL:
                    kill_when(proc, lambda: bool(stage2_checkpoints(run)))
                    out, err = proc.communicate()
                else:
                    reader = threading.Thread(target=lambda: self.outcome[cell].update(
                        zip(("stdout", "stderr"), proc.communicate())))
                    reader.start()
                    wait_for(lambda: bool(stage2_checkpoints(run)), proc)
                    proc.send_signal(sig)
                    reader.join(600)
                self.outcome[cell]["code"] = proc.returncode
            else:
                self.outcome[cell]["code"] = self._signal_this_process(cell, sig)
            self.outcome[cell]["manifest"] = manifest(run)
            self.outcome[cell]["litter"] = litter(run)
            code, out = run_cli([*self.args(cell, "interrupted"), "--resume"])
            self.outcome[cell].update(resume_code=code, resume_out=out)

    def _signal_this_process(self, cell: tuple[str, str, str], sig: signal.Signals) -> int:
        """`spoctl align` in this process (CliRunner), sent `sig` once stage 2 checkpointed."""
        run = self.run(cell, "interrupted")
        code, out = stop_in_process(self.args(cell, "interrupted"), lambda: bool(stage2_checkpoints(run)), sig)
        self.outcome[cell]["stderr"] = out
        return code

    # -------------------------------------------------------------------------------- two processes
    def two_processes(self) -> None:
        cells = [c for c in CELLS if c[2] != "one"]
        signalled = [c for c in cells if INTERRUPT[c][0] != signal.SIGKILL]
        killed = [c for c in cells if INTERRUPT[c][0] == signal.SIGKILL]
        for cell in killed:  # first, a launch of its own each: SIGKILL ends the launch
            sig, ranks = INTERRUPT[cell]
            run = self.run(cell, "interrupted")
            proc = subprocess.Popen(torchrun([], "-m", "spoctl", *self.args(cell, "interrupted")), env=_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: bool(stage2_checkpoints(run)), proc)
            for w in workers(proc, ranks):
                w.send_signal(signal.SIGKILL)
            self.outcome[cell]["code"] = proc.wait(timeout=300)
            self.outcome[cell]["manifest"] = manifest(run)
            self.outcome[cell]["litter"] = []  # SIGKILL leaves temporary files; the resume removes them
            if cell[2] == "fsdp":
                shutil.copytree(run, self.run(cell, "resharded"))
        # Then one launch (each costs every process its start): every uninterrupted run, the runs stopped by a
        # signal, their resumes, and the resumes of the killed runs.
        commands = ([self.args(c, "straight") for c in cells] + [self.args(c, "interrupted") for c in signalled]
                    + [[*self.args(c, "interrupted"), "--resume"] for c in (*signalled, *killed)])
        codes = self._sequence(commands, signalled)
        n, resumes = len(cells), codes[len(cells) + len(signalled):]
        assert codes[:n] == [0] * n, codes
        for i, cell in enumerate(signalled):
            self.outcome[cell]["code"] = codes[n + i]
        for cell, code in zip((*signalled, *killed), resumes):
            self.outcome[cell]["resume_code"] = code
        for cell in killed:
            if cell[2] == "fsdp":  # the two-process FSDP checkpoint resumed on one process: DCP reshards it
                args = [a if a != "distributed=fsdp" else "distributed=ddp" for a in self.args(cell, "resharded")]
                self.resharded = (cell, *run_cli([*args, "--resume"]))

    def _sequence(self, commands: list[list[str]], signalled: list[tuple]) -> list[int]:
        """Run `commands` in one two-process launch; send each of `signalled` its signal once its stage 2 has a
        checkpoint (they run in that order)."""
        spec, codes = self.root / f"commands-{len(commands)}.json", self.root / f"codes-{len(commands)}.json"
        spec.write_text(json.dumps(commands))
        log = (self.root / f"sequence-{len(commands)}.log").open("w")
        proc = subprocess.Popen(torchrun([], str(Path(__file__).with_name("spoctl_sequence.py")), str(spec),
                                         str(codes), warm_processes=True), env=_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            for cell in signalled:
                sig, ranks = INTERRUPT[cell]
                run = self.run(cell, "interrupted")
                wait_for(lambda: bool(stage2_checkpoints(run)), proc)
                for w in workers(proc, ranks):
                    w.send_signal(sig)
                wait_for(lambda: manifest(run)["stages"][1]["status"] != "running", proc)
                self.outcome[cell]["manifest"] = manifest(run)
                self.outcome[cell]["litter"] = litter(run)
            assert proc.wait(timeout=1800) == 0, (self.root / f"sequence-{len(commands)}.log").read_text()[-5000:]
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        return json.loads(codes.read_text())


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Matrix:
    m = Matrix(tmp_path_factory.mktemp("matrix"))
    m.one_process()
    m.two_processes()
    return m


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(matrix, cell):
    sig, _ = INTERRUPT[cell]
    got = matrix.outcome[cell]
    run, straight = matrix.run(cell, "interrupted"), matrix.run(cell, "straight")
    stages = got["manifest"]["stages"]
    assert stages[0]["status"] == "completed"
    if sig == signal.SIGKILL:
        assert got["code"] != 0 and stages[1]["status"] == "running", "the kill did not land inside stage 2"
    else:
        # Stopped at a step boundary after the signal: checkpoint saved, the stage marked, 128 + the signal.
        assert got["code"] == 128 + sig, got
        assert stages[1]["status"] == "interrupted" and f"stopped by {sig.name}" in stages[1]["error"], stages[1]
        assert got["litter"] == [], "temporary files were left behind"
    assert got["resume_code"] == 0, got.get("resume_out")
    for stage in ("01-helpful", "02-harmless"):
        assert_same(weights(run, stage), weights(straight, stage))
    assert metrics_steps(run, 2, "harmless") == list(range(1, STEPS + 1)), "steps repeated or missing after resume"


def test_sigterm_under_json_prints_one_error_document_and_the_resume_command(matrix):
    cell = ("tied", "full", "one")
    got = matrix.outcome[cell]
    doc = json.loads(got["stdout"])  # stdout is exactly one JSON document
    assert doc["kind"] == "interrupted" and doc["exit_code"] == 143, doc
    assert "stopped by SIGTERM after step" in doc["error"] and "checkpoint" in doc["error"]
    assert doc["error"].endswith("--json --resume"), doc["error"]
    errors = [line for line in got["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in got["stderr"], got["stderr"]


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(matrix):
    """DDP, SIGTERM to rank 1 only: rank 0 (which writes the manifest and the exit code recorded here) stopped
    too, after the same step, with the checkpoint of that step."""
    cell = ("tied", "full", "ddp")
    got = matrix.outcome[cell]
    assert got["code"] == 143
    error = got["manifest"]["stages"][1]["error"]
    step = int(error.split("after step ")[1].split(" ")[0])
    assert f"step-{step:06d}" in error and step < STEPS


def test_tied_stage_models_are_written_as_save_pretrained_writes_them(matrix):
    """A tied head is stored once, under the embedding's name, by every layout (FSDP wrote lm_head.weight beside
    embed_tokens), and the saved model loads with its head tied."""
    from spoctl.models import load_causal_lm

    names = {}
    for layout in LAYOUTS:
        folder = matrix.run(("tied", "full", layout), "straight") / "stages" / "02-harmless" / "model"
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            names[layout] = sorted(f.keys())
        model = load_causal_lm(str(folder))
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in names["one"] and names["ddp"] == names["fsdp"] == names["one"]
    untied = matrix.run(("untied", "full", "fsdp"), "straight") / "stages" / "02-harmless" / "model"
    with safe_open(str(untied / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()


def test_a_checkpoint_written_by_two_fsdp_processes_resumes_on_one(matrix):
    """DCP reshards: the same state resumed on one process ends where the two-process run ends, to rounding (the
    bound of test_engine_align.ROUNDING_RUN), and says so."""
    cell, code, out = matrix.resharded
    assert code == 0 and "written by 2 processes, resharded to 1" in out, out
    straight = matrix.run(cell, "straight")
    assert_same_to_rounding(weights(matrix.run(cell, "resharded"), "02-harmless"), weights(straight, "02-harmless"),
                            weights(straight, "01-helpful"))
