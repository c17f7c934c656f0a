"""Several real processes (gloo on CPU): DDP and FSDP2 against one process (one shared one-process run,
`one_process`, is the reference of every full fine-tuning comparison), frozen passes shared out over 1, 2 and 3
processes, two rendezvous "nodes" on this machine, damaged checkpoints, and `spoctl eval`'s scorecard under two
processes. (A process killed with SIGKILL, SIGTERM or SIGHUP and the run resumed: tests/test_resume_matrix.py.)
The two-process commands that need no launcher of their own share one torchrun launch (`launched`).

Comparisons of two trainings that differ only in float rounding use ROUNDING_RUN and its bound (see
test_engine_align.py): AdamW with epsilon 1.0 is Lipschitz in the gradient, so rounding-size gradient differences
stay rounding-size weight differences on any CPU, while a real difference (a lost gradient sync, a wrong shard, a
mis-scaled loss) moves the runs as far apart as training moved them.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_engine_align import (ROUNDING_RATIO, ROUNDING_RUN, SPOCTL, _env, assert_same, assert_same_to_rounding,
                               run_cli, weights)
from spoctl.rundir import RunDir  # noqa: E402
import warm
from tinyworld import checkpoints, kill_when, make_world

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, extra: tuple[str, ...] = (), warm_processes: bool = True) -> list[str]:
    """`torchrun ... -m spoctl ARGS`, its processes warm (tests/warm.py) unless told otherwise."""
    if not warm_processes:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port()), *extra, "-m", "spoctl", *args]
    return [*warm.python_cmd("-m", "torch.distributed.run"), "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *extra, *warm.torchrun_entry("-m", "spoctl", *args)]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=kw.pop("env", _env()), capture_output=True, text=True, timeout=900, **kw)
    if done.returncode != 0:
        # The launcher's own traceback fills the end of stderr; what the failing process printed is above it.
        ours = [line for line in done.stderr.splitlines() if "torch/distributed/elastic" not in line]
        raise AssertionError(f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n--- stderr, the launcher's lines left out:\n"
                             + "\n".join(ours[-80:]))
    return done


def copy_prepared(src: Path, dst: Path) -> Path:
    """A copy of prepared data without its log-prob cache, so the run computes its own frozen passes."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("dist"), ["helpful", "harmless"])


ROUNDING_ALIGN = ["align", "--dims", "helpful,harmless", *ROUNDING_RUN, "--quiet"]


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory) -> tuple[Path, Path]:
    """(run, its prepared data): the one-process ROUNDING_RUN training, in this process, that every full
    fine-tuning run on several processes is compared with. Its own copy of the data, so it computes (and keeps)
    its own frozen passes. Tests read it and never write into it."""
    root = tmp_path_factory.mktemp("one-process")
    data = copy_prepared(world[2], root / "prepared")
    code, out = run_cli([*ROUNDING_ALIGN, "--full", "--data", str(data), "--out", str(root / "run")])
    assert code == 0, out
    return root / "run", data


