# Sourced by run.sh (with KEEP set): the environment, the model (imported from the GGUF on first use),
# the data, held-out set, token plan and evaluation every run shares, and the helpers that start and
# wait for `dmc study` processes.
cd "$KEEP/repo"
export PYTHONPATH=/root/site:$KEEP/repo PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=2 TOKENIZERS_PARALLELISM=true
PY=${PY:-python3}
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

launch() {  # name, then dmc study arguments
  local name=$1; shift
  $PY -m dmc.cli.main study "$@" > "$LOGS/$name.log" 2>&1 &
  echo $! > "$LOGS/$name.pid"
  stamp "started $name (pid $!)"
}
wait_for() { while kill -0 "$(cat "$LOGS/$1.pid")" 2> /dev/null; do sleep 5; done; }

# Variant runs list DMC variants as "name|target CR|settings on top of the defaults", one study each.
launch_variant() {  # "name|cr|settings"
  local name cr extra
  IFS='|' read -r name cr extra <<< "$1"
  read -r -a EXTRA <<< "$extra"
  launch "$name" "${COMMON[@]}" --out "$KEEP/study/$name" --crs "$cr" --methods dmc --only "dmc@$cr" \
    --set "${TRAIN[@]}" "${EXTRA[@]}"
}
launch_variants() {  # the variants given: the first tokenises into the shared token cache, the others start once it trains
  local first=${1%%|*}
  launch_variant "$1"; shift
  for _ in $(seq 600); do
    ls "$KEEP"/study/"$first"/runs/*/model/run/metrics.jsonl > /dev/null 2>&1 && break
    kill -0 "$(cat "$LOGS/$first.pid")" 2> /dev/null || break
    sleep 1
  done
  stamp "first run is training (or stopped); starting the others"
  for v in "$@"; do launch_variant "$v"; sleep 3; done
}

# `dmc serve` on the real model under benchmarks/serve_load.py: vanilla (the original) vs a DMC model at the same
# KV memory, one section each in $KEEP/serve_real.md. SERVE_LOAD / SERVE_ARGS override the load and the server
# flags (a CPU smoke test makes them small).
serve_real() {  # DMC model dir, its label
  read -r -a SERVE <<< "${SERVE_LOAD:---clients 128 --requests 256 --prompt-lens 128,512,1024 --gen-lens 64,128}"
  # Prompts: windows of the held-out text (random token ids compress far less than text).
  SERVE+=(--out "$KEEP/serve_real.md" --prompt-text "${HELDOUT[@]}")
  local args=${SERVE_ARGS:-"--max-model-len 2048 --max-num-seqs 256 --kv-cache-memory-gib 1"}
  $PY benchmarks/serve_load.py --model "$MODEL" "${SERVE[@]}" --server-args "$args" \
    --server-log "$LOGS/serve-vanilla.log" \
    --label "SmolLM2-135M (real; the original, vanilla attention), 1 GiB KV" > "$LOGS/serve-load-vanilla.log" 2>&1
  $PY benchmarks/serve_load.py --model "$1" "${SERVE[@]}" --server-args "$args" \
    --server-log "$LOGS/serve-dmc.log" --label "SmolLM2-135M (real; $2), 1 GiB KV" > "$LOGS/serve-load-dmc.log" 2>&1
}
