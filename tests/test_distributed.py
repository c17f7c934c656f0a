"""Several processes, the parts that need none: how pairs are shared out, which strategy a configuration and a
launcher's accelerate config resolve to (and which combinations are refused), the shipped accelerate configs, and
within-stage checkpoints that are verified when read back (a flipped bit or a truncated file is never trained on).
The runs with real processes are in test_distributed_runs.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from spoctl.config import AlignConfig, resolve_config
from spoctl.engine.checkpoint import intact_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from spoctl.engine.distributed import Processes, Strategy, resolve_strategy
from spoctl.engine.frozen import balanced_shards
from spoctl.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"


# ------------------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("n,world", [(0, 2), (1, 3), (7, 3), (22, 3), (24, 2), (31, 4), (5, 8)])
def test_shards_are_disjoint_complete_and_balanced(n, world):
    rng = random.Random(n * 31 + world)
    lengths = [rng.randint(3, 200) for _ in range(n)]
    shards = balanced_shards(lengths, world)
    assert len(shards) == world
    assert sorted(i for s in shards for i in s) == list(range(n))  # every pair once
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(s == sorted(s) for s in shards)
    # Longest first to the lightest shard: no shard carries more than the lightest plus one longest pair (LPT).
    loads = [sum(lengths[i] for i in s) for s in shards]
    if n:
        assert max(loads) - min(loads) <= max(lengths)


def test_one_process_scores_every_pair_in_order():
    assert balanced_shards([5, 1, 9], 1) == [[0, 1, 2]]


# ------------------------------------------------------------------------------------------------- strategy
def cfg(**values) -> AlignConfig:
    return resolve_config(AlignConfig, "align", set_items=[f"{k}={json.dumps(v)}" for k, v in values.items()])


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "false",
            "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_ACTIVATION_CHECKPOINTING": "false",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}


def test_default_is_ddp_and_fsdp_is_chosen_by_the_setting():
    assert resolve_strategy(cfg(), {}) == Strategy("ddp", source="default")
    s = resolve_strategy(cfg(distributed="fsdp", fsdp={"cpu_offload": True, "wrap": ["LlamaDecoderLayer"]},
                             gradient_checkpointing=True), {})
    assert (s.name, s.cpu_offload, s.wrap, s.gradient_checkpointing, s.source) == \
        ("fsdp", True, ("LlamaDecoderLayer",), True, "align.distributed")


def test_an_accelerate_fsdp_config_selects_fsdp_with_its_settings():
    env = {**FSDP_ENV, "FSDP_OFFLOAD_PARAMS": "true", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
           "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    s = resolve_strategy(cfg(), env)
    assert (s.name, s.cpu_offload, s.wrap, s.gradient_checkpointing, s.source) == \
        ("fsdp", True, ("LlamaDecoderLayer",), True, "accelerate config")
    # Settings the accelerate config leaves at their defaults do not contradict spoctl's own.
    assert resolve_strategy(cfg(distributed="fsdp", gradient_checkpointing=True), FSDP_ENV).gradient_checkpointing


def test_what_the_launcher_decided_becomes_the_runs_configuration():
    import yaml

    from spoctl.config import dump_config, validate

    env = {**FSDP_ENV, "FSDP_ACTIVATION_CHECKPOINTING": "true", "FSDP_OFFLOAD_PARAMS": "true"}
    strategy = resolve_strategy(cfg(), env)
    applied = strategy.applied_to(cfg())
    assert (applied.distributed, applied.gradient_checkpointing, applied.fsdp.cpu_offload) == ("fsdp", True, True)
    # The run's config.yaml, used again under the same accelerate config, contradicts nothing.
    again = validate(AlignConfig, yaml.safe_load(dump_config(applied, "align"))["align"], "align")
    assert resolve_strategy(again, env) == strategy


@pytest.mark.parametrize("settings,env,names", [
    ({"distributed": "ddp"}, FSDP_ENV, ["align.distributed is ddp", "distributed_type: FSDP"]),
    ({"fsdp": {"cpu_offload": False}}, {**FSDP_ENV, "FSDP_OFFLOAD_PARAMS": "true"},
     ["align.fsdp.cpu_offload is false", "fsdp_offload_params: true"]),
    ({"gradient_checkpointing": False}, {**FSDP_ENV, "FSDP_ACTIVATION_CHECKPOINTING": "true"},
     ["align.gradient_checkpointing is false", "fsdp_activation_checkpointing: true"]),
    ({"fsdp": {"wrap": ["MistralDecoderLayer"]}}, {**FSDP_ENV, "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"},
     ["align.fsdp.wrap", "fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer"]),
])
def test_a_setting_that_contradicts_the_launchers_config_is_an_error_naming_both(settings, env, names):
    with pytest.raises(UsageError) as err:
        resolve_strategy(cfg(**settings), env)
    for name in names:
        assert name in str(err.value), str(err.value)


@pytest.mark.parametrize("settings,env,says", [
    ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, ["DeepSpeed", "configs/accelerate/fsdp2.yaml", "distributed=fsdp"]),
    ({}, {**FSDP_ENV, "FSDP_VERSION": "1"}, ["FSDP version 1", "fsdp_version: 2"]),
    ({}, {**FSDP_ENV, "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, ["TRANSFORMER_BASED_WRAP"]),
    ({"distributed": "fsdp", "precision": "fp16"}, {}, ["fp16", "bf16"]),
    ({"distributed": "fsdp", "lora": {"enabled": True}, "quantize": "4bit"}, {}, ["QLoRA", "FSDP"]),
])
def test_what_is_not_supported_is_refused_with_what_to_do(settings, env, says):
    with pytest.raises(UsageError) as err:
        resolve_strategy(cfg(**settings), env)
    for text in says:
        assert text in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------------------- accelerate configs
def launcher_environment(config: Path) -> tuple[dict[str, str], object]:
    """The environment `accelerate launch --config_file CONFIG` gives its processes, from accelerate's own code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args), args