@pytest.fixture(scope="module")
def launched(world, tmp_path_factory, request) -> dict[str, dict]:
    """The two-process commands that need no launcher of their own, run by one torchrun launch
    (tests/spoctl_sequence.py: each launch costs every process its start), one after the other: the DDP run ("ddp":
    the same training as `one_process`, frozen passes included), the FSDP LoRA run ("fsdp-lora") and the
    two-process eval of a copy of `one_process`'s run ("eval"). Only the commands of the tests this session runs
    (tests/test_other_cpus.py runs the DDP test alone). Returns, by command, its `run` and prepared `data` folders,
    its exit `code` and the launch's `log`."""
    here = Path(__file__)
    wanted = {item.originalname + (f"[{item.callspec.id}]" if hasattr(item, "callspec") else "")
              for item in request.session.items if item.path == here}
    root, commands, folders = tmp_path_factory.mktemp("launched"), [], {}

    def add(name: str, *args: str) -> None:
        folders[name] = root / name
        commands.append(list(args))

    if wanted & {"test_ddp_on_two_processes_trains_what_one_process_trains",
                 "test_the_frozen_pass_on_1_2_and_3_processes_writes_the_same_cache"}:
        add("ddp", *ROUNDING_ALIGN, "--data", str(copy_prepared(world[2], root / "ddp" / "prepared")),
            "--out", str(root / "ddp" / "run"))
    if "test_fsdp_on_two_processes_trains_what_one_process_trains[lora]" in wanted:
        add("fsdp-lora", *ROUNDING_ALIGN, "--lora", "--set", "lora.r=4", "--set", "distributed=fsdp", "--set",
            "fsdp.cpu_offload=true", "--data", str(copy_prepared(world[2], root / "fsdp-lora" / "prepared")),
            "--out", str(root / "fsdp-lora" / "run"))
    if "test_eval_scorecard_under_two_processes_equals_one_process" in wanted:
        one_run, one_data = request.getfixturevalue("one_process")
        shutil.copytree(one_run, root / "eval" / "run")
        add("eval", "eval", str(root / "eval" / "run"), "--data", str(copy_prepared(one_data, root / "eval" /
            "prepared")), "--no-plot", "--json")  # its own cache: every model scored in the launch
    if commands:
        spec, codes = root / "commands.json", root / "codes.json"
        spec.write_text(json.dumps(commands))
        cmd = [*warm.python_cmd("-m", "torch.distributed.run"), "--nproc_per_node", "2", "--master_port",
               str(free_port()), *warm.torchrun_entry(str(here.with_name("spoctl_sequence.py")), str(spec),
                                                      str(codes))]
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1800)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-6000:]
        for name, code in zip(folders, json.loads(codes.read_text())):
            folders[name] = {"run": folders[name] / "run", "data": folders[name] / "prepared", "code": code,
                             "log": log}
    return folders


def launched_run(launched: dict, name: str) -> tuple[Path, Path]:
    """(run, prepared data) of a command of the shared launch, which must have exited 0."""
    got = launched[name]
    assert got["code"] == 0, f"{name}: exit {got['code']}\n" + got["log"][-6000:]
    return got["run"], got["data"]


@pytest.fixture(scope="module")
def ddp_run(launched) -> tuple[Path, Path]:
    """(run, its prepared data): the same training as `one_process` on two DDP processes, frozen passes included."""
    return launched_run(launched, "ddp")


