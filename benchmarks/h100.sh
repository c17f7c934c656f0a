#!/usr/bin/env bash
# The GPU half of issue 7 in one device call: both shapes of ../shared/bench (Qwen2 0.5B and 1.5B, bf16, 8 pairs a
# step, prompts and responses of 32-256 tokens), spoctl's SPO stage and TRL 1.16.0's DPOTrainer (precomputed
# reference and reference forward) in the same run, plus the card's measured bf16 matmul peak. About 5-8 minutes.
#
#   here:            bash benchmarks/gpu_wheels.sh          # once: .whl/ with pydantic, datasets, trl
#   device machine:  bash benchmarks/h100.sh "$OUT"         # carry .whl; results land in $OUT (default: benchmarks/results)
#
# SHAPES, DEVICE, STEPS, REPEATS and WHEELS=0 override the defaults, so the script can be smoke-tested on a CPU:
#   DEVICE=cpu SHAPES=cpu-small STEPS=4 WHEELS=0 bash benchmarks/h100.sh /tmp/h100-smoke
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
shapes=${SHAPES:-qwen2-0.5b qwen2-1.5b}
device=${DEVICE:-cuda}
steps=${STEPS:-30}
# One round per shape by default: a GPU machine is not shared, and three rounds of both shapes would not fit one
# device session (about 15 minutes). REPEATS=3 interleaves three rounds, as on the shared CPU.
repeats=${REPEATS:-1}
mkdir -p "$out"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
$PY -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
for shape in $shapes; do
  $PY benchmarks/bench.py --device "$device" --shape "$shape" --min-len 32 --max-len 256 --steps "$steps" \
    --warmup $((steps / 4)) --frozen-batch 32 --repeats "$repeats" --out "$out/h100-$shape.json" 2>&1 | tee "$out/h100-$shape.txt"
done
