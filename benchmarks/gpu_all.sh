#!/usr/bin/env bash
# ONE device call: GPU kernel tests (Pallas Triton backend, not interpret) + all GPU benchmarks.
#   run tool:  bash benchmarks/gpu_all.sh [stage ...]     stages: env tests kernels moe sub1 (default: all)
# Writes gpu_all.log and the result tables (*.md + *.json) under $OUT (copy them into benchmarks/results/).
# Extra arguments for the kernel benchmark can be passed in KERNELS_ARGS (e.g. "--shapes 4096x10240 --batches 1").
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOQE_NO_PROGRESS=1
OUT=${OUT:-/tmp/moqe_gpu_out}
mkdir -p "$OUT"
export MOQE_BENCH_OUT="$OUT"
LOG="$OUT/gpu_all.log"
PY=${PY:-python3}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests kernels moe sub1)
rc=0
for s in "${stages[@]}"; do
  echo "=== stage $s ($(date -u +%H:%M:%S)) ===" | tee -a "$LOG"
  case $s in
    env) { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv;
           $PY -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee -a "$LOG" ;;
    tests) timeout 300 $PY -m pytest -q -p no:cacheprovider -W "ignore::DeprecationWarning" \
             tests/test_kernels_dequant.py 2>&1 | tee -a "$LOG" || rc=1 ;;
    kernels) timeout 420 $PY benchmarks/kernels.py --out kernels_gpu $KERNELS_ARGS 2>&1 | tee -a "$LOG" || rc=1 ;;
    moe) timeout 300 $PY benchmarks/moe_decode.py --out moe_decode_gpu 2>&1 | tee -a "$LOG" || rc=1 ;;
    sub1) if [ -f benchmarks/sub1.py ]; then  # sub-1-bit: Triton tests + kernel vs bf16 (+ $SUB1_ARGS, e.g. --sweep)
            timeout 120 $PY -m pytest -q -p no:cacheprovider -W "ignore::DeprecationWarning" -m gpu \
              tests/test_sub1_kernel.py 2>&1 | tee -a "$LOG" || rc=1
            timeout 400 $PY -m benchmarks.sub1 --no-bits --no-encode --out "$OUT" $SUB1_ARGS 2>&1 | tee -a "$LOG" || rc=1
          fi ;;
    *) echo "unknown stage $s" | tee -a "$LOG"; rc=2 ;;
  esac
done
exit $rc
