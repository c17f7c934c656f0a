"""How an SPO stage's cost grows with the number of earlier dimensions and with sequence length (CPU).

    python benchmarks/scaling.py                       # both parts, about 4 minutes on 2 cores
    python benchmarks/scaling.py --quick               # a smoke test of both parts, under 2 minutes
    python benchmarks/scaling.py --out benchmarks/results/scaling-cpu.json

Part `dims`: one `spoctl align` run of 4 dimensions per setting (`previous` mode, `all` mode, and alpha = 0, i.e.
sequential DPO, as the baseline) on a random-init Llama saved as a local folder and prepared data built like
tests/tinyworld.py builds it. Each stage's `cost` is read from the run's manifest and set beside the analytic count
from the method (docs/method.md §6): stage n needs min(n, 2) frozen models on its data in `previous` mode and
n in `all` mode, so a run scores 2N-1 vs N(N+1)/2 passes over training data. The engine runs each frozen model
once, at the first stage that needs it, over everything later stages need from it too; the expected pairs per
stage follow that schedule and must equal the measured ones exactly (the script fails if not). Frozen seconds
include loading the frozen model; training seconds include the stage-end evaluation.

Part `length`: benchmarks/bench.py's spoctl side (a stage-2 SPO stage) at a few length ranges, each in its own
process: training tok/s, step seconds, frozen-pass tok/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # building the data: keep stderr readable
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
DIMS = ["a", "b", "c", "d"]
# (name, mode, alpha): the two SPO modes and the sequential-DPO baseline (alpha = 0 needs pi_{n-1} only).
RUNS = [("previous", "previous", 0.5), ("all", "all", 0.5), ("seq-dpo", "previous", 0.0)]
SETTINGS = {  # full: timings that mean something; quick: checks the script and the counts end to end
    "full": dict(hidden=512, layers=6, n_train=320, n_eval=32,
                 lengths=[(16, 64), (64, 256), (128, 512)], bench=["--pairs", "32", "--steps", "6", "--warmup", "2"]),
    "quick": dict(hidden=64, layers=2, n_train=32, n_eval=8,
                  lengths=[(16, 32), (32, 64)], bench=["--pairs", "16", "--steps", "3", "--warmup", "1"]),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- part dims

def stage_needs(mode: str, alpha: float, n: int, dims: list[str]) -> set[tuple[int, str, str]]:
    """(model k, dim, split) whose frozen log-probs stage n uses, from the method, not from the engine's code:
    pi_{n-1} (reference) and the offset's models on D_n, and pi_0 on every eval split (the forgetting view)."""
    if mode == "all":
        models = range(n)
    elif alpha and n >= 2:
        models = [n - 1, n - 2]
    else:
        models = [n - 1]
    need = {(k, dims[n - 1], s) for k in models for s in ("train", "eval")}
    return need | {(0, d, "eval") for d in dims}


def expected_schedule(mode: str, alpha: float, dims: list[str]) -> list[dict]:
    """Pairs scored at each stage when each frozen model runs once, at the first stage that needs it, over all
    that it serves at this and later stages. Counts are in units of splits (train, eval) to scale later."""
    needs = [stage_needs(mode, alpha, n, dims) for n in range(1, len(dims) + 1)]
    done: set[tuple[int, str, str]] = set()
    rows = []
    for n in range(1, len(dims) + 1):
        models = {k for k, _, _ in needs[n - 1]}
        new = {r for later in needs[n - 1:] for r in later if r[0] in models} - done
        done |= new
        rows.append({"needed_train_passes": sum(1 for _, _, s in needs[n - 1] if s == "train"),
                     "train_splits": sum(1 for _, _, s in new if s == "train"),
                     "eval_splits": sum(1 for _, _, s in new if s == "eval")})
    return rows


