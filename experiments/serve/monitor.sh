#!/usr/bin/env bash
# monitor.sh KEEP SECONDS OUT: show gpu_serving.sh's progress every minute until KEEP/DONE exists or SECONDS
# have passed, then pack what it wrote so far (no weights) into OUT/serving.tgz.
KEEP=$1; LIMIT=$2; OUT=$3; start=$(date +%s); last=0
while :; do
  now=$(date +%s)
  if [ $((now - last)) -ge 60 ] || [ -f "$KEEP/DONE" ]; then
    last=$now
    echo "=== $(date +%H:%M:%S)"; tail -3 "$KEEP/logs/orchestrator.log"
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2> /dev/null
  fi
  [ -f "$KEEP/DONE" ] && break
  [ $((now - start)) -ge "$LIMIT" ] && break
  sleep 5
done
cd "$KEEP" && tar czf "$OUT/serving.tgz" --exclude='*.safetensors' --exclude=checkpoints --exclude=tensorboard \
  --exclude='*.pt' --exclude='*.bin' --exclude=tokens $(ls -d results profiles logs study DONE 2> /dev/null)
ls -la "$OUT"
