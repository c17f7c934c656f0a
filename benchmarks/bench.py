"""spoctl's SPO stage against TRL's DPOTrainer on the same model, data and batch, interleaved.

    python benchmarks/bench.py                 # CPU: a small random-init Qwen2 (~16M parameters), 3 rounds
    python benchmarks/bench.py --repeats 5 --out benchmarks/results/cpu-small.json
    python benchmarks/bench.py --shape qwen2-1.5b --device cuda   # the GPU shapes of the issue

The sides run in rounds, A B C A B C ..., each run in a fresh subprocess (so peak memory is its own and no side
inherits another's warm caches), and each prints one JSON line. A machine shared with other work changes speed
from minute to minute; interleaving exposes both sides to the same stretches of it, and the ratio is taken per
round (round i: A_i / B_i), so a slow minute lowers both figures of a round rather than one side's only. The table
gives each figure's median over the rounds with its min-max spread, and the median of the per-round ratios. Beside
them: the 1-minute load average before and after every run, the CPU time other processes used during it (from
/proc/stat, Linux) and the CPU count, all also in the JSON (`--out`).

Real tokens are the non-padding tokens of prompt+chosen and prompt+rejected. The spoctl side is a stage-2 SPO
stage (two frozen models, precomputed) and also reports the frozen pass's own throughput; TRL has no SPO, so it
runs DPO with a precomputed reference (its fastest setting) and with a reference forward every step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    "cpu-small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=16000),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936),
}


def make_rows(vocab: int, n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """Prompts and responses of uniformly drawn lengths, as space-separated word tokens (w<id>)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, c, r = (rng.randint(lo, hi) for _ in range(3))
        w = lambda k: " ".join(f"w{rng.randrange(1, vocab - 2)}" for _ in range(k))  # noqa: E731
        rows.append({"prompt": w(p) + " ", "chosen": w(c), "rejected": w(r)})
    return rows


def real_tokens(row: dict) -> int:
    """prompt twice, both completions, and the end token each completion gets."""
    return 2 * len(row["prompt"].split()) + len(row["chosen"].split()) + len(row["rejected"].split()) + 2


def make_model(shape: str, device: str, dtype_name: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype_name))
    return model, sum(p.numel() for p in model.parameters())


# Model FLOPs per real token, as ../shared/bench counts them: 6 x params for the trained policy (forward and
# backward), 2 x params for each frozen forward done during the step (none when the reference is precomputed).
FLOPS_PER_TOKEN = {"spoctl-spo-stage": 6, "trl-dpo-precomputed-ref": 6, "trl-dpo": 8}


