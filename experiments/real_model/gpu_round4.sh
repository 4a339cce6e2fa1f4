#!/usr/bin/env bash
# Round 4 of the real-model study on ONE GPU, detached from the device call that starts it:
#   setsid bash experiments/real_model/gpu_round4.sh /root/keep > /root/keep/logs/orchestrator.log 2>&1 &
# Same data, held-out set, token plan (4.92M tokens a run) and evaluation as rounds 1-3 (common.sh).
# Phase A, side by side (the from-scratch study, gpu_scratch.sh, shares the GPU):
#   - DMC 4x and 8x with the DEFAULT recipe (no merge_delay given: the default picks w = 32 at both), then
#     H2O and TOVA in the same studies at the nominal budget and the budget matched to their realized CR;
#   - the control issue #12 asks for: plain continued training plus distillation from the original
#     (distill_weight=1, as DMC has), same tokens;
#   - once DMC 4x is trained: the engine on it (engine_check.py: fp32 greedy = HF generate(), bf16
#     divergence, realized CR = dmc eval's) and, if the script exists, the FP8 KV-cache quality check.
# Phase B, the GPU otherwise idle (waits for the from-scratch study): `dmc serve` on the real model, vanilla
# (the original model) vs DMC 4x at the same KV memory, under benchmarks/serve_load.py; then PHASE_B_EXTRA (a command line,
# e.g. the engine throughput benchmark) if set.
set -u
KEEP=${1:-/root/keep}
. "$(dirname "$0")/common.sh"

read -r -a VARIANTS <<< "${ROUND4_VARIANTS:-d4|4| d8|8|}"  # "name|cr|settings" words
evict_after() {  # "name|cr|settings": once its DMC run is done, H2O and TOVA in the same study
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
launch plain-kd "${COMMON[@]}" --out "$KEEP/study/plain-kd" --crs 4 --methods plain --only plain \
  --set "${TRAIN[@]}" distill_weight=1
WAITERS=()
for v in "${VARIANTS[@]}"; do evict_after "$v" & WAITERS+=($!); done

DMC4=$KEEP/study/d4/runs/dmc-4x/model
wait_for d4
if [ -f "$DMC4/config.json" ]; then
  stamp "engine check on DMC 4x"
  $PY experiments/real_model/engine_check.py "$DMC4" --heldout "${HELDOUT[@]}" --out "$KEEP/engine_check.json" \
    > "$LOGS/engine-check.log" 2>&1
  if [ -f benchmarks/kv_fp8_quality.py ]; then
    stamp "fp8 KV-cache quality"
    $PY benchmarks/kv_fp8_quality.py "$DMC4" --original "$MODEL" --heldout "${HELDOUT[@]}" \
      --out "$KEEP/kv_fp8" > "$LOGS/kv-fp8.log" 2>&1
  fi
fi
wait_for d8; wait_for plain-kd
for w in "${WAITERS[@]}"; do wait "$w"; done
stamp "phase A done; reports"
for d in "$KEEP"/study/*; do
  $PY -m dmc.cli.main study --out "$d" --report-only >> "$LOGS/report.log" 2>&1
done
touch "$KEEP/TRAINED"

while [ -f "$KEEP/scratch.pid" ] && kill -0 "$(cat "$KEEP/scratch.pid")" 2> /dev/null; do sleep 5; done
stamp "phase B: GPU idle"
if [ -z "${SKIP_SERVE:-}" ] && [ -f "$DMC4/config.json" ]; then
  serve_real "$DMC4" "DMC 4x retrofit, default recipe"
fi
if [ -n "${PHASE_B_EXTRA:-}" ]; then
  stamp "phase B extra: $PHASE_B_EXTRA"
  bash -c "$PHASE_B_EXTRA" > "$LOGS/phase-b-extra.log" 2>&1
fi
touch "$KEEP/DONE"
stamp "done"
