#!/usr/bin/env bash
# The engine benchmarks on one H200, within a time budget (a device call is limited to 10 min):
#   bash experiments/engine_h200/bench.sh RESULTS_DIR SECONDS [STEP ...]
# Each step is a row group of benchmarks/throughput.py written into RESULTS_DIR (its results/throughput.json
# and benchmarks.md, --resume: rows already there are kept and not re-run), or the decode profile. A step
# starts only if the time left covers its estimate, so the script can be called again (e.g. by the real-model
# study once the GPU is idle) to finish what did not fit. Steps: prefill cr1 cr4 cr8 cr4-fp8 cr1-fp8 profile sweep
# sweep-modes sweep-defer profile-prefill gpu-tests
# (sweep: benchmarks/attention_sweep.py, the paged attention's tile at the fp8 batch; sweep-modes: its inner
# products, tensor-core dots vs CUDA-core sums, at the CR 4 bf16 and fp8 batches; sweep-defer: the tile of the
# deferred sums at the fp8 batch; profile-prefill:
# benchmarks/profile_prefill.py at PREFILL_CRS, default "4 1"; gpu-tests: the kernel and engine test files on the GPU)
# (default: all, in that order; the profile is named PROFILE_LABEL, default "before"; PROFILE_CONFIGS: its
# CR:batch[:fp8] configs). Logs go to RESULTS_DIR/logs.
set -u
OUT=$1; BUDGET=$2; shift 2
STEPS=("$@"); [ ${#STEPS[@]} -eq 0 ] && STEPS=(prefill cr1 cr4 cr8 cr4-fp8 cr1-fp8 profile sweep)
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
mkdir -p "$OUT/logs"
left() { echo $((BUDGET - ($(date +%s) - start))); }
has_row() {  # part config: is that row (4K context for the engine) in the results file?
  $PY - "$OUT/results/throughput.json" "$1" "$2" <<'PYEOF'
import json, pathlib, sys
path, part, config = sys.argv[1:]
rows = json.loads(pathlib.Path(path).read_text())["rows"] if pathlib.Path(path).exists() else []
sys.exit(0 if any(r["part"] == part and r["config"] == config and r.get("context", 4096) == 4096 for r in rows) else 1)
PYEOF
}
run_step() {  # name, estimated seconds, command...
  local name=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then echo "[$(date +%H:%M:%S)] skip $name: $(left) s left, needs ~$need s"; return; fi
  echo "[$(date +%H:%M:%S)] $name"
  timeout $(($(left) - 3)) "$@" > "$OUT/logs/$name.log" 2>&1
  echo "[$(date +%H:%M:%S)] $name: rc $? ($(tail -1 "$OUT/logs/$name.log" | cut -c1-160))"
}
TP=(benchmarks/throughput.py --out "$OUT" --resume)
for s in "${STEPS[@]}"; do
  case $s in
    prefill) has_row prefill hf-sdpa-causal || run_step prefill 90 $PY "${TP[@]}" --parts prefill ;;
    cr1|cr4|cr8) has_row engine "$s" || run_step "$s" 170 $PY "${TP[@]}" --parts engine --contexts 4096 --crs "${s#cr}" ;;
    cr4-fp8|cr1-fp8)
      c=${s%-fp8}
      has_row engine "$s" || run_step "$s" 190 $PY "${TP[@]}" --parts engine --contexts 4096 --crs "${c#cr}" \
        --kv-cache-dtype fp8 ;;
    profile) read -r -a CONFIGS <<< "${PROFILE_CONFIGS:-1:51 4:201 8:390 4:397:fp8}"
      [ -f "$OUT/profile_decode_${PROFILE_LABEL:-before}.json" ] || run_step profile $((75 * ${#CONFIGS[@]})) \
        $PY benchmarks/profile_decode.py --out "$OUT" --label "${PROFILE_LABEL:-before}" --configs "${CONFIGS[@]}" ;;
    sweep) [ -f "$OUT/attention_sweep.json" ] || run_step sweep 150 $PY benchmarks/attention_sweep.py --out "$OUT" ;;
    sweep-modes) [ -f "$OUT/modes/attention_sweep.json" ] || run_step sweep-modes 120 $PY benchmarks/attention_sweep.py \
        --out "$OUT/modes" --shapes 397:896:fp8 201:896:bf16 --modes dot sum defer --blocks 32 64 128 \
        --stages default --warps 4 8 --splits 1 ;;
    sweep-defer) [ -f "$OUT/defer/attention_sweep.json" ] || run_step sweep-defer 90 $PY benchmarks/attention_sweep.py \
        --out "$OUT/defer" --shapes 397:896:fp8 --modes defer --blocks 16 32 64 --stages default 1 2 --warps 1 2 4 \
        --splits 1 2 ;;
    profile-prefill) [ -f "$OUT/profile_prefill_${PROFILE_LABEL:-before}.json" ] || run_step profile-prefill 120 \
        $PY benchmarks/profile_prefill.py --out "$OUT" --crs ${PREFILL_CRS:-4 1} --label "${PROFILE_LABEL:-before}" ;;
    gpu-tests) run_step gpu-tests 200 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
        tests/test_kernels_delay.py tests/test_kv_fp8_kernels.py tests/test_decode_layers.py tests/test_engine.py \
        tests/test_kv_fp8.py tests/test_engine_delay.py tests/test_engine_eviction.py tests/test_batched_prefill.py ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
echo "[$(date +%H:%M:%S)] bench.sh done, $(left) s of the budget left"
