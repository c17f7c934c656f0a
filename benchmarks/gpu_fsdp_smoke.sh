#!/usr/bin/env bash
# The CUDA path of FSDP2 in one device call (about 3 minutes): what the CPU tests (gloo, float32) cannot reach --
# NCCL, bf16 mixed precision with float32 master weights, shards on the GPU, the stage model gathered back to the
# host, checkpoints written from the GPU, CPU offload with pinned memory. One GPU, so one process (FSDP with one
# process runs the same code as with eight). Each run is a two-stage `spoctl align` on a random-init Llama built
# here; the script then checks what each run wrote and prints one JSON line per check.
#
#   here:            bash benchmarks/gpu_wheels.sh              # once: .whl/ with pydantic, datasets (for the data)
#   device machine:  bash benchmarks/gpu_fsdp_smoke.sh "$OUT"    # carry .whl; results in $OUT
#
# DEVICE_CHECK=0 skips the nvidia-smi line, so the script can be smoke-tested on a CPU (precision fp32 there):
#   DEVICE_CHECK=0 PRECISION=fp32 PY=.venv/bin/python WHEELS=0 bash benchmarks/gpu_fsdp_smoke.sh /tmp/fsdp-smoke
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu-fsdp-smoke}
precision=${PRECISION:-bf16}
mkdir -p "$out"
source benchmarks/gpu_env.sh
export PYTHONPATH="$PWD/tests:$PYTHONPATH"  # tinyworld builds the model and data
[ "${DEVICE_CHECK:-1}" = 1 ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"

world="$out/world"
$PY - "$world" <<'PY'
import sys
from pathlib import Path
from tinyworld import make_model_dir, make_prepared
root = Path(sys.argv[1])
if not (root / "prepared" / "manifest.json").exists():
    model = make_model_dir(root / "model", hidden=256, layers=4)
    make_prepared(root / "prepared", model, ["helpful", "harmless"], n_train=64, n_eval=16)
PY

common=(--dims helpful,harmless --data "$world/prepared" --lr 1e-4 --batch-size 8 --max-steps 6
        --set save_every=2 --set precision="$precision" --quiet)
run() {  # name, then extra arguments
  local name=$1; shift
  rm -rf "$out/$name"
  local t0=$SECONDS
  $PY -m torch.distributed.run --nproc_per_node 1 --master_port $((29500 + RANDOM % 500)) -m spoctl align \
    "${common[@]}" --out "$out/$name" "$@" > "$out/$name.log" 2>&1 || { tail -40 "$out/$name.log"; exit 1; }
  echo "{\"run\": \"$name\", \"seconds\": $((SECONDS - t0))}"
}
run ddp-full --full
run fsdp-full --full --set distributed=fsdp
run fsdp-lora --lora --set distributed=fsdp
run fsdp-offload --full --set distributed=fsdp --set fsdp.cpu_offload=true

$PY - "$out" <<'PY'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
out = Path(sys.argv[1])
def stage(run, name):
    folder = out / run / "stages" / name / "model"
    f = folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").exists() else "model.safetensors")
    return load_file(str(f))
for run in ("ddp-full", "fsdp-full", "fsdp-lora", "fsdp-offload"):
    m = json.loads((out / run / "manifest.json").read_text())
    st = m["stages"]
    finite = all(torch.isfinite(t).all().item() for t in stage(run, "02-harmless").values())
    print(json.dumps({"run": run, "distributed": m["distributed"], "precision": m["precision"],
                      "status": [s["status"] for s in st], "finite": finite,
                      "loss_last": [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()
                                    if "stage2/harmless/loss" in l][-1]["stage2/harmless/loss"]}))
# FSDP and DDP compute the same thing; in bf16 they differ by bf16 rounding, so this is reported, not asserted.
a, b = stage("fsdp-full", "02-harmless"), stage("ddp-full", "02-harmless")
base = load_file(str(out / "world" / "model" / "model.safetensors"))
moved = max(float((b[k].float() - base[k].float()).abs().max()) for k in b)
apart = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
print(json.dumps({"check": "fsdp vs ddp, stage 2 weights", "moved": moved, "apart": apart, "ratio": apart / moved}))
PY
