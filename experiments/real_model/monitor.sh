#!/usr/bin/env bash
# monitor.sh KEEP SECONDS OUT: show the study's progress every minute until KEEP/DONE exists or
# SECONDS have passed, then pack its results (no weights) into OUT/results.tgz.
KEEP=$1; LIMIT=$2; OUT=$3; start=$(date +%s); last=0
while :; do
  now=$(date +%s)
  if [ $((now - last)) -ge 60 ] || [ -f "$KEEP/DONE" ]; then
    last=$now
    echo "=== $(date +%H:%M:%S)"; tail -4 "$KEEP/logs/orchestrator.log"; tail -2 "$KEEP/logs/scratch.log" 2> /dev/null
    for f in "$KEEP"/logs/*.log; do
      n=$(basename "$f" .log); [ "$n" = orchestrator ] && continue
      echo "$n: $(tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -1 | cut -c1-150)"
    done
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2> /dev/null
  fi
  [ -f "$KEEP/DONE" ] && break
  [ $((now - start)) -ge "$LIMIT" ] && break
  sleep 10
done
cd "$KEEP" && tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude=checkpoints --exclude=tensorboard \
  --exclude='*.pt' --exclude='*.npy' --exclude='*.bin' --exclude=tokens \
  $(ls -d study logs engine_check.json DONE TRAINED benchmarks.md serve_real.md kv_fp8 tp scratch_out scratch/study \
     scratch/base/pretrain.json bench 2> /dev/null)
ls -la "$OUT"
