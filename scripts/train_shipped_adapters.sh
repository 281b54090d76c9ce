#!/usr/bin/env bash
# Reproduce the three shipped demo adapters (lorart/data/adapters/{uppercase,json,pirate}).
#
# One `lorart train` run trains all three at once: every batch mixes rows of the three
# adapters over the frozen 4-bit SmolLM2-135M-Instruct (Q4_1 GGUF), each adapter with its
# own loss, AdamW group and gradient clip. Rank 8 on the four attention projections,
# weights saved in bfloat16 (about 1.8 MB per adapter). The run's log (per-step losses,
# tokens, seconds) lands in $OUT/train_log.json.
#
# The shipped files came from this script on 2026-11-29 on a 2-core machine shared with
# other jobs (load average 5-8): 150 steps in 718 s, ~150 tokens/s, final per-batch losses
# uppercase 0.37, json 0.23, pirate 0.59 (means of the last 10 steps: 0.54, 0.13, 0.36).
# One OpenMP thread: on an oversubscribed machine two threads spin at every barrier
# and a step took 45-80 s instead of 4-7 s.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
OUT=${OUT:-build/shipped-adapters}
STEPS=${STEPS:-150}

python scripts/make_datasets.py
lorart train \
  --data uppercase=lorart/data/train/uppercase.jsonl \
  --data json=lorart/data/train/json.jsonl \
  --data pirate=lorart/data/train/pirate.jsonl \
  --rank 8 --alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj \
  --steps "$STEPS" --save-every 25 --batch-size 12 --lr 2e-3 --warmup-steps 10 --lr-schedule cosine \
  --max-length 128 --seed 0 --save-dtype bfloat16 --output-dir "$OUT"
mkdir -p lorart/data/adapters
for name in uppercase json pirate; do
  rm -rf "lorart/data/adapters/$name"
  cp -r "$OUT/$name" "lorart/data/adapters/$name"
done
cp "$OUT/train_log.json" lorart/data/adapters/train_log.json