def cache(data: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The frozen-pass cache of prepared data, by file name (the name holds the split and the model's fingerprint)."""
    return {p.name: load_file(str(p)) for p in sorted((data / "cache" / "logps").glob("*.safetensors"))}


def assert_same_logps(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for part in ("chosen", "rejected"):
        # Summed log-probs of tens of nats; a pair scored in other batch company differs by float32 rounding
        # (~1e-6 relative); a pair put in the wrong place differs by whole nats.
        torch.testing.assert_close(a[part], b[part], rtol=1e-4, atol=1e-4)


def assert_trains_what_one_process_trains(run_dir: Path, one: Path, model_dir: Path) -> None:
    """Both stages' weights to rounding (stage 2 measured from where it started, pi_1), and the logged metrics."""
    for stage, base in (("01-helpful", load_file(str(model_dir / "model.safetensors"))),
                        ("02-harmless", weights(one, "01-helpful"))):
        assert_same_to_rounding(weights(run_dir, stage), weights(one, stage), base)
    assert_metrics_same_to_rounding(metrics(run_dir), metrics(one))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_metrics_same_to_rounding(a: list[dict], b: list[dict]) -> None:
    """The logged metrics of two ROUNDING_RUN trainings: the same records, and every continuous metric within
    ROUNDING_RATIO of how much that metric moved over the run (or of its size). Accuracies count margins above
    zero, which at step 1 are pure rounding (the policy is its reference): their margins are compared instead.
    Throughput is a timing."""
    assert [(r["stage"], r["step"], sorted(r)) for r in a] == [(r["stage"], r["step"], sorted(r)) for r in b]
    keys = {k for r in a for k in r if "/" in k and not k.endswith(("accuracies", "tokens_per_second"))}
    for k in keys:
        xs = [(x[k], y[k]) for x, y in zip(a, b) if k in x]
        values = [v for pair in xs for v in pair]
        scale = max(max(values) - min(values), max(abs(v) for v in values))
        apart = max(abs(x - y) for x, y in xs)
        assert apart <= ROUNDING_RATIO * scale, (k, apart, scale)


def lora_init(model_dir: Path, stage: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The adapter a LoRA stage starts from (seeded as the engine seeds it), in saved-adapter names."""
    from peft import get_peft_model_state_dict

    from spoctl.config import AlignConfig
    from spoctl.engine.train import wrap_lora
    from spoctl.models import load_causal_lm

    model = load_causal_lm(str(model_dir))
    torch.manual_seed(seed * 1000 + stage)
    peft = wrap_lora(model, AlignConfig(lora={"enabled": True, "r": 4}))
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft).items()}


# ------------------------------------------------------------------------------------------------- FSDP vs one
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fsdp_on_two_processes_trains_what_one_process_trains(world, tmp_path, kind, request):
    """Two stages, FSDP2 over two processes (full fine-tuning launched with the shipped accelerate config and with
    activation checkpointing; LoRA through torchrun and the setting, with CPU offload: a command of the shared
    launch) against one plain process: the same weights and logged metrics to rounding."""
    root, model_dir, prepared = world
    if kind == "full":
        one = request.getfixturevalue("one_process")[0]
        two_dir = tmp_path / "two"
        run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "configs/accelerate/fsdp2.yaml"), "--num_processes", "2", "--main_process_port",
             str(free_port()), "-m", "spoctl", *ROUNDING_ALIGN, "--full", "--data",
             str(copy_prepared(prepared, tmp_path / "p2")), "--out", str(two_dir), "--set",
             "gradient_checkpointing=true"])
    else:
        one = tmp_path / "one"
        code, out = run_cli([*ROUNDING_ALIGN, "--lora", "--set", "lora.r=4", "--data",
                             str(copy_prepared(prepared, tmp_path / "p1")), "--out", str(one)])
        assert code == 0, out
        two_dir = launched_run(request.getfixturevalue("launched"), "fsdp-lora")[0]
    manifest = json.loads((two_dir / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["distributed"]["name"] == "fsdp"
    assert (manifest["distributed"]["source"], manifest["distributed"]["gradient_checkpointing"],
            manifest["distributed"]["cpu_offload"]) == (("accelerate config", True, False) if kind == "full"
                                                         else ("align.distributed", False, True))
    if kind == "full":
        assert_trains_what_one_process_trains(two_dir, one, model_dir)
    else:  # LoRA: each stage's adapter, measured from the adapter it started from
        for n, stage in enumerate(("01-helpful", "02-harmless"), start=1):
            assert_same_to_rounding(weights(two_dir, stage), weights(one, stage), lora_init(model_dir, n))
        assert_metrics_same_to_rounding(metrics(two_dir), metrics(one))
    # The stage models are plain Hugging Face folders, as one process writes them.
    for stage in ("01-helpful", "02-harmless"):
        assert sorted(p.name for p in (two_dir / "stages" / stage / "model").iterdir()) == \
            sorted(p.name for p in (one / "stages" / stage / "model").iterdir())


# ------------------------------------------------------------------------------------------------- DDP vs one
def test_ddp_on_two_processes_trains_what_one_process_trains(world, one_process, ddp_run):
    """Two DDP processes with the same global batch (each a half of it): the same weights of both stages and the
    same logged metrics as one process, to rounding."""
    run_dir, _ = ddp_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["distributed"]["name"] == "ddp"
    assert_trains_what_one_process_trains(run_dir, one_process[0], world[1])


# ------------------------------------------------------------------------------------------------- frozen passes
def test_the_frozen_pass_on_1_2_and_3_processes_writes_the_same_cache(world, one_process, ddp_run, tmp_path):
    """The frozen passes shared out over 2 (DDP) and 3 (FSDP) processes write the cache one process writes: the
    same files with the same log-probs to rounding, and every pair scored once in all (each stage's count of
    scored pairs equals one process's). Three processes get 8/8/8 training and 3/3/2 eval pairs; with two pairs a
    batch the one with fewer eval pairs runs a padding batch to keep FSDP's collective forwards in step."""
    one_run, one_data = one_process
    ddp_dir, ddp_data = ddp_run
    data = copy_prepared(world[2], tmp_path / "p3")
    run(torchrun(3, "align", "--dims", "helpful", "--batch-size", "6", "--max-steps", "1", "--lr", "1e-3", "--quiet",
                 "--set", "frozen_batch_size=2", "--set", "distributed=fsdp", "--data", str(data), "--out",
                 str(tmp_path / "run3")))
    stage = json.loads((tmp_path / "run3" / "manifest.json").read_text())["stages"][0]
    assert stage["cost"]["frozen_pairs_scored"] == 24 + 8  # pi_0 on helpful's train and eval pairs, each once
    scored = {name: [st["cost"]["frozen_pairs_scored"] for st in json.loads((d / "manifest.json").read_text())["stages"]]
              for name, d in (("one", one_run), ("ddp", ddp_dir))}
    assert scored["one"] == scored["ddp"] and all(scored["one"]), scored

    one, two, three = cache(one_data), cache(ddp_data), cache(data)
    # pi_0's entries have the same names everywhere (pi_1's name holds its fingerprint, which rounding changes).
    base = {n for n in one if json.loads((one_run / "manifest.json").read_text())["base_fingerprint"][:16] in n}
    assert len(base) == 4 and base <= two.keys(), (sorted(one), sorted(two))  # 2 dims x train, eval
    # pi_0 on helpful's two splits, and pi_1 on its eval split (the stage's last forgetting view, cached as pi_1's).
    assert len(three) == 3 and len(three.keys() & base) == 2, (sorted(three), sorted(base))
    (view,) = three.keys() - base
    assert view.startswith("helpful-eval-") and three[view]["chosen"].shape == (8,)
    assert len(two) == len(one)
    for name in base:
        assert one[name]["chosen"].shape in ((24,), (8,))
        assert_same_logps(two[name], one[name])
        if name in three:
            assert_same_logps(three[name], one[name])


def test_eval_scorecard_under_two_processes_equals_one_process(one_process, launched, tmp_path):
    """`spoctl eval` of the same run on one process (here) and on two (a command of the shared launch), each with
    its own cache, so every model is scored under each."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_process[0], run_dir)
    data = copy_prepared(one_process[1], tmp_path / "e1")
    code, out = run_cli(["eval", str(run_dir), "--data", str(data), "--no-plot", "--json"])
    assert code == 0, out
    reports = {1: (run_dir, data), 2: launched_run(launched, "eval")}
    for n, (evaluated, data) in reports.items():
        reports[n] = json.loads(RunDir(evaluated).eval_report_path.read_text())
        assert len(list((data / "cache" / "logps").glob("*.safetensors"))) == 3 * 2  # pi_0..pi_2 on 2 dims
    one, two = reports[1]["scorecard"], reports[2]["scorecard"]
    assert [r["k"] for r in one] == [r["k"] for r in two] == [0, 1, 2]
    for r1, r2 in zip(one, two):
        for dim in ("helpful", "harmless"):
            for metric, block in r1["dims"][dim].items():
                if isinstance(block, dict):
                    assert math.isclose(block["margin"], r2["dims"][dim][metric]["margin"], rel_tol=1e-4,
                                        abs_tol=1e-4), (r1["k"], dim, metric)


# ------------------------------------------------------------------------------------------------- damaged checkpoints
# (kill and resume on 1 and 2 processes, DDP and FSDP, and resharded: tests/test_resume_matrix.py)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_and_the_result_is_unchanged(world, tmp_path):
    _, _, prepared = world
    args = ["align", "--dims", "helpful", "--data", str(prepared), "--lr", "1e-3", "--batch-size", "4",
            "--epochs", "8", "--max-steps", "12", "--set", "save_every=1", "--quiet"]
    assert run_cli([*args, "--out", str(tmp_path / "straight")])[0] == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*SPOCTL, *args, "--out", str(killed)], env=_env())
    ckpts = killed / "stages" / "01-helpful" / "checkpoints"
    kill_when(proc, lambda: len(checkpoints(ckpts)) >= 2)
    found = checkpoints(ckpts)
    assert len(found) == 2, found
    both = tmp_path / "both"
    shutil.copytree(killed, both)

    # The newest has a flipped bit: named, removed, and the previous one is resumed from.
    victim = next((found[1] / "state").glob("*.safetensors"))
    raw = bytearray(victim.read_bytes())
    raw[-7] ^= 0x20
    victim.write_bytes(bytes(raw))
    code, text = run_cli([*args, "--out", str(killed), "--resume"])  # the resume in this process: the kill was real
    assert code == 0, text
    assert f"checkpoint {found[1]} is damaged ({victim} was changed after it was written" in text, text
    assert f"resuming from the previous checkpoint (step {int(found[0].name[5:])})" in text, text
    assert_same(weights(tmp_path / "straight", "01-helpful"), weights(killed, "01-helpful"))

    # Both damaged (one truncated, one flipped): the stage starts again from its beginning, same result.
    for n, folder in enumerate(sorted(p for p in (both / "stages/01-helpful/checkpoints").iterdir())):
        target = next((folder / "state").glob("*.safetensors"))
        raw = target.read_bytes()
        target.write_bytes(raw[: len(raw) // 2] if n == 0 else raw[:-1] + bytes([raw[-1] ^ 1]))
    code, text = run_cli([*args, "--out", str(both), "--resume"])
    assert code == 0, text
    assert text.count("is damaged") == 2 and "the stage starts again from its beginning" in text, text
    assert_same(weights(tmp_path / "straight", "01-helpful"), weights(both, "01-helpful"))


# ------------------------------------------------------------------------------------------------- two nodes
def test_two_rendezvous_nodes_on_one_machine(world, one_process, tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous on 127.0.0.1), one process each, FSDP: each "node" reads
    its own copy of the prepared data at its own path and has its own home and temporary folder; the run
    directory is shared. Only the global main process writes (the frozen-pass cache appears on one node only),
    and the result is the one-process result to rounding."""
    root, model_dir, prepared = world
    port, procs = free_port(), []
    for node in (0, 1):
        home = tmp_path / f"node{node}"
        data = copy_prepared(prepared, home / "prepared")
        env = {**_env(), "HOME": str(home), "TMPDIR": str(home)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", "spoctl-two-nodes", "--local_addr", "127.0.0.1", "-m", "spoctl", "align", "--dims",
               "helpful,harmless", *ROUNDING_RUN, "--quiet", "--data", str(data), "--out", str(tmp_path / "two"),
               "--set", "distributed=fsdp"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    written = [bool(list((tmp_path / f"node{n}" / "prepared").glob("cache/logps/*.safetensors"))) for n in (0, 1)]
    assert sorted(written) == [False, True], written
    assert_same_to_rounding(weights(tmp_path / "two", "02-harmless"), weights(one_process[0], "02-harmless"),
                            load_file(str(model_dir / "model.safetensors")))