@pytest.mark.parametrize("name,strategy,offload,machines", [
    ("ddp", "ddp", False, 1), ("fsdp2", "fsdp", False, 1), ("fsdp2-offload", "fsdp", True, 1),
    ("multi-node", "fsdp", False, 2)])
def test_each_shipped_accelerate_config_loads_and_resolves_as_documented(name, strategy, offload, machines):
    env, args = launcher_environment(CONFIGS / f"{name}.yaml")
    s = resolve_strategy(cfg(), env)
    assert (s.name, s.cpu_offload, args.num_machines) == (strategy, offload, machines)
    assert s.source == ("accelerate config" if strategy == "fsdp" else "default")
    header = (CONFIGS / f"{name}.yaml").read_text().split("\ncompute_environment")[0]
    assert f"--config_file configs/accelerate/{name}.yaml" in header  # the command that runs it, as torchtune's do


def test_every_config_in_the_folder_is_tested():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == ["ddp", "fsdp2", "fsdp2-offload", "multi-node"]


# ------------------------------------------------------------------------------------------------- checkpoints
def _training_state(seed: int):
    from transformers import get_scheduler

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    model[2].bias.requires_grad_(False)  # frozen: not in the checkpoint
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=10)
    return model, opt, sched


def _step(model, opt, sched) -> None:
    model(torch.randn(4, 8)).square().sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_a_checkpoint_restores_weights_optimizer_schedule_and_rng_exactly(tmp_path):
    model, opt, sched = _training_state(0)
    for _ in range(3):
        _step(model, opt, sched)
    save_checkpoint(tmp_path / "step-000003", procs=Processes(), scorer=model, optimizer=opt, scheduler=sched,
                    meta={"step": 3})
    _step(model, opt, sched)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    other, opt2, sched2 = _training_state(1)  # different weights, fresh optimizer and schedule, other RNG
    with torch.no_grad():
        other[2].bias.copy_(model[2].bias)  # frozen parameters come from the model, not the checkpoint
    meta = load_checkpoint(tmp_path / "step-000003", procs=Processes(), scorer=other, optimizer=opt2, scheduler=sched2)
    assert meta["step"] == 3 and meta["processes"] == 1
    _step(other, opt2, sched2)
    for k, v in other.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert not list((tmp_path / "step-000003").rglob("*.pt")), "nothing pickled"


