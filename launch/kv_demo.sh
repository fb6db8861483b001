#!/usr/bin/env bash
# The small default job: the key-value experiment's three training stages on a laptop CPU.
#   1. pretrain mB (anchor) on numeric arithmetic;  2. pretrain mA (augment) on the keys;
#   3. CALM: compose mB with mA on KV-Arithmetic over held-in keys, evaluated on held-out keys.
# Usage: launch/kv_demo.sh [RUN_DIR] [extra --gin.KEY=VALUE ...]
set -euo pipefail
run=${1:-runs/kv_demo}
shift || true
python -m calm_jax.train --gin_file=experiments/pretrain_numeric.gin \
  --gin.MODEL_DIR="'$run/mB'" --gin.NUM_STEPS=600 "$@"
python -m calm_jax.train --gin_file=experiments/pretrain_kv.gin \
  --gin.MODEL_DIR="'$run/mA'" --gin.NUM_STEPS=600 "$@"
python -m calm_jax.train --gin_file=experiments/compose_kv.gin \
  --gin.MODEL_DIR="'$run/calm'" --gin.NUM_STEPS=300 \
  --gin.ANCHOR_CHECKPOINT="'$run/mB/export'" --gin.AUGMENT_CHECKPOINT="'$run/mA/export'" "$@"
echo "metrics: $run/{mB,mA,calm}/metrics.jsonl"
