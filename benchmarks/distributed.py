"""spoctl's two strategies, DDP and FSDP2, over 1, 2 and 4 processes (CPU, gloo): memory per process and the
frozen pass's wall time. Every figure comes from real processes under torchrun running the engine's own code
(`train_stage`, `Distributed`, `score_pairs`) on a random-init Llama of ~112M parameters.

    python benchmarks/distributed.py --out benchmarks/results/distributed-cpu.json   # both parts
    python benchmarks/distributed.py --part memory --procs 1 2 4
    python benchmarks/distributed.py --part frozen --repeats 5
    python benchmarks/distributed.py --quick        # a smoke test of both parts on a tiny model

Part `memory`: a few training steps (full fine-tuning, AdamW) per (strategy, process count). Right before each
optimizer step -- when parameters, gradients and optimizer state all exist -- every process adds up the bytes of
its own parameters, gradients and optimizer state (its shards under FSDP); the figure is the largest process's,
at the last step. Beside it: the process's peak resident memory (VmHWM) above what it used before the model was
built, which also counts activations, FSDP's gathered blocks and unsharded gradients, DDP's gradient buckets and
the optimizer's temporaries (glibc set to give freed tensor memory back at once, so the peak is what was live).

Part `frozen`: one frozen log-prob pass over the same pairs by 1 process with 2 threads, and by 2 processes with
1 thread each (DDP: each holds the model and scores half the pairs; FSDP: the model sharded, every forward
collective), the same total thread count. The configurations are interleaved (A B C A B C ...) and repeated;
the median and the spread (min-max) are reported with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # ~112M parameters (untied 32k embeddings and head, 10 blocks), and a tiny one for --quick
    "llama-112m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                       num_attention_heads=12, num_key_value_heads=4),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_average() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------------------------- workers
def proc_status(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def make_pairs(vocab: int, n: int, lo: int, hi: int, seed: int = 0):
    import torch

    from spoctl.engine.batching import TokenPair

    g = torch.Generator().manual_seed(seed)

    def seq(a: int, b: int) -> list[int]:
        return torch.randint(0, vocab - 2, (int(torch.randint(a, b + 1, (1,), generator=g)),), generator=g).tolist()

    return [TokenPair(seq(lo // 2, hi // 2), seq(lo // 2, hi // 2) + [vocab - 2], seq(lo // 2, hi // 2) + [vocab - 2])
            for _ in range(n)]


def build_model(shape: str, dist):
    """The main process builds the model (seeded); under FSDP the others build it on the meta device and receive
    their shards, as the engine loads a model."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=1024, tie_word_embeddings=False)
    if dist.loads_on_main_only and not dist.procs.main:
        with init_empty_weights():
            model = LlamaForCausalLM(cfg)
        return model
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def worker(a: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator

    from spoctl.engine.distributed import Distributed, Strategy

    torch.set_num_threads(a.threads)
    accelerator = Accelerator(cpu=True)
    dist = Distributed(accelerator, Strategy(a.strategy), "fp32")
    baseline = proc_status("VmRSS")
    result = {"strategy": a.strategy, "processes": dist.procs.world, "threads": a.threads, "rank": dist.procs.rank}
    if a.part == "memory":
        result.update(memory_worker(a, dist))
    else:
        result.update(frozen_worker(a, dist))
    result["peak_rss_above_baseline"] = proc_status("VmHWM") - baseline
    Path(a.result).with_suffix(f".{dist.procs.rank}.json").write_text(json.dumps(result))
    dist.close()
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def memory_worker(a: argparse.Namespace, dist) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from spoctl.config import AlignConfig
    from spoctl.engine.frozen import FrozenLogps
    from spoctl.engine.plan import StagePlan
    from spoctl.engine.train import StageData, StageHooks, train_stage

    model = build_model(a.shape, dist)
    n_params = dist.procs.broadcast(sum(p.numel() for p in model.parameters()) if dist.procs.main else None)
    pairs = make_pairs(SHAPES[a.shape]["vocab_size"], a.batch * a.steps, a.min_len, a.max_len)
    seen: list[dict] = []

    def before_step(optimizer, args, kwargs) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        seen.append({"params": sum(local_bytes(p) for p in params),
                     "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
                     "optimizer": sum(local_bytes(t) for t in state)})

    hook = register_optimizer_step_pre_hook(before_step)  # every optimizer: train_stage makes its own
    cfg = AlignConfig(batch_size=a.batch, micro_batch_size=a.micro, learning_rate=1e-5, warmup_ratio=0.0,
                      save_every=0, eval_every=0, log_every=10**9, max_grad_norm=1.0)
    plan = StagePlan(index=1, dim="bench", beta=0.1, mode="previous", alpha=0.0, learning_rate=1e-5,
                     batch_size=a.batch, max_steps=a.steps)
    zeros = torch.zeros(len(pairs))
    # A reference far below the policy: random-init log-probs (~log(vocab) nats a token) would trip the divergence
    # guard against a reference of 0; the loss only sees the difference of the two responses' references.
    ref = torch.full((len(pairs),), -1e6)
    hooks = StageHooks(log=lambda r: None, progress=lambda *x: None, checkpoint_dir=lambda s: None,
                       latest_checkpoint=lambda: None)
    started = time.perf_counter()
    train_stage(accelerator=dist.accelerator, plan=plan, cfg=cfg, policy=model,
                data=StageData(train=pairs, ref_train=FrozenLogps(ref, ref), offset_train=zeros),
                pad_token_id=0, hooks=hooks, dist=dist)
    hook.remove()
    last = seen[-1]
    return {"params_total": n_params, "state_bytes": sum(last.values()), **{f"{k}_bytes": v for k, v in last.items()},
            "train_seconds": round(time.perf_counter() - started, 2)}


def frozen_worker(a: argparse.Namespace, dist) -> dict:
    from spoctl.engine.frozen import score_pairs

    model = build_model(a.shape, dist)
    model.eval()
    scorer = dist.prepare_frozen(model, chunk_size=256)
    pairs = make_pairs(SHAPES[a.shape]["vocab_size"], a.pairs, a.min_len, a.max_len, seed=1)
    dist.procs.barrier()
    started = time.perf_counter()
    score_pairs(scorer, pairs, batch_size=a.frozen_batch, pad_token_id=0, device=dist.accelerator.device,
                procs=dist.procs, collective=dist.collective_forward)
    dist.procs.barrier()
    return {"frozen_seconds": time.perf_counter() - started, "pairs": len(pairs)}


# ----------------------------------------------------------------------------------------------- driver
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(a: argparse.Namespace, part: str, strategy: str, procs: int, threads: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
               str(free_port()), str(Path(__file__).resolve()), "--worker", "--part", part, "--strategy", strategy,
               "--threads", str(threads), "--result", str(result), "--shape", a.shape, "--steps", str(a.steps),
               "--batch", str(a.batch), "--micro", str(a.micro), "--pairs", str(a.pairs),
               "--frozen-batch", str(a.frozen_batch), "--min-len", str(a.min_len), "--max-len", str(a.max_len)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
        if part == "memory":
            # glibc keeps freed memory for reuse, so a process's resident high-water mark piles up whatever it
            # ever freed (earlier runs here: the same DDP step peaked 2.5-2.7 GiB above its start for 1.7 GiB of
            # model state). Served by mmap, every tensor's memory goes back to the system when freed, and the
            # peak resident memory is the peak of what was live at once.
            env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-8000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("result.*.json"))]


