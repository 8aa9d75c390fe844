#!/usr/bin/env bash
# ONE device call: GPU kernel tests (Pallas Triton backend, not interpret) + the GPU benchmarks, inside a time budget.
#   run tool:  bash benchmarks/gpu_all.sh [stage ...]
#   stages: env probe tests kernels moe sub1 sweep moe_layer generate scaling (default: all, in this order)
#   sets (one call each, each fits the default budget; a device session of 15 min affords about two calls):
#     generation = env probe generate moe_layer      (end-to-end generation, then the dropless MoE layer, which writes its table after every block; issue 13's numbers)
#     kernel     = env probe tests kernels moe sub1 sweep   (the kernel tables; issue 14's numbers)
#   The default (all stages) runs the kernel set first, so its generation stages usually run out of budget.
# BUDGET_S (default 470 s): every stage's timeout is capped by what is left of it, and a stage with < 20 s left is
# skipped, so the default call (issue 14: tests + kernel table + MoE decode table + sub-1-bit table first) ends in
# under 8 minutes; the later stages run with whatever budget remains (name them alone for a full run).
# Writes gpu_all.log and the result tables (*.md + *.json, each with device name, JAX version and date) under $OUT
# (copy them into benchmarks/results/).
# Extra arguments: KERNELS_ARGS / MOE_ARGS / MOE_LAYER_ARGS / SUB1_ARGS for the benchmarks (e.g. KERNELS_ARGS="--shapes
# 4096x10240 --batches 1"), TESTS_K for a pytest -k selection (default: the GPU-marked tests), GEN_ARGS for
# benchmarks/generate.py (stage "generate": end-to-end Model.generate on a switch-base-128-shaped random model).
# "probe" runs every kernel layout once on the Triton backend (word GEMV, byte kernels, dot mode, and stored words
# passed traced into a jitted indexed matmul as the decode loop does) and stops the call early if none compiles.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOQE_NO_PROGRESS=1
OUT=${OUT:-/tmp/moqe_gpu_out}
mkdir -p "$OUT"
export MOQE_BENCH_OUT="$OUT"
LOG="$OUT/gpu_all.log"
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-470}
T0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); if [ "$1" -lt "$l" ]; then echo "$1"; else echo $(( l > 1 ? l : 1 )); fi; }
stages=()
for a in "$@"; do
  case $a in
    generation) stages+=(env probe generate moe_layer) ;;
    kernel) stages+=(env probe tests kernels moe sub1 sweep) ;;
    *) stages+=("$a") ;;
  esac