def matmul_peak_tflops(dtype_name: str) -> float:
    """The card's measured dense matmul rate in this dtype (the denominator of "share of peak")."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * reps / (time.perf_counter() - t0) / 1e12


def peak_memory_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def steady_step_seconds(times: list[float], a: argparse.Namespace) -> float:
    """Median step time after the warm-up steps; a clear error when no step is left to time."""
    if len(times) <= a.warmup:
        raise SystemExit(f"only {len(times)} step(s) ran, none after --warmup {a.warmup}: raise --steps, or --pairs "
                         f"(one epoch of --pairs {a.pairs} at --batch {a.batch} is {a.pairs // a.batch} step(s))")
    return statistics.median(times[a.warmup:])


def side_spoctl(a: argparse.Namespace) -> dict:
    import torch
    from accelerate import Accelerator

    from spoctl import losses
    from spoctl.config import AlignConfig
    from spoctl.engine.batching import TokenPair
    from spoctl.engine.frozen import compute_logps
    from spoctl.engine.plan import StagePlan
    from spoctl.engine.train import StageData, StageHooks, train_stage

    vocab = SHAPES[a.shape]["vocab_size"]
    rows = make_rows(vocab, a.pairs, a.min_len, a.max_len)
    eos = vocab - 2
    ids = lambda s: [int(w[1:]) for w in s.split()]  # noqa: E731
    pairs = [TokenPair(ids(r["prompt"]), ids(r["chosen"]) + [eos], ids(r["rejected"]) + [eos]) for r in rows]
    tokens_per_pair = statistics.mean(real_tokens(r) for r in rows)
    precision = "bf16" if a.dtype == "bfloat16" else "no"
    acc = Accelerator(mixed_precision="no", cpu=a.device == "cpu")
    model, n_params = make_model(a.shape, a.device, a.dtype)
    cfg = AlignConfig(batch_size=a.batch, micro_batch_size=a.micro or a.batch, frozen_batch_size=a.frozen_batch,
                      learning_rate=1e-6, warmup_ratio=0.0, save_every=0, log_every=10**9, layout=a.layout,
                      compile=a.compile, gradient_checkpointing=a.grad_ckpt,
                      logprob_chunk=a.chunk, precision="fp32" if precision == "no" else "bf16")

    # Two frozen passes (pi_{n-1} and pi_{n-2}); a random-init model stands in for both, the cost is the same.
    model.eval()
    if a.compile:
        # Compiled once here; the frozen-pass figure then includes compiling (as a real frozen pass would).
        from spoctl.engine.logprobs import compile_backbone

        compile_backbone(model)
    t0 = time.perf_counter()
    ref = compute_logps(model, pairs, batch_size=a.frozen_batch, pad_token_id=vocab - 1, chunk_size=a.chunk,
                        device=acc.device, layout=a.layout)
    prev2 = compute_logps(model, pairs, batch_size=a.frozen_batch, pad_token_id=vocab - 1, chunk_size=a.chunk,
                          device=acc.device, layout=a.layout)
    if a.device == "cuda":
        torch.cuda.synchronize()
    frozen_s = time.perf_counter() - t0
    offset = losses.spo_offset_previous(0.5, 0.1, ref.chosen, ref.rejected, prev2.chosen, prev2.rejected)

    times: list[float] = []
    last = [time.perf_counter()]

    def progress(step: int, total: int, metrics: dict) -> None:
        if a.device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    plan = StagePlan(index=2, dim="bench", beta=0.1, mode="previous", alpha=0.5, learning_rate=1e-6,
                     batch_size=a.batch, max_steps=a.steps)
    hooks = StageHooks(log=lambda r: None, progress=progress, checkpoint_dir=lambda s: None,
                       latest_checkpoint=lambda: None)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    last[0] = time.perf_counter()
    train_stage(accelerator=acc, plan=plan, cfg=cfg, policy=model,
                data=StageData(train=pairs, ref_train=ref, offset_train=offset), pad_token_id=vocab - 1, hooks=hooks)
    step_s = steady_step_seconds(times, a)
    return {"side": "spoctl-spo-stage", "threads": torch.get_num_threads(), "params_M": round(n_params / 1e6, 1),
            "step_s": round(step_s, 4),
            "real_tok_s": round(a.batch * tokens_per_pair / step_s, 1),
            "frozen_tok_s": round(2 * len(pairs) * tokens_per_pair / frozen_s, 1),
            "peak_gib": round(peak_memory_gib(a.device), 3)}


def side_trl(a: argparse.Namespace, precompute: bool) -> dict:
    import copy

    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    vocab = SHAPES[a.shape]["vocab_size"]
    words = {f"w{i}": i for i in range(vocab - 2)} | {"</s>": vocab - 2, "<pad>": vocab - 1}
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>")
    rows = make_rows(vocab, a.pairs, a.min_len, a.max_len)
    tokens_per_pair = statistics.mean(real_tokens(r) for r in rows)
    model, n_params = make_model(a.shape, a.device, a.dtype)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    cfg = DPOConfig(output_dir="/tmp/spoctl-bench-trl", per_device_train_batch_size=a.batch, max_steps=a.steps,
                    bf16=a.dtype == "bfloat16", use_cpu=a.device == "cpu", logging_steps=10**6, report_to=[],
                    save_strategy="no", max_length=4096, learning_rate=1e-6, precompute_ref_log_probs=precompute,
                    dataloader_num_workers=0, gradient_checkpointing=False, disable_tqdm=True)
    ref = None if precompute else copy.deepcopy(model).eval().requires_grad_(False)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Timer()])
    trainer.train()
    step_s = steady_step_seconds(times, a)
    return {"side": "trl-dpo" + ("-precomputed-ref" if precompute else ""), "threads": torch.get_num_threads(),
            "params_M": round(n_params / 1e6, 1), "step_s": round(step_s, 4),
            "real_tok_s": round(a.batch * tokens_per_pair / step_s, 1), "peak_gib": round(peak_memory_gib(a.device), 3)}


# ------------------------------------------------------------------------------------------------ the driver

FIGURES = ("step_s", "real_tok_s", "frozen_tok_s", "peak_gib", "tflops", "share_of_peak")  # summarised per side
PEERS = ("trl-dpo-precomputed-ref", "trl-dpo")


def cpu_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot, all cores together (/proc/stat); None off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user, nice, system, (idle, iowait: not busy), irq, softirq, steal; guest time is already inside user.
    return (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_side(side: str, argv: list[str]) -> dict:
    """One side in a fresh subprocess: its result, and what else the machine was doing meanwhile."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--side", side]
    load_before, busy0, own0 = os.getloadavg(), cpu_busy_seconds(), children_cpu_seconds()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    busy1, own1, load_after = cpu_busy_seconds(), children_cpu_seconds(), os.getloadavg()
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"benchmark side {side!r} failed (exit code {proc.returncode})")
    # Busy CPU time on the machine minus the run's own = what other processes took, in cores on average.
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    return {"side": side, "wall_s": round(wall, 1), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in load_after],
            "others_cores": None if others is None else round(others, 2),
            "result": json.loads(line.removeprefix("RESULT "))}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict], peak: float | None) -> tuple[list[dict], list[dict]]:
    """Per side: each figure's median, and its min-max under "spread". Per (spoctl, TRL side): the per-round
    ratios of throughput and of peak memory, with their median and min-max."""
    by_side: dict[str, list[dict]] = {}
    for run in runs:
        r = run["result"]
        if peak:
            r["share_of_peak"] = round(r["tflops"] / peak, 3)
        by_side.setdefault(r["side"], []).append(r)
    results = []
    for side, rs in by_side.items():
        summary = {k: v for k, v in rs[0].items() if k not in FIGURES}
        summary["n"] = len(rs)
        summary["spread"] = {}
        for key in FIGURES:
            if key in rs[0]:
                s = spread([r[key] for r in rs])
                summary[key] = round(s["median"], 4)  # flat median: the fields scaling.py and older readers use
                summary["spread"][key] = [s["min"], s["max"]]
        results.append(summary)
    ratios = []
    ours = by_side.get("spoctl-spo-stage", [])
    for peer in PEERS:
        theirs = by_side.get(peer, [])
        if ours and theirs:
            pairs = list(zip(ours, theirs))  # round i with round i
            tput = [a["real_tok_s"] / b["real_tok_s"] for a, b in pairs]
            mem = [a["peak_gib"] / b["peak_gib"] for a, b in pairs]
            ratios.append({"of": "spoctl-spo-stage", "to": peer,
                           "throughput": {**{k: round(v, 3) for k, v in spread(tput).items()},
                                          "per_round": [round(x, 3) for x in tput]},
                           "peak_memory": {**{k: round(v, 3) for k, v in spread(mem).items()},
                                           "per_round": [round(x, 3) for x in mem]}})
    if ours:
        frozen = [r["frozen_tok_s"] / r["real_tok_s"] for r in ours]
        ratios.append({"of": "spoctl-frozen-pass", "to": "spoctl-spo-stage",
                       "throughput": {**{k: round(v, 3) for k, v in spread(frozen).items()},
                                      "per_round": [round(x, 3) for x in frozen]}})
    return results, ratios