def part_memory(a: argparse.Namespace) -> list[dict]:
    rows = []
    for procs in a.procs:
        for strategy in ("ddp", "fsdp"):
            load = load_average()
            ranks = launch(a, "memory", strategy, procs, threads=1)
            worst = max(ranks, key=lambda r: r["state_bytes"])
            row = {"strategy": strategy, "processes": procs, "params_M": round(worst["params_total"] / 1e6, 1),
                   "state_MiB": round(worst["state_bytes"] / 2**20, 1),
                   **{k: round(worst[f"{k}_bytes"] / 2**20, 1) for k in ("params", "grads", "optimizer")},
                   "peak_rss_above_baseline_MiB": round(max(r["peak_rss_above_baseline"] for r in ranks) / 2**20, 1),
                   # Under FSDP only the first process reads the weights: the others' peak shows what that saves.
                   "peak_rss_other_processes_MiB": (round(max(r["peak_rss_above_baseline"] for r in ranks[1:]) / 2**20, 1)
                                                    if len(ranks) > 1 else None),
                   "train_seconds": worst["train_seconds"], "load_average": round(load, 2)}
            log(json.dumps(row))
            rows.append(row)
    by = {(r["strategy"], r["processes"]): r for r in rows}
    for r in rows:
        ddp = by.get(("ddp", r["processes"]))
        if ddp:
            r["state_vs_ddp"] = round(r["state_MiB"] / ddp["state_MiB"], 3)
            r["peak_rss_vs_ddp"] = round(r["peak_rss_above_baseline_MiB"] / ddp["peak_rss_above_baseline_MiB"], 3)
    return rows


def part_frozen(a: argparse.Namespace) -> dict:
    # The comparison asked for is at the same total thread count (1 x 2 against 2 x 1); one process with one
    # thread is measured beside it because two OpenMP threads on a busy machine can cost more than they bring.
    configs = [("1 process x 2 threads", "ddp", 1, 2), ("2 DDP processes x 1 thread", "ddp", 2, 1),
               ("2 FSDP processes x 1 thread", "fsdp", 2, 1), ("1 process x 1 thread", "ddp", 1, 1)]
    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    loads: list[float] = []
    for rep in range(a.repeats):
        for name, strategy, procs, threads in configs:  # interleaved: A B C A B C ...
            loads.append(load_average())
            ranks = launch(a, "frozen", strategy, procs, threads)
            times[name].append(max(r["frozen_seconds"] for r in ranks))
            log(f"repeat {rep + 1}: {name}: {times[name][-1]:.2f}s (load {loads[-1]:.2f})")
    out = {"pairs": a.pairs, "lengths": [a.min_len, a.max_len], "frozen_batch": a.frozen_batch,
           "load_average": {"min": min(loads), "max": max(loads)}, "configs": {}}
    base = statistics.median(times[configs[0][0]])
    for name, _, _, _ in configs:
        med = statistics.median(times[name])
        out["configs"][name] = {"median_s": round(med, 2), "min_s": round(min(times[name]), 2),
                                "max_s": round(max(times[name]), 2), "speedup_vs_1_process": round(base / med, 2),
                                "runs": [round(t, 2) for t in times[name]]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["memory", "frozen", "both"], default="both")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-112m")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (all processes)")
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--pairs", type=int, default=48, help="pairs in the frozen pass")
    p.add_argument("--frozen-batch", type=int, default=8)
    p.add_argument("--min-len", type=int, default=48)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--quick", action="store_true", help="tiny model, 1 repeat: checks the script end to end")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    if a.quick:
        a.shape, a.repeats, a.pairs = "tiny", 1, 16
    report = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": round(load_average(), 2)},
              "shape": a.shape, "settings": {k: getattr(a, k) for k in ("steps", "batch", "micro", "pairs",
                                                                          "frozen_batch", "min_len", "max_len")}}
    if a.part in ("memory", "both"):
        report["memory"] = part_memory(a)
    if a.part in ("frozen", "both"):
        report["frozen"] = part_frozen(a)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
