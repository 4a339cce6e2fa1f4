#!/usr/bin/env bash
# One real FSDP2 retrofit on 2 GPUs (torchrun): a small randomly initialised Llama with a BPE
# tokenizer trained on Python's standard library, stopped by --max-steps after a checkpoint, then
# resumed to the end. It proves the distributed mechanics (sharding, DCP checkpoint, resume), not
# quality: the model is not pretrained.
#   bash experiments/fsdp_2gpu.sh WORKDIR LOGDIR
set -euo pipefail
WORK=${1:-/tmp/dmc_fsdp}
LOGS=${2:-$WORK/logs}   # run.log and metrics.jsonl; the summary of a run goes in docs/fsdp_2gpu.md
mkdir -p "$WORK" "$LOGS"
STDLIB=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
DATA=("$STDLIB/json" "$STDLIB/email" "$STDLIB/http" "$STDLIB/logging" "$STDLIB/asyncio")
python3 - "$WORK/base" "${DATA[@]}" <<'PY'
import pathlib, sys
from dmc.tiny import write_tiny_model_dir
texts = [p.read_text() for d in sys.argv[2:] for p in sorted(pathlib.Path(d).glob("*.py"))]
write_tiny_model_dir(sys.argv[1], texts, vocab_size=2048, hidden=512, layers=8, heads=8, kv_heads=4, max_positions=1024)
PY
ARGS=("$WORK/base" --data "${DATA[@]}" --out "$WORK/dmc" --target-cr 2 --seq-len 512 --micro-batch-size 8
      --lr 1e-3 --zero-out-steps 20 --retrofit-steps 100 --finetune-steps 40 --save-every 25 --eval-every 20 --eval-batches 4
      --token-cache "$WORK/tokens" --no-progress --overwrite)
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; } | tee "$LOGS/run.log"
echo "== part 1: torchrun --nproc-per-node 2, stopped at step 90" | tee -a "$LOGS/run.log"
torchrun --nproc-per-node 2 -m dmc.cli.main retrofit "${ARGS[@]}" --max-steps 90 2>&1 | grep --line-buffered -v Warning | tee -a "$LOGS/run.log"
ls "$WORK/dmc/run/checkpoints" | tee -a "$LOGS/run.log"
echo "== part 2: --resume" | tee -a "$LOGS/run.log"
torchrun --nproc-per-node 2 -m dmc.cli.main retrofit "${ARGS[@]/--overwrite/--resume}" 2>&1 | grep --line-buffered -v Warning | tee -a "$LOGS/run.log"
cp "$WORK/dmc/run/metrics.jsonl" "$LOGS/metrics.jsonl"
python3 - "$WORK/dmc" <<'PY' | tee -a "$LOGS/run.log"
import json, sys, transformers, dmc
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/run/metrics.jsonl")]
print(f"final model: {type(model).__name__}, dmc={model.config.dmc}")
print(f"steps logged: {rows[0]['step']}..{rows[-1]['step']} ({len(rows)} rows)")
for r in rows:
    if "val_loss" in r:
        print(f"step {r['step']:4d} {r['stage']:9s} lm_loss {r['lm_loss']:.3f} target_cr {r['target_cr']:.2f} "
              f"train_cr {r['achieved_cr']:.2f} val_loss {r['val_loss']:.3f} val_cr {r['val_cr']:.2f}")
PY