def build_world(work: Path, s: dict) -> tuple[Path, Path, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    import tinyworld
    from safetensors.torch import load_file

    model = tinyworld.make_model_dir(work / "model", hidden=s["hidden"], layers=s["layers"])
    params = sum(w.numel() for w in load_file(str(model / "model.safetensors")).values())
    prepared = tinyworld.make_prepared(work / "prepared", model, DIMS, n_train=s["n_train"], n_eval=s["n_eval"])
    return model, prepared, params / 1e6


def run_dims(work: Path, s: dict) -> dict:
    model, prepared, params_m = build_world(work, s)
    log(f"dims: {params_m:.1f}M-parameter Llama, {len(DIMS)} dimensions x "
        f"{s['n_train']} train + {s['n_eval']} eval pairs")
    runs = []
    for name, mode, alpha in RUNS:
        # The log-prob cache is keyed by model fingerprint, and pi_0, pi_1 and pi_2 come out bit-identical in the
        # previous and all runs: a cache left by one run would serve the next and hide its passes.
        shutil.rmtree(prepared / "cache", ignore_errors=True)
        out = work / f"run-{name}"
        cmd = [sys.executable, "-m", "spoctl", "align", "--dims", ",".join(DIMS), "--data", str(prepared),
               "--model", str(model), "--out", str(out), "--mode", mode, "--alpha", str(alpha), "--full", "-q",
               # No mid-stage checkpoints (their I/O would count as training); frozen batch 8 is the faster one on
               # CPU (benchmarks/README.md).
               "--set", "save_every=0", "--set", "frozen_batch_size=8"]
        if mode == "all":
            cmd += [a for d in DIMS[:-1] for a in ("--weight", f"{d}=0.5")]
        log(f"dims: run {name} ...")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode:
            log(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"align run {name!r} failed")
        manifest = json.loads((out / "manifest.json").read_text())
        stages = []
        for st, exp in zip(manifest["stages"], expected_schedule(mode, alpha, DIMS)):
            expected = exp["train_splits"] * s["n_train"] + exp["eval_splits"] * s["n_eval"]
            stages.append({"stage": st["index"], "dim": st["dim"], **exp, "expected_pairs": expected,
                           **st["cost"], "match": st["cost"]["frozen_pairs_scored"] == expected})
        runs.append({"name": name, "mode": mode, "alpha": alpha, "wall_seconds": round(wall, 1), "stages": stages})
        shutil.rmtree(out)  # stage models: only the manifest was needed
    return {"params_M": round(params_m, 2), "dims": DIMS, "n_train": s["n_train"], "n_eval": s["n_eval"],
            "runs": runs}


def print_dims(res: dict) -> None:
    n_train, n_eval = res["n_train"], res["n_eval"]
    print(f"\n## Cost per stage vs earlier dimensions\n\n{res['params_M']}M-parameter Llama, {len(res['dims'])} "
          f"dimensions, {n_train} train + {n_eval} eval pairs each. 'needs' = frozen models whose log-probs stage n "
          "uses on its training data (method); 'expected' = pairs scored at this stage under the engine's "
          "schedule (each frozen model runs once, at the first stage that needs it, for all later stages too).\n")
    print("| run | stage | needs (models x D_n) | expected pairs (train + eval splits) | measured pairs | "
          "frozen s | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in res["runs"]:
        for st in r["stages"]:
            ok = "" if st["match"] else " **MISMATCH**"
            print(f"| {r['name']} | {st['stage']} {st['dim']} | {st['needed_train_passes']} | {st['expected_pairs']} "
                  f"({st['train_splits']} x {n_train} + {st['eval_splits']} x {n_eval}) | "
                  f"{st['frozen_pairs_scored']}{ok} | {st['frozen_pass_seconds']:.2f} | {st['train_seconds']:.2f} |")
    print("\n| run | train passes per run (needs) | expected pairs | measured pairs | frozen s | train s | "
          "frozen share | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["runs"]:
        tot = {k: sum(st[k] for st in r["stages"]) for k in
               ("needed_train_passes", "expected_pairs", "frozen_pairs_scored", "frozen_pass_seconds", "train_seconds")}
        share = tot["frozen_pass_seconds"] / (tot["frozen_pass_seconds"] + tot["train_seconds"])
        print(f"| {r['name']} | {tot['needed_train_passes']} | {tot['expected_pairs']} | {tot['frozen_pairs_scored']} "
              f"| {tot['frozen_pass_seconds']:.2f} | {tot['train_seconds']:.2f} | {share:.0%} | {r['wall_seconds']} |")
    n = len(res["dims"])
    print(f"\nAnalytic, N = {n}: previous 2N-1 = {2 * n - 1}, all N(N+1)/2 = {n * (n + 1) // 2}, "
          f"sequential DPO N = {n} frozen passes over training data per run.")


# --------------------------------------------------------------------------------------------- part length

def run_length(work: Path, s: dict) -> list[dict]:
    results = []
    for lo, hi in s["lengths"]:
        out = work / f"bench-{lo}-{hi}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--sides", "spoctl", "--min-len", str(lo),
               "--max-len", str(hi), "--frozen-batch", "8", "--repeats", "1", *s["bench"], "--out", str(out)]
        log(f"length: {lo}-{hi} ...")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            log(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"bench.py at lengths {lo}-{hi} failed")
        raw = json.loads(out.read_text())
        r = raw["results"][0]
        results.append({"min_len": lo, "max_len": hi, **r,
                        "tokens_per_pair": round(r["real_tok_s"] * r["step_s"] / raw["args"]["batch"], 1)})
    return results


def print_length(results: list[dict]) -> None:
    r0 = results[0]
    print(f"\n## Cost vs sequence length\n\nbenchmarks/bench.py --sides spoctl ({r0['params_M']}M-parameter Qwen2, "
          "8 pairs a step, frozen batch 8); lengths are the range each of prompt, chosen and rejected is drawn "
          "from.\n")
    print("| lengths | real tokens/pair | step s | train tok/s | frozen-pass tok/s | frozen / train | peak GiB (RSS) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['min_len']}-{r['max_len']} | {r['tokens_per_pair']:.0f} | {r['step_s']:.3f} | "
              f"{r['real_tok_s']:,.0f} | {r['frozen_tok_s']:,.0f} | {r['frozen_tok_s'] / r['real_tok_s']:.2f}x | "
              f"{r['peak_gib']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=["dims", "length", "all"])
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the script, timings mean nothing")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every run (OMP_NUM_THREADS); default: torch's own (one per core)")
    p.add_argument("--out", default=None, help="also write the raw results as JSON here")
    a = p.parse_args()
    if a.threads:
        # Inherited by every subprocess. On a busy machine, one thread is far steadier: two OpenMP threads that
        # share 2 cores with another process's work made a tiny stage ~100x slower here (spinning barriers).
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    s = SETTINGS["quick" if a.quick else "full"]

    started = time.perf_counter()
    # The load average before and after says how far other work on the machine may have moved the timings.
    result: dict = {"settings": "quick" if a.quick else "full", "cpus": os.cpu_count(), "threads": a.threads or None,
                    "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="spoctl-scaling-") as tmp:
        if a.part in ("dims", "all"):
            result["dims"] = run_dims(Path(tmp), s)
        if a.part in ("length", "all"):
            result["length"] = run_length(Path(tmp), s)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_after"] = os.getloadavg()

    if "dims" in result:
        print_dims(result["dims"])
    if "length" in result:
        print_length(result["length"])
    load = ", ".join(f"{x:.1f}" for x in (result["load_before"][0], result["load_after"][0]))
    print(f"\n{result['settings']} settings, {result['seconds']} s in all; 1-minute load average before, after: {load}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    runs = result.get("dims", {}).get("runs", [])
    mismatched = [r["name"] for r in runs if not all(st["match"] for st in r["stages"])]
    if mismatched:
        raise SystemExit(f"frozen pairs scored differ from the expected schedule in: {', '.join(mismatched)}")


if __name__ == "__main__":
    main()
