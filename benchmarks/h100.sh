#!/usr/bin/env bash
# The GPU half of issue 7 in one device call: both shapes of ../shared/bench (Qwen2 0.5B and 1.5B, bf16, 8 pairs a
# step, prompts and responses of 32-256 tokens), spoctl's SPO stage and TRL 1.16.0's DPOTrainer (precomputed
# reference and reference forward) in the same run, plus the card's measured bf16 matmul peak. About 5-8 minutes.
#
#   here:            bash benchmarks/gpu_wheels.sh          # once: .whl/ with pydantic, datasets, trl
#   device machine:  bash benchmarks/h100.sh "$OUT"         # carry .whl; results land in $OUT (default: benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
for shape in qwen2-0.5b qwen2-1.5b; do
  python3 benchmarks/bench.py --device cuda --shape "$shape" --min-len 32 --max-len 256 --steps 30 --warmup 8 \
    --frozen-batch 32 --out "$out/h100-$shape.json" 2>&1 | tee "$out/h100-$shape.txt"
done
