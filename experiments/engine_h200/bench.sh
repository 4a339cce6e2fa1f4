#!/usr/bin/env bash
# The engine benchmarks of issue #15 on one H200, within a time budget (a device call is limited to 10 min):
#   bash experiments/engine_h200/bench.sh RESULTS_DIR SECONDS [STEP ...]
# Each step is a row group of benchmarks/throughput.py written into RESULTS_DIR (its results/throughput.json
# and benchmarks.md, --resume: rows already there are kept and not re-run), or the decode profile. A step
# starts only if the time left covers its estimate, so the script can be called again (e.g. by the real-model
# round once the GPU is idle) to finish what did not fit. Steps: prefill cr1 cr4 cr8 cr4-fp8 cr1-fp8 profile sweep
# (sweep: benchmarks/attention_sweep.py, the paged attention's tile at the fp8 batch)
# (default: all, in that order; the profile is named PROFILE_LABEL, default "before": before any change of
# issue #15's per-row overhead; PROFILE_CONFIGS: its CR:batch[:fp8] configs). Logs go to RESULTS_DIR/logs.
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
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
echo "[$(date +%H:%M:%S)] bench.sh done, $(left) s of the budget left"