done
[ ${#stages[@]} -eq 0 ] && stages=(env probe tests kernels moe sub1 sweep moe_layer generate scaling)
rc=0
for s in "${stages[@]}"; do
  if [ "$(left)" -lt 20 ]; then echo "=== stage $s skipped: $(left) s of the $BUDGET_S s budget left ===" | tee -a "$LOG"; continue; fi
  echo "=== stage $s ($(date -u +%H:%M:%S), $(left) s left) ===" | tee -a "$LOG"
  case $s in
    env) { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv;
           $PY -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee -a "$LOG" ;;
    probe) if ! timeout "$(cap 90)" $PY - <<'PYEOF' 2>&1 | tee -a "$LOG"; then
import numpy as np, jax, jax.numpy as jnp
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from benchmarks.kernels import quant_matmul
rng = np.random.default_rng()
for m, spec, wb in ((1, QuantSpec(4), None), (4, QuantSpec(2), None), (1, QuantSpec(4), 8),
                    (3, QuantSpec(3, symmetric=False), None), (20, QuantSpec(2), None), (1, QuantSpec("ternary"), None),
                    (1, QuantSpec(8, "log"), None), (16, QuantSpec(4, symmetric=False, granularity=128), None)):
    k, n = (1000, 777) if spec.granularity == "channel" else (1024, 777)
    g = spec.num_groups(k)
    z = (-rng.uniform(.5, 1, (g, n)) if spec.is_ternary else rng.integers(0, spec.maxq + 1, (g, n))) if spec.has_zeros else None
    qt = QuantizedTensor.from_codes(rng.integers(0, spec.maxq + 1, (k, n)), rng.uniform(.5, 1, (g, n)), z, spec)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = np.asarray(quant_matmul(x, qt, interpret=False, word_bits=wb), np.float64)
    ref = np.asarray(x, np.float64) @ np.asarray(qt.dequantize(), np.float64)
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    print(f"probe m={m} {spec.describe()} words={wb or 'auto'}: rel err {err:.2e}")
    assert np.isfinite(y).all() and err < 2e-2
# stored words as a traced argument of a jitted function (the model's decode loop): the word kernel, compiled
from moqe_jax import ops
qw = QuantizedTensor.from_codes(rng.integers(0, 16, (2, 1024, 777)), rng.uniform(.5, 1, (2, 1, 777)), None,
                                QuantSpec(4), layout="words")
x = jnp.asarray(rng.standard_normal((2, 1, 1024)), jnp.bfloat16)
f = jax.jit(lambda a, w, j: ops.indexed_qmatmul(a, w, j, mode="pallas"))
ids = jnp.asarray([1, 0], jnp.int32)
assert "_w32" in str(jax.make_jaxpr(f)(x, qw, ids))
y = np.asarray(f(x, qw, ids), np.float64)
ref = np.einsum("ack,akn->acn", np.asarray(x, np.float64), np.asarray(qw.dequantize(), np.float64)[[1, 0]])
err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
print(f"probe traced stored words (indexed, int4): rel err {err:.2e}")
assert np.isfinite(y).all() and err < 2e-2
# dropless prefill (rows >= experts): (tile, expert) work items in ONE indexed launch ("indexed_tiles" plan)
gs = jnp.asarray(np.bincount(rng.integers(0, 2, 300), minlength=2), jnp.int32)
xr = jnp.asarray(rng.standard_normal((300, 1024)), jnp.bfloat16)
assert ops.ragged_plan(xr, qw, mode="pallas") == "indexed_tiles"
yr = np.asarray(jax.jit(lambda a, w, g: ops.ragged_qmatmul(a, w, g, mode="pallas"))(xr, qw, gs), np.float64)
wf, s0, xf = np.asarray(qw.dequantize(), np.float64), int(gs[0]), np.asarray(xr, np.float64)
ref = np.concatenate([xf[:s0] @ wf[0], xf[s0:] @ wf[1]])
err = np.linalg.norm(yr - ref) / np.linalg.norm(ref)
print(f"probe ragged indexed_tiles (300 rows, int4 words): rel err {err:.2e}")
assert np.isfinite(yr).all() and err < 2e-2
PYEOF
             echo "probe FAILED: see the log above" | tee -a "$LOG"; rc=1
           fi ;;
    tests) timeout "$(cap 90)" $PY -m pytest -q -p no:cacheprovider -W "ignore::DeprecationWarning" \
             tests/test_kernels_dequant.py tests/test_sub1_kernel.py -k "${TESTS_K:-gpu}" 2>&1 | tee -a "$LOG" || rc=1 ;;
    kernels) timeout "$(cap 170)" $PY -m benchmarks.kernels --out kernels_gpu_v4 $KERNELS_ARGS 2>&1 | tee -a "$LOG" || rc=1
             # profiler-trace check of the loop timing on the goal rows (device events vs loop time)
             timeout "$(cap 45)" $PY -m benchmarks.kernels --out kernels_gpu_v4_trace --trace --shapes 4096x10240 \
               --batches 1 --formats int4,int2,ternary 2>&1 | tee -a "$LOG" || rc=1
             # this run vs the stored v3 run (v3: queued wall time per call; a different method, see the notes)
             $PY -m benchmarks.kernels --compare "$OUT/kernels_gpu_v4.json" benchmarks/results/kernels_gpu.json \
               --out kernels_gpu_v4_vs_v3 2>&1 | tee -a "$LOG" || rc=1 ;;
    moe) timeout "$(cap 70)" $PY -m benchmarks.moe_decode --out moe_decode_gpu_v4 $MOE_ARGS 2>&1 | tee -a "$LOG" || rc=1
         $PY -m benchmarks.kernels --compare "$OUT/moe_decode_gpu_v4.json" benchmarks/results/moe_decode_gpu.json \
           --out moe_decode_gpu_v4_vs_v3 2>&1 | tee -a "$LOG" || rc=1 ;;
    sub1) timeout "$(cap 120)" $PY -m benchmarks.sub1 --no-bits --no-encode --stacks-only --kernel-name sub1_kernel_v4 --out "$OUT" $SUB1_ARGS 2>&1 \
            | tee -a "$LOG" || rc=1 ;;
    # word-GEMV tilings beside the planned one (4096x10240, M=1, int4/int2) with trace times
    sweep) timeout "$(cap 120)" $PY -m benchmarks.kernels --out kernels_gpu_v4_sweep --sweep --trace --shapes 4096x10240 \
             --batches 1 --formats int4,int2 2>&1 | tee -a "$LOG" || rc=1 ;;
    # the model's MoeLayer: t5x capacity vs dropless vs the chosen experts' floor (bf16 + int4, 1/16 tokens; then 256)
    moe_layer) timeout "$(cap 200)" $PY -m benchmarks.moe_decode --layer --out moe_layer_gpu $MOE_LAYER_ARGS 2>&1 \
                 | tee -a "$LOG" || rc=1
               # prefill-sized step (rows ≥ experts: the one-launch "indexed_tiles" plan for int4), after the main table
               timeout "$(cap 120)" $PY -m benchmarks.moe_decode --layer --batches 256 --formats bfloat16,int4 --sets 2 \
                 --rounds 5 --out moe_layer_gpu_prefill 2>&1 | tee -a "$LOG" || rc=1 ;;
    generate) timeout "$(cap 300)" $PY -m benchmarks.generate --gpu --out generate_gpu $GEN_ARGS 2>&1 | tee -a "$LOG" || rc=1 ;;
    scaling) timeout "$(cap 240)" $PY -m benchmarks.scaling --devices 1 --out scaling_gpu 2>&1 | tee -a "$LOG" || rc=1 ;;  # one-device row of scaling_cpu
    *) echo "unknown stage $s" | tee -a "$LOG"; rc=2 ;;
  esac
done
echo "=== done ($(date -u +%H:%M:%S), $(( $(date +%s) - T0 )) s of $BUDGET_S) ===" | tee -a "$LOG"
exit $rc
