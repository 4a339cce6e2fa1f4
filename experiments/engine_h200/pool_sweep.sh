#!/usr/bin/env bash
# Does the paged attention lose bandwidth when its pages are spread over a pool that fills the GPU, as the engine's
# are? (issue #15: inside the decode graph the CR 8 attention takes 15.4 ms a step against 13.1 for the same shape
# in attention_sweep.py's small pool). The CR 8 and CR 1 shapes of the 2K-context profile (bf16, dots) and the
# CR 4 + fp8 shape (deferred sums), each in: a pool of only the pages used (scattered), a 100 GiB pool with the
# pages scattered over it, and a 100 GiB pool with each head's pages in one run.
#   bash experiments/engine_h200/pool_sweep.sh RESULTS_DIR
set -u
OUT=$1
S="python3 benchmarks/attention_sweep.py --stages default --warps 4 --splits 1"
for cfg in "small:" "big:--pool-gib 100" "bigrun:--pool-gib 100 --contiguous"; do
  name=${cfg%%:*}; opts=${cfg#*:}
  $S --out "$OUT/$name" --shapes 391:256:bf16 51:2048:bf16 --blocks 64 128 --modes dot $opts \
    > "$OUT/$name.log" 2>&1 || tail -3 "$OUT/$name.log"
  $S --out "$OUT/$name-fp8" --shapes 397:896:fp8 --blocks 32 --modes defer $opts > "$OUT/$name-fp8.log" 2>&1 \
    || tail -3 "$OUT/$name-fp8.log"
  echo "== $name $opts"; grep -h "^| [0-9]" "$OUT/$name/attention_sweep.md" "$OUT/$name-fp8/attention_sweep.md"
done
