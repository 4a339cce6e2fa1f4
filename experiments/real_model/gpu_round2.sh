#!/usr/bin/env bash
# Round 2 of the real-model study of issue #12 on ONE GPU, detached from the device call that starts it:
#   setsid bash experiments/real_model/gpu_round2.sh /root/keep > /root/keep/logs/orchestrator.log 2>&1 &
# KEEP must hold smollm2.gguf and a copy of this repository in KEEP/repo; /root/site holds
# transformers 5.23 and gguf. Same data, held-out set, token plan and evaluation as gpu_study.sh
# (round 1), so its rows (defaults at 2x/4x/8x, plain, original) stay comparable; see
# docs/results/real_round2/ for what came out.
#
# What it runs: eight DMC retrofits sharing the GPU, each changing the controller of the
# compression (the dual-ascent rate, the per-head ceiling, hinge vs dual) or a default lever (the
# logit scale, the LM loss next to distillation); then H2O and TOVA on the original at the 4x and
# 8x budgets (the realized CRs of round 1 were within 5% of the targets).
set -u
KEEP=${1:-/root/keep}
. "$(dirname "$0")/common.sh"

# name | target CR | settings on top of the defaults
VARIANTS=(
  "d4-dual0.5|4|cr_dual_rate=0.5"
  "d4-dual0.5-ceil8|4|cr_dual_rate=0.5 max_head_cr=8"
  "d4-ceil8|4|max_head_cr=8"
  "d4-hinge|4|cr_constraint=hinge"
  "d4-scale1|4|logit_scale=1"
  "d4-dual0.5-ceil8-kdonly|4|cr_dual_rate=0.5 max_head_cr=8 lm_weight=0"
  "d8-dual0.5-ceil16|8|cr_dual_rate=0.5 max_head_cr=16"
  "d2-dual0.5-ceil4|2|cr_dual_rate=0.5 max_head_cr=4"
)
VARIANTS=("${VARIANTS[@]:0:${MAX_VARIANTS:-${#VARIANTS[@]}}}")

launch_variants "${VARIANTS[@]}"
for v in "${VARIANTS[@]}"; do wait_for "${v%%|*}"; done
stamp "all DMC runs finished; eviction baselines"
EVICT=("${COMMON[@]}" --out "$KEEP/study/evict" --crs 4 8 --methods h2o tova --eval-batch-size 32)
for m in h2o tova; do for cr in 4 8; do launch "$m$cr" "${EVICT[@]}" --set "${TRAIN[@]}" --only "$m@$cr"; sleep 2; done; done
for m in h2o tova; do for cr in 4 8; do wait_for "$m$cr"; done; done
stamp "all runs finished; reports"
for d in "$KEEP"/study/*; do
  $PY -m dmc.cli.main study --out "$d" --report-only >> "$LOGS/report.log" 2>&1
done
touch "$KEEP/DONE"
stamp "done"
