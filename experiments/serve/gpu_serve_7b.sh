#!/usr/bin/env bash
# `dmc serve` under load on one GPU with the Llama-2-7B-shaped benchmark model (random bf16 weights, as
# benchmarks/throughput.py): vanilla vs DMC at CR 4 (--forced-cr: decisions forced, the weights are random)
# with the same KV-cache memory. Each run appends its section to OUT (Markdown) via benchmarks/serve_load.py.
#   bash experiments/serve/gpu_serve_7b.sh OUT.md [WORKDIR]
# Environment: KV_GIB (default 16), CLIENTS (128), REQUESTS (256), PROMPTS (128,512,1024), GENS (64,128).
set -euo pipefail
OUT=$1; WORK=${2:-/root/serve7b}
KV_GIB=${KV_GIB:-16}; CLIENTS=${CLIENTS:-128}; REQUESTS=${REQUESTS:-256}
PROMPTS=${PROMPTS:-128,512,1024}; GENS=${GENS:-64,128}
PY=${PY:-python3}
mkdir -p "$WORK"
if [ ! -f "$WORK/model/config.json" ]; then
  $PY - "$WORK/model" <<'PYEOF'
import sys
sys.path.insert(0, "benchmarks")
from throughput import build_model  # the benchmark's own 7B shape
model = build_model(dmc_model=True)
model.save_pretrained(sys.argv[1])
print("saved", sys.argv[1], flush=True)
PYEOF
fi
COMMON=(--model "$WORK/model" --clients "$CLIENTS" --requests "$REQUESTS" --prompt-lens "$PROMPTS" --gen-lens "$GENS"
        --out "$OUT")
SERVER="--max-model-len 2048 --max-num-seqs 256 --kv-cache-memory-gib $KV_GIB"
$PY benchmarks/serve_load.py "${COMMON[@]}" --server-args "$SERVER --vanilla" --server-log "$WORK/vanilla.log" \
  --label "Llama-2-7B shape (random weights), vanilla, ${KV_GIB} GiB KV"
$PY benchmarks/serve_load.py "${COMMON[@]}" --server-args "$SERVER --forced-cr 4" --server-log "$WORK/dmc4.log" \
  --label "Llama-2-7B shape (random weights), DMC CR 4 (forced), ${KV_GIB} GiB KV"
