#!/usr/bin/env bash
# The from-scratch study (experiments/quality_study.py) with the current default recipe, on one GPU (an H200
# here; it can share the GPU with the real-model study), detached:
#   setsid bash experiments/quality_study_gpu.sh /root/keep > /root/keep/logs/scratch.log 2>&1 &
# Same corpus, model, pretraining and plan as the H100 run in docs/results.md; only the 4x rows (DMC,
# plain continued training, GQA 4x, H2O/TOVA at the nominal and matched budgets) to fit the device time.
# One process pretrains then trains DMC; a second trains plain + GQA once pretraining is done; a last one
# evaluates the eviction rows and writes the report (every step skips what --work already holds).
set -u
KEEP=${1:-/root/keep}
cd "$KEEP/repo"
export PYTHONPATH=/root/site:$KEEP/repo PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=2 TOKENIZERS_PARALLELISM=true
W=$KEEP/scratch; OUT=$KEEP/scratch_out; LOGS=$KEEP/logs
mkdir -p "$W" "$OUT" "$LOGS"
QS=(${PY:-python3} experiments/quality_study.py --work "$W" --out "$OUT" ${SCRATCH_ARGS:---pretrain-steps 3000} --crs ${SCRATCH_CRS:-4})
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "pretraining, then dmc"
"${QS[@]}" --only $(for c in ${SCRATCH_CRS:-4}; do echo dmc@$c; done) > "$LOGS/scratch-dmc.log" 2>&1 &
DMC=$!
while [ ! -f "$W/base/pretrain.json" ] && kill -0 $DMC 2> /dev/null; do sleep 5; done
stamp "pretrained (or stopped); plain + gqa"
"${QS[@]}" --only plain $(for c in ${SCRATCH_CRS:-4}; do echo gqa@$c; done) > "$LOGS/scratch-plain.log" 2>&1
wait $DMC
stamp "eviction rows and the report"
"${QS[@]}" > "$LOGS/scratch-report.log" 2>&1
stamp "scratch done (rc $?)"
touch "$KEEP/SCRATCH_DONE"