def test_the_shares_two_processes_write_resume_on_one(tmp_path):
    """DDP: each process writes its share of the replicated state (whole tensors, balanced by bytes) in a file of
    its own; DCP's reader puts them together on another process count, here one, exactly."""
    from safetensors.torch import load_file

    from spoctl.engine.checkpoint import _flat_state, _write_share

    model, opt, sched = _training_state(0)
    for _ in range(2):
        _step(model, opt, sched)
    folder = tmp_path / "step-000002"
    save_checkpoint(folder, procs=Processes(), scorer=model, optimizer=opt, scheduler=sched, meta={"step": 2})
    for one in (folder / "state").glob("*.safetensors"):  # as the two processes of a DDP run write it
        one.unlink()
    flat, _ = _flat_state(model, opt)
    for rank in (0, 1):
        _write_share(flat, folder / "state", Processes(rank, 2))
    shares = [load_file(str(f)) for f in sorted((folder / "state").glob("*.safetensors"))]
    assert len(shares) == 2 and not set(shares[0]) & set(shares[1]) and set(shares[0]) | set(shares[1]) == set(flat)
    _step(model, opt, sched)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    other, opt2, sched2 = _training_state(1)
    with torch.no_grad():
        other[2].bias.copy_(model[2].bias)
    load_checkpoint(folder, procs=Processes(), scorer=other, optimizer=opt2, scheduler=sched2)
    _step(other, opt2, sched2)
    for k, v in other.state_dict().items():
        assert torch.equal(v, want[k]), k


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flip":
        raw[-5] ^= 0x01
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("victim", ["state/*.safetensors", "rng/*.safetensors", "trainer_state.json",
                                    "checksums.json"])
def test_a_damaged_checkpoint_is_named_and_the_previous_intact_one_is_used(tmp_path, how, victim):
    model, opt, sched = _training_state(0)
    for step in (1, 2):
        _step(model, opt, sched)
        save_checkpoint(tmp_path / f"step-00000{step}", procs=Processes(), scorer=model, optimizer=opt,
                        scheduler=sched, meta={"step": step})
    newest = tmp_path / "step-000002"
    assert verify_checkpoint(newest, Processes()) == []
    target = next(newest.glob(victim))
    _damage(target, how)
    problems = verify_checkpoint(newest, Processes())
    assert problems and (str(target) in problems[0] or victim == "checksums.json"), problems

    warnings: list[str] = []
    found = intact_checkpoint(lambda: sorted(((int(p.name[5:]), p) for p in tmp_path.iterdir()), reverse=True),
                              Processes(), warnings.append)
    assert found == (1, tmp_path / "step-000001")
    assert len(warnings) == 1 and str(newest) in warnings[0] and "previous checkpoint (step 1)" in warnings[0]
    assert not newest.exists()  # a damaged checkpoint can never be resumed from


def test_with_no_intact_checkpoint_the_stage_starts_from_its_beginning(tmp_path):
    model, opt, sched = _training_state(0)
    save_checkpoint(tmp_path / "step-000001", procs=Processes(), scorer=model, optimizer=opt, scheduler=sched,
                    meta={"step": 1})
    _damage(next((tmp_path / "step-000001").glob("state/*.safetensors")), "truncate")
    warnings: list[str] = []
    assert intact_checkpoint(lambda: [(1, tmp_path / "step-000001")], Processes(), warnings.append) is None
    assert "starts again from its beginning" in warnings[0]


def test_a_checkpoint_of_an_earlier_spoctl_is_not_resumed_from(tmp_path):
    old = tmp_path / "step-000004"
    old.mkdir()
    (old / "trainable.safetensors").write_bytes(b"x")
    (old / "optimizer_rng.pt").write_bytes(b"x")
    warnings: list[str] = []
    assert intact_checkpoint(lambda: [(4, old)], Processes(), warnings.append) is None
    assert "checksums.json is missing" in warnings[0]


def test_share_gives_the_main_process_result_and_raises_its_errors():
    procs = Processes()
    assert procs.share(lambda: 41 + 1) == 42
    with pytest.raises(UsageError, match="bad"):
        procs.share(lambda: (_ for _ in ()).throw(UsageError("bad")))


def test_share_gives_every_rank_the_main_process_interruption_with_its_signal():
    """SIGHUP on the main process during a shared step: the other ranks raise the same Interrupted, exit 129 (they
    used to be rebuilt as SIGTERM, 143, whatever the signal was)."""
    import signal

    from spoctl.errors import Interrupted, Stopped

    sent: list = []

    class Main(Processes):
        def broadcast(self, value):
            sent.append(value)
            return value

    class Other(Processes):
        def broadcast(self, value):
            return sent[-1]

    def hangup():
        raise Stopped(signal.SIGHUP)

    with pytest.raises(Interrupted):
        Main(rank=0, world=2).share(hangup)
    with pytest.raises(Interrupted, match="SIGHUP") as other:
        Other(rank=1, world=2).share(hangup)
    assert other.value.exit_code == 129