def fmt(summary: dict, key: str, spec: str) -> str:
    lo, hi = summary["spread"][key]
    return f"{summary[key]:{spec}} ({lo:{spec}}-{hi:{spec}})"


def print_report(a: argparse.Namespace, report: dict) -> None:
    m = report["machine"]
    print(f"\n{a.shape} on {a.device} ({a.dtype}), {a.batch} pairs a step, lengths {a.min_len}-{a.max_len}; "
          f"{a.repeats} interleaved rounds; {m['cpus']} CPUs, torch threads {m['torch_threads']}")
    print("median (min-max) over the rounds")
    print(f"{'run':26} {'step s':>22} {'real tok/s':>24} {'TFLOP/s':>8} {'of peak':>8} {'peak GiB':>20}")
    for r in report["results"]:
        share = f"{r['share_of_peak']:.1%}" if "share_of_peak" in r else "-"
        print(f"{r['side']:26} {fmt(r, 'step_s', '.3f'):>22} {fmt(r, 'real_tok_s', '.0f'):>24} "
              f"{r['tflops']:8.2f} {share:>8} {fmt(r, 'peak_gib', '.2f'):>20}")
    if report["matmul_peak_tflops"]:
        print(f"measured {a.dtype} matmul peak: {report['matmul_peak_tflops']:.0f} TFLOP/s")
    for q in report["ratios"]:
        t = q["throughput"]
        if q["of"] == "spoctl-frozen-pass":
            print(f"spoctl frozen pass / its training throughput: {t['median']:.2f}x ({t['min']:.2f}-{t['max']:.2f})")
            continue
        mem = q["peak_memory"]
        print(f"spoctl / {q['to']}: throughput {t['median']:.2f}x ({t['min']:.2f}-{t['max']:.2f}), "
              f"peak memory {mem['median']:.2f}x ({mem['min']:.2f}-{mem['max']:.2f}); median of per-round ratios")
    loads = [x for run in report["runs"] for x in (run["load_before"][0], run["load_after"][0])]
    others = [run["others_cores"] for run in report["runs"] if run["others_cores"] is not None]
    print(f"machine: 1-minute load average {min(loads):.2f}-{max(loads):.2f} before/after the runs (our own run "
          f"counts in it)" + (f"; other processes used {min(others):.2f}-{max(others):.2f} of {m['cpus']} cores "
                              "during the runs" if others else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--micro", type=int, default=0, help="spoctl micro-batch (default: the whole batch)")
    p.add_argument("--frozen-batch", type=int, default=16, help="pairs per frozen-pass forward (spoctl's default: 16)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--layout", default="auto", choices=["auto", "shared-prompt", "padded", "packed"],
                   help="spoctl's batch layout (align.layout)")
    p.add_argument("--compile", action="store_true", help="spoctl: align.compile (torch.compile the backbone)")
    p.add_argument("--grad-ckpt", action="store_true", help="spoctl: align.gradient_checkpointing")
    p.add_argument("--sides", default="spoctl,trl-precomputed,trl",
                   help="which to run, comma-separated, in this order within each round")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds: each side runs once per round, interleaved, each time in a fresh process")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of every side (OMP_NUM_THREADS); default: torch's own (one per core)")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    if a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup}): only the steps after the warm-up are timed")
    unknown = sorted(set(a.sides.split(",")) - {"spoctl", "trl-precomputed", "trl"})
    if unknown:
        p.error(f"--sides: unknown side(s) {', '.join(unknown)}; choose from spoctl, trl-precomputed, trl")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")

    if a.side:
        if a.side == "peak":
            result = {"matmul_peak_tflops": round(matmul_peak_tflops(a.dtype), 1)}
        else:
            result = side_spoctl(a) if a.side == "spoctl" else side_trl(a, precompute=a.side == "trl-precomputed")
            result["tflops"] = round(FLOPS_PER_TOKEN[result["side"]] * result["params_M"] * 1e6 * result["real_tok_s"]
                                     / 1e12, 2)
        print("RESULT " + json.dumps(result), flush=True)
        return

    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by every side's subprocess
    sides = a.sides.split(",")
    argv = sys.argv[1:]
    started = time.strftime("%Y-%m-%d %H:%M")
    runs = []
    for rnd in range(a.repeats):
        for side in sides:
            run = run_side(side, argv)
            run["round"] = rnd
            runs.append(run)
            r = run["result"]
            print(f"[round {rnd + 1}/{a.repeats}] {r['side']}: {r['real_tok_s']:.0f} tok/s, step {r['step_s']:.3f} s, "
                  f"{r['peak_gib']:.2f} GiB; {run['wall_s']} s, load {run['load_before'][0]:.2f} -> "
                  f"{run['load_after'][0]:.2f}, others {run['others_cores']} cores", flush=True)
    peak = run_side("peak", argv)["result"]["matmul_peak_tflops"] if a.device == "cuda" else None
    results, ratios = summarise(runs, peak)
    report = {
        "args": {k: v for k, v in vars(a).items() if k not in ("side", "out")},
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(),
                    "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "torch_threads": runs[0]["result"]["threads"], "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "platform": platform.platform(), "python": platform.python_version()},
        "matmul_peak_tflops": peak,
        "results": results,
        "ratios": ratios,
        "runs": runs,
    }
    print_report(a, report)
    if a.out:
        from spoctl.fsutil import write_json_atomic

        write_json_atomic(a.out, report)


if __name__ == "__main__":
    main()
