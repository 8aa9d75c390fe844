#!/usr/bin/env bash
# ONE device call: GPU kernel tests (Pallas Triton backend, not interpret) + all GPU benchmarks.
#   run tool:  bash benchmarks/gpu_all.sh [stage ...]     stages: env probe kernels moe tests sub1 generate (default: all)
# Writes gpu_all.log and the result tables (*.md + *.json) under $OUT (copy them into benchmarks/results/).
# Extra arguments: KERNELS_ARGS / MOE_ARGS / MOE_LAYER_ARGS for the benchmarks (e.g. "--shapes 4096x10240 --batches 1"),
# TESTS_K for a pytest -k selection, GEN_ARGS for benchmarks/generate.py (stage "generate": end-to-end
# Model.generate on a switch-base-128-shaped random model, bf16 vs int4 vs sub-1-bit experts, batch 1, 64 new
# tokens, ~3 compiles + 5 rounds). "probe" checks the in-kernel strided activation loads and falls back to
# the XLA residue split (MOQE_KERNEL_XPREP=1) for the later stages if they do not compile.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOQE_NO_PROGRESS=1
OUT=${OUT:-/tmp/moqe_gpu_out}
mkdir -p "$OUT"
export MOQE_BENCH_OUT="$OUT"
LOG="$OUT/gpu_all.log"
PY=${PY:-python3}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env probe kernels moe tests sub1 generate)
rc=0
for s in "${stages[@]}"; do
  echo "=== stage $s ($(date -u +%H:%M:%S)) ===" | tee -a "$LOG"
  case $s in
    env) { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv;
           $PY -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee -a "$LOG" ;;
    probe) if ! timeout 120 $PY - <<'PYEOF' 2>&1 | tee -a "$LOG"; then
import numpy as np, jax, jax.numpy as jnp
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from benchmarks.kernels import quant_matmul
rng = np.random.default_rng()
for m, spec in ((1, QuantSpec(4)), (3, QuantSpec(3, symmetric=False)), (20, QuantSpec(2)), (1, QuantSpec("ternary")),
                (1, QuantSpec(8, "log")), (16, QuantSpec(4, symmetric=False, granularity=128))):
    k, n = (1000, 777) if spec.granularity == "channel" else (1024, 777)
    g = spec.num_groups(k)
    z = (-rng.uniform(.5, 1, (g, n)) if spec.is_ternary else rng.integers(0, spec.maxq + 1, (g, n))) if spec.has_zeros else None
    qt = QuantizedTensor.from_codes(rng.integers(0, spec.maxq + 1, (k, n)), rng.uniform(.5, 1, (g, n)), z, spec)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = np.asarray(quant_matmul(x, qt, interpret=False), np.float64)
    ref = np.asarray(x, np.float64) @ np.asarray(qt.dequantize(), np.float64)
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    print(f"probe m={m} {spec.describe()}: rel err {err:.2e}")
    assert np.isfinite(y).all() and err < 2e-2
PYEOF
             echo "probe FAILED: falling back to MOQE_KERNEL_XPREP=1" | tee -a "$LOG"; export MOQE_KERNEL_XPREP=1; rc=1
           fi ;;
    tests) timeout 300 $PY -m pytest -q -p no:cacheprovider -W "ignore::DeprecationWarning" \
             tests/test_kernels_dequant.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee -a "$LOG" || rc=1 ;;
    kernels) timeout 420 $PY benchmarks/kernels.py --out kernels_gpu --sweep $KERNELS_ARGS 2>&1 | tee -a "$LOG" || rc=1
             # this run vs the stored v2 run (same table rows, v2 µs beside the new µs)
             $PY benchmarks/kernels.py --compare "$OUT/kernels_gpu.json" benchmarks/results/kernels_gpu_v2.json \
               --out kernels_gpu_vs_v2 2>&1 | tee -a "$LOG" || rc=1 ;;
    moe) timeout 300 $PY benchmarks/moe_decode.py --out moe_decode_gpu $MOE_ARGS 2>&1 | tee -a "$LOG" || rc=1
         # the model's MoeLayer: t5x capacity vs dropless vs the chosen experts' floor (bf16 + int4, 1/16 tokens)
         timeout 240 $PY benchmarks/moe_decode.py --layer --out moe_layer_gpu $MOE_LAYER_ARGS 2>&1 | tee -a "$LOG" || rc=1
         $PY benchmarks/kernels.py --compare "$OUT/moe_decode_gpu.json" benchmarks/results/moe_decode_gpu_v2.json \
           --out moe_decode_gpu_vs_v2 2>&1 | tee -a "$LOG" || rc=1 ;;
    sub1) if [ -f benchmarks/sub1.py ]; then  # sub-1-bit: Triton tests + kernel vs bf16 (+ $SUB1_ARGS, e.g. --sweep)
            timeout 120 $PY -m pytest -q -p no:cacheprovider -W "ignore::DeprecationWarning" -m gpu \
              tests/test_sub1_kernel.py 2>&1 | tee -a "$LOG" || rc=1
            timeout 400 $PY -m benchmarks.sub1 --no-bits --no-encode --out "$OUT" $SUB1_ARGS 2>&1 | tee -a "$LOG" || rc=1
          fi ;;
    generate) timeout 300 $PY -m benchmarks.generate --gpu --out generate_gpu $GEN_ARGS 2>&1 | tee -a "$LOG" || rc=1 ;;
    *) echo "unknown stage $s" | tee -a "$LOG"; rc=2 ;;
  esac
done
exit $rc
