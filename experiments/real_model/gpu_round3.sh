#!/usr/bin/env bash
# Round 3 of the real-model study of issue #12 on ONE GPU, detached from the device call that starts it:
#   setsid bash experiments/real_model/gpu_round3.sh /root/keep > /root/keep/logs/orchestrator.log 2>&1 &
# Same data, held-out set, token plan (4.92M tokens a run) and evaluation as rounds 1 and 2 (common.sh), so
# their rows stay comparable. What it tests: delayed merging (merge_delay w: the last w tokens of every head
# stay raw, a token merges once it is w old; the window counts in the CR), at 4x with w = 16, 32, 64 and at
# 2x / 8x with w = 32, against the current default (w = 0) re-run in the same round; then H2O and TOVA at
# the nominal budget and at the budget matched to each w = 32 run's realized CR; then `dmc serve` on the
# real model (vanilla vs the w = 0 DMC model, which the engine runs) under the load generator, GPU idle.
set -u
KEEP=${1:-/root/keep}
. "$(dirname "$0")/common.sh"

# name | target CR | settings on top of the defaults
VARIANTS=(
  "d4-w32|4|merge_delay=32"
  "d4-w16|4|merge_delay=16"
  "d4-w64|4|merge_delay=64"
  "d2-w32|2|merge_delay=32"
  "d8-w32|8|merge_delay=32"
  "d4-w0|4|merge_delay=0"
)
VARIANTS=("${VARIANTS[@]:0:${MAX_VARIANTS:-${#VARIANTS[@]}}}")
EVICT_AFTER=(${EVICT_AFTER:-d4-w32 d2-w32 d8-w32})

evict_after() {  # "name|cr|settings": once its DMC run is done, H2O and TOVA in the same study (matched budget)
  local name cr extra
  IFS='|' read -r name cr extra <<< "$1"
  read -r -a EXTRA <<< "$extra"
  wait_for "$name"
  for m in h2o tova; do
    launch "$m-$name" "${COMMON[@]}" --out "$KEEP/study/$name" --crs "$cr" --methods dmc "$m" --only "$m@$cr" \
      --eval-batch-size 32 --set "${TRAIN[@]}" "${EXTRA[@]}"
  done
  wait_for "h2o-$name"; wait_for "tova-$name"
}

launch_variants "${VARIANTS[@]}"
WAITERS=()
for v in "${VARIANTS[@]}"; do
  for e in "${EVICT_AFTER[@]}"; do
    if [ "${v%%|*}" = "$e" ]; then evict_after "$v" & WAITERS+=($!); fi
  done
done
for v in "${VARIANTS[@]}"; do wait_for "${v%%|*}"; done
stamp "all DMC runs finished"
for w in "${WAITERS[@]}"; do wait "$w"; done
stamp "all eviction baselines finished; reports"
for d in "$KEEP"/study/*; do
  $PY -m dmc.cli.main study --out "$d" --report-only >> "$LOGS/report.log" 2>&1
done
touch "$KEEP/TRAINED"

# dmc serve on the real model, nothing else on the GPU: vanilla vs DMC 4x (w = 0) at the same KV memory.
SERVE_MODEL=$KEEP/study/d4-w0/runs/dmc-4x/model
if [ -z "${SKIP_SERVE:-}" ] && [ -f "$SERVE_MODEL/config.json" ]; then
  stamp "serving"
  SERVE=(--clients 128 --requests 256 --prompt-lens 128,512,1024 --gen-lens 64,128 --out "$KEEP/repo/docs/benchmarks.md")
  ARGS="--max-model-len 2048 --max-num-seqs 256 --kv-cache-memory-gib 1"
  $PY benchmarks/serve_load.py --model "$SERVE_MODEL" "${SERVE[@]}" --server-args "$ARGS --vanilla" \
    --server-log "$LOGS/serve-vanilla.log" --label "SmolLM2-135M (real, retrofitted DMC 4x, served vanilla), 1 GiB KV" \
    > "$LOGS/serve-load-vanilla.log" 2>&1
  $PY benchmarks/serve_load.py --model "$SERVE_MODEL" "${SERVE[@]}" --server-args "$ARGS" \
    --server-log "$LOGS/serve-dmc.log" --label "SmolLM2-135M (real, retrofitted DMC 4x), 1 GiB KV" \
    > "$LOGS/serve-load-dmc.log" 2>&1
  cp "$KEEP/repo/docs/benchmarks.md" "$KEEP/benchmarks.md"
fi
touch "$KEEP/DONE"
stamp "done"
