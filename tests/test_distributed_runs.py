"""Several real processes (gloo on CPU): FSDP2 against one process, frozen passes shared out over 1, 2 and 3
processes, two rendezvous "nodes" on this machine, damaged checkpoints, and `spoctl eval`'s scorecard under two processes.

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
from tinyworld import checkpoints, kill_when, make_model_dir, make_prepared, make_world

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *extra, "-m", "spoctl", *args]


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
def test_fsdp_on_two_processes_trains_what_one_process_trains(world, tmp_path, kind):
    """Two stages, FSDP2 over two processes (full fine-tuning launched with the shipped accelerate config and with
    activation checkpointing; LoRA through torchrun and the setting, with CPU offload) against one plain process:
    the same weights and logged metrics to rounding."""
    root, model_dir, prepared = world
    extra = ["--lora", "--set", "lora.r=4"] if kind == "lora" else ["--full"]
    common = ["align", "--dims", "helpful,harmless", *ROUNDING_RUN, "--quiet", *extra]
    code, out = run_cli([*common, "--data", str(copy_prepared(prepared, tmp_path / "p1")), "--out",
                         str(tmp_path / "one")])
    assert code == 0, out
    two = [*common, "--data", str(copy_prepared(prepared, tmp_path / "p2")), "--out", str(tmp_path / "two")]
    if kind == "full":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate/fsdp2.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "spoctl", *two, "--set", "gradient_checkpointing=true"]
    else:
        cmd = torchrun(2, *two, "--set", "distributed=fsdp", "--set", "fsdp.cpu_offload=true")
    run(cmd)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["distributed"]["name"] == "fsdp"
    assert (manifest["distributed"]["source"], manifest["distributed"]["gradient_checkpointing"],
            manifest["distributed"]["cpu_offload"]) == (("accelerate config", True, False) if kind == "full"
                                                         else ("align.distributed", False, True))
    for n, stage in enumerate(("01-helpful", "02-harmless"), start=1):
        base = (load_file(str(model_dir / "model.safetensors")) if kind == "full" else lora_init(model_dir, n))
        if kind == "full" and n == 2:
            base = weights(tmp_path / "one", "01-helpful")  # stage 2 starts from pi_1
        assert_same_to_rounding(weights(tmp_path / "two", stage), weights(tmp_path / "one", stage), base)
    # The stage models are plain Hugging Face folders, as one process writes them.
    for stage in ("01-helpful", "02-harmless"):
        assert sorted(p.name for p in (tmp_path / "two" / "stages" / stage / "model").iterdir()) == \
            sorted(p.name for p in (tmp_path / "one" / "stages" / stage / "model").iterdir())
    assert_metrics_same_to_rounding(metrics(tmp_path / "two"), metrics(tmp_path / "one"))


# ------------------------------------------------------------------------------------------------- frozen passes
def test_the_frozen_pass_on_1_2_and_3_processes_writes_the_same_cache(tmp_path):
    """22 training and 7 eval pairs: 3 processes get 8/7/7 and 3/2/2 pairs (FSDP, so the one with fewer runs a
    padding batch to keep the collective forwards in step). Each run computes its own cache: the same files
    (same keys) with the same log-probs to rounding, every pair scored once."""
    model = make_model_dir(tmp_path / "model")
    prepared = make_prepared(tmp_path / "prepared", model, ["helpful"], n_train=22, n_eval=7, seed=3)
    args = ["align", "--dims", "helpful", "--batch-size", "6", "--max-steps", "1", "--lr", "1e-3", "--quiet",
            "--set", "frozen_batch_size=2"]
    caches = {}
    for n, how in ((1, []), (2, ["--set", "distributed=ddp"]), (3, ["--set", "distributed=fsdp"])):
        data = copy_prepared(prepared, tmp_path / f"p{n}")
        out = tmp_path / f"run{n}"
        if n == 1:
            code, text = run_cli([*args, "--data", str(data), "--out", str(out)])
            assert code == 0, text
        else:
            run(torchrun(n, *args, "--data", str(data), "--out", str(out), *how))
        caches[n] = {p.name: load_file(str(p)) for p in sorted((data / "cache" / "logps").glob("*.safetensors"))}
        stage = json.loads((out / "manifest.json").read_text())["stages"][0]
        assert stage["cost"]["frozen_pairs_scored"] == 22 + 7  # all processes together, each pair once
    assert len(caches[1]) == 2 and caches[1].keys() == caches[2].keys() == caches[3].keys()
    for name, one in caches[1].items():
        for n in (2, 3):
            for part in ("chosen", "rejected"):
                # Summed log-probs of tens of nats; a pair scored in other batch company differs by float32
                # rounding (~1e-6 relative); a pair put in the wrong place differs by whole nats.
                torch.testing.assert_close(caches[n][name][part], one[part], rtol=1e-4, atol=1e-4)
        assert one["chosen"].shape == (22,) or one["chosen"].shape == (7,)


def test_eval_scorecard_under_two_processes_equals_one_process(world, tmp_path):
    root, _, prepared = world
    run_dir = tmp_path / "run"
    code, out = run_cli(["align", "--dims", "helpful,harmless", "--lr", "1e-2", "--batch-size", "4",
                         "--max-steps", "2", "--quiet", "--data", str(copy_prepared(prepared, tmp_path / "p0")),
                         "--out", str(run_dir)])
    assert code == 0, out
    reports = {}
    for n in (1, 2):
        data = copy_prepared(prepared, tmp_path / f"e{n}")  # its own cache: every model scored here
        args = ["eval", str(run_dir), "--data", str(data), "--no-plot", "--json"]
        run(torchrun(n, *args) if n > 1 else [*SPOCTL, *args])
        reports[n] = json.loads(RunDir(run_dir).eval_report_path.read_text())
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
    done = run([*SPOCTL, *args, "--out", str(killed), "--resume"])
    text = done.stdout + done.stderr
    assert f"checkpoint {found[1]} is damaged ({victim} was changed after it was written" in text, text
    assert f"resuming from the previous checkpoint (step {int(found[0].name[5:])})" in text, text
    assert_same(weights(tmp_path / "straight", "01-helpful"), weights(killed, "01-helpful"))

    # Both damaged (one truncated, one flipped): the stage starts again from its beginning, same result.
    for n, folder in enumerate(sorted(p for p in (both / "stages/01-helpful/checkpoints").iterdir())):
        target = next((folder / "state").glob("*.safetensors"))
        raw = target.read_bytes()
        target.write_bytes(raw[: len(raw) // 2] if n == 0 else raw[:-1] + bytes([raw[-1] ^ 1]))
    done = run([*SPOCTL, *args, "--out", str(both), "--resume"])
    text = done.stdout + done.stderr
    assert text.count("is damaged") == 2 and "the stage starts again from its beginning" in text, text
    assert_same(weights(tmp_path / "straight", "01-helpful"), weights(both, "01-helpful"))


# ------------------------------------------------------------------------------------------------- two nodes
def test_two_rendezvous_nodes_on_one_machine(world, tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous on 127.0.0.1), one process each, FSDP: each "node" reads
    its own copy of the prepared data at its own path and has its own home and temporary folder; the run
    directory is shared. Only the global main process writes (the frozen-pass cache appears on one node only),
    and the result is the one-process result to rounding."""
    root, model_dir, prepared = world
    code, out = run_cli(["align", "--dims", "helpful,harmless", *ROUNDING_RUN, "--quiet", "--data",
                         str(copy_prepared(prepared, tmp_path / "p1")), "--out", str(tmp_path / "one")])
    assert code == 0, out
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
    assert_same_to_rounding(weights(tmp_path / "two", "02-harmless"), weights(tmp_path / "one", "02-harmless"),
                            load_file(str(model_dir / "model.safetensors")))
