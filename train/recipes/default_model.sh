#!/usr/bin/env bash
# Train the bundled default MoE model and its dense twin (same active compute) on the gettext corpus.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
CORPUS=${CORPUS:-work_data/corpus}
RUNS=${RUNS:-runs}
STEPS=${STEPS:-1500}
COMMON=(--data "$CORPUS" --steps "$STEPS" --tokens-per-batch 2048 --batch-size 64 --max-len 32
        --optimizer adafactor --lr 0.01 --warmup 1000 --schedule rsqrt
        --set d_ff=384 --set num_layers=2 --set num_decoder_layers=2 --set num_heads=4 --set d_kv=64
        --set dtype='"float32"' --log-every 25 --eval-every 250 --save-every 100 --seed 0)
[ -f "$CORPUS/train.jsonl" ] || $PY -m moqe_jax data build --locale-dir /usr/share/locale --out "$CORPUS" --vocab 8000
$PY -m moqe_jax train --config small-mt "${COMMON[@]}" --out "$RUNS/default-moe"
$PY -m moqe_jax train --config small-mt-dense "${COMMON[@]}" --out "$RUNS/default-dense"
