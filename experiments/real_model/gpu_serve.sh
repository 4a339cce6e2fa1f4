#!/usr/bin/env bash
# `dmc serve` on the real SmolLM2-135M (issue #14) in ONE device call on one GPU:
#   bash experiments/real_model/gpu_serve.sh /root/keep      (the repo copied to /root/keep/repo, the GGUF at
#                                                            /root/keep/smollm2.gguf, as for the round scripts)
# Nothing survives a lease, so the DMC model is retrofitted here first: the default recipe's stages shortened to
# 140 steps (zero-out 10, retrofit 90, finetune 30, hard 10; 2.29M tokens, against the 300 steps / 4.92M tokens
# of the real-model rounds) so that the retrofit and both server runs fit one 10-minute call. Its held-out
# perplexity and realized CR are measured (8 windows) and reported beside the serving numbers: the load numbers
# depend on the realized CR, not on how good the short retrofit is. Then common.sh's serve_real: vanilla (the
# original) vs this DMC 4x at the same 1 GiB of KV memory under benchmarks/serve_load.py.
set -u
KEEP=${1:-/root/keep}
SHORT="seq_len=1024 micro_batch_size=4 grad_accum=4 lr=3e-4 min_lr=3e-5 warmup_steps=10 zero_out_steps=10"
SHORT+=" retrofit_steps=90 finetune_steps=30 hard_steps=10 eval_every=100000 eval_batches=4 save_every=100000"
export TRAIN_SETTINGS=${TRAIN_SETTINGS:-$SHORT} EVAL=${EVAL:---eval-windows 8 --eval-batch-size 8}
. "$(dirname "$0")/common.sh"
launch_variant "d4short|4|"
wait_for d4short
DMC4=$KEEP/study/d4short/runs/dmc-4x/model
[ -f "$DMC4/config.json" ] || { stamp "the retrofit failed: $LOGS/d4short.log"; exit 1; }
$PY -m dmc.cli.main study --out "$KEEP/study/d4short" --report-only >> "$LOGS/report.log" 2>&1
stamp "serve: vanilla vs the short DMC 4x retrofit"
serve_real "$DMC4" "DMC 4x retrofit, short recipe: 140 steps, 2.29M tokens"
stamp "done"
