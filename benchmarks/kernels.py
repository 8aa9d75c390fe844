"""Fused dequant-matmul kernels vs XLA bf16 ``jnp.dot``, timed as a decode step uses them (issues 6, 14).

Every row: per-call **device time** (many calls inside one jitted ``fori_loop`` over rotated operand sets
larger than this device's L2, benchmarks/device_time.py), per-call **wall time** (one dispatched call at a
time), optionally the **trace time** (``--trace``: device events of a ``jax.profiler`` trace of the same loop),
the **byte floor** (bytes that must move / copy bandwidth measured in the same run), **% of copy bandwidth**
(floor / device time) and the speed-up over XLA bf16 measured the same way. Kernel rows run on the raw
operands of ``moqe_jax.ops.qt_kernel_operands`` prepared once per weight (the uint32 word layout where
supported; ``(bytes)`` rows: the stored uint8 layout, the v3 kernels). ``ops.qmatmul (traced, stored …)`` rows
(int4/int2, M = 1, the two goal shapes) pass the ``QuantizedTensor`` itself into the timed loop, as the model's
compiled decode loop does: held in words (``Model.with_weight_layout("words")``) it runs the word kernels, held in
bytes the v3 ones.

    python -m benchmarks.kernels --smoke                 # CPU: tiny shapes, interpret mode (code path only)
    python -m benchmarks.kernels [--out kernels_gpu] [--trace] [--shapes 4096x10240 --batches 1,16]
    python -m benchmarks.kernels --compare NEW.json BASE.json --out kernels_v4_vs_v3

``--compare`` joins two result files of this or any benchmark (rows keyed by the columns before the first
time column) and writes ``base µs``, ``new µs`` and the speed-up new vs base.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_time as dt
from benchmarks.common import device_info, write_results
from moqe_jax import ops
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from pallas_kernels import backend
from pallas_kernels import dequant_matmul as dq

# (K×N, batches): the goal shapes of issue 14 (batch 1 everywhere; the GEMV range 1–4 and dot 16/64 on the
# largest), small enough for one GPU call of gpu_all.sh
PLAN = [((768, 3072), (1, 16)), ((1024, 4096), (1,)), ((2080, 6144), (1, 16)), ((4096, 10240), (1, 4, 16, 64))]
FORMATS = {"int8": QuantSpec(8), "int4": QuantSpec(4), "int3": QuantSpec(3), "int2": QuantSpec(2),
           "ternary": QuantSpec("ternary"), "int4-g128": QuantSpec(4, symmetric=False, granularity=128)}
ALL_M_FORMATS = ("int4", "int2", "ternary")  # formats timed at every batch; the others at M=1 only
BYTES_ROWS = ("int4", "int2")                # also timed on the stored uint8 layout (v3 kernels) at M=1
MODEL_PATH_SHAPES = ((2080, 6144), (4096, 10240))  # where the "ops.qmatmul (traced, stored …)" rows run
HEADER = ["K×N", "M", "method", "device µs", "wall µs", "trace µs", "floor µs", "% copy BW", "× vs bf16", "blocks"]


def random_qt(key: jax.Array, spec: QuantSpec, k: int, n: int) -> QuantizedTensor:
    k1, k2, k3 = jax.random.split(key, 3)
    codes = jax.random.randint(k1, (k, n), 0, spec.maxq + 1)
    g = spec.num_groups(k)
    scales = jax.random.uniform(k2, (g, n), jnp.float32, 0.001, 0.01)
    zeros = None
    if spec.is_ternary:
        zeros = -jax.random.uniform(k3, (g, n), jnp.float32, 0.001, 0.01)
    elif spec.has_zeros:
        zeros = jax.random.randint(k3, (g, n), 0, spec.maxq + 1).astype(jnp.float32)
    return QuantizedTensor.from_codes(codes, scales, zeros, spec, jnp.bfloat16)


def quant_matmul(x: jax.Array, w: QuantizedTensor, *, interpret: bool, blocks: dq.Blocks | None = None,
                 word_bits: int | None = None) -> jax.Array:
    """The kernel on a 2-D ``w`` (its raw operands from ``moqe_jax.ops``)."""
    arrays, layout = ops.qt_kernel_operands(w, word_bits)
    return dq.quant_matmul(x, *arrays, **layout, blocks=blocks, interpret=interpret)


def _kernel_fn(layout: dict[str, Any], interpret: bool, blocks: dq.Blocks | None = None) -> Callable[..., jax.Array]:
    def f(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array | None) -> jax.Array:
        return dq.quant_matmul(x, packed, scales, zeros, **layout, blocks=blocks, interpret=interpret)
    return f


# (BN, BKr) word-GEMV tilings tried by --sweep (int4 / int2 at M = 1) beside the planned 64 × 16
SWEEP_WORDS = [(32, 16), (64, 8), (64, 32), (128, 8), (128, 16)]


def _blocks_desc(m: int, k: int, n: int, layout: dict[str, Any], word_bits: int) -> str:
    b = dq.plan_blocks(m, k, n, 1, code_bits=layout["code_bits"], group_size=layout["group_size"],
                       word_bits=word_bits)
    return f"w{word_bits} {b.mode} bm{b.bm} bn{b.bn} bkr{b.bkr} s{b.splits} warps{b.num_warps}"


class Table:
    """Rows of one run (copy bandwidth and flags shared)."""

    def __init__(self, bw: float, smoke: bool, trace: bool, sweep: bool = False) -> None:
        self.bw, self.smoke, self.trace, self.sweep = bw, smoke, trace, sweep
        self.rows: list[list[Any]] = []

    def add(self, shape: str, m: int, method: str, fn: Callable[..., Any], sets: list[Any], nbytes: int,
            base_s: float | None, blocks: str = "-") -> float:
        t = dt.measure(fn, sets, smoke=self.smoke, trace=self.trace)
        floor = nbytes / self.bw
        self.rows.append([shape, m, method, t.device_s * 1e6, t.wall_s * 1e6,
                          float("nan") if t.trace_s is None else t.trace_s * 1e6, floor * 1e6,
                          100 * floor / max(t.device_s, 1e-12), (base_s or t.device_s) / max(t.device_s, 1e-12),
                          blocks])
        print(self.rows[-1], flush=True)
        return t.device_s


def _weights(key: jax.Array, spec: QuantSpec, k: int, n: int, smoke: bool) -> list[QuantizedTensor]:
    q0 = random_qt(key, spec, k, n)
    ns = dt.n_sets(q0.nbytes, smoke=smoke)
    return [q0] + [random_qt(kk, spec, k, n) for kk in jax.random.split(jax.random.fold_in(key, 7), ns - 1)]


def _format_rows(tab: Table, shape: tuple[int, int], m: int, fmt: str, ws: list[QuantizedTensor],
                 xs: list[jax.Array], t_bf16: float, interpret: bool, first_m: bool) -> None:
    k, n = shape
    name = f"{k}x{n}"
    io = (m * k + m * n) * 2
    layouts = [None] + ([8] if fmt in BYTES_ROWS and m == 1 and not tab.smoke else [])
    for wb in layouts:
        ops_sets = [ops.qt_kernel_operands(w, wb) for w in ws]  # repacked once per weight, before timing
        layout = ops_sets[0][1]
        word_bits = dq.word_bits_of(ops_sets[0][0][0])
        sets = [(x, *arrays) for x, (arrays, _) in zip(xs, ops_sets, strict=False)]
        tag = " (bytes)" if wb == 8 else ""
        tab.add(name, m, f"{fmt} kernel{tag}", _kernel_fn(layout, interpret), sets, ws[0].nbytes + io, t_bf16,
                _blocks_desc(m, k, n, layout, word_bits))
        plan = dq.plan_blocks(m, k, n, 1, code_bits=layout["code_bits"], group_size=layout["group_size"],
                              word_bits=word_bits)
        variants = []
        if word_bits == 32 and fmt == "int4" and m == 1 and plan.splits > 1:  # the split-K second pass vs none
            variants.append(("no split-K", dataclasses.replace(plan, splits=1)))
        if tab.sweep and word_bits == 32 and fmt in BYTES_ROWS and m == 1:
            variants += [(f"sweep bn{bn} bkr{bkr}", dataclasses.replace(plan, bn=bn, bkr=bkr))
                         for bn, bkr in SWEEP_WORDS if bn <= max(16, n)]
        for label, blk in variants:
            tab.add(name, m, f"{fmt} kernel ({label})", _kernel_fn(layout, interpret, blk), sets, ws[0].nbytes + io,
                    t_bf16, f"w32 {blk.mode} bm{blk.bm} bn{blk.bn} bkr{blk.bkr} s{blk.splits} warps{blk.num_warps}")
    if fmt in BYTES_ROWS and m == 1 and (tab.smoke and fmt == "int4" or not tab.smoke and shape in MODEL_PATH_SHAPES):
        _model_path_rows(tab, name, fmt, ws, xs, t_bf16, interpret, ws[0].nbytes + io)
    if fmt == "int4" and first_m:
        sets = list(zip(xs, ws, strict=False))
        tab.add(name, m, "int4 XLA dequant+dot", lambda x, w: jnp.dot(x, w.dequantize(jnp.bfloat16)), sets,
                ws[0].nbytes + io, t_bf16)


def _model_path_rows(tab: Table, name: str, fmt: str, ws: list[QuantizedTensor], xs: list[jax.Array], t_bf16: float,
                     interpret: bool, nbytes: int) -> None:
    """``ops.qmatmul`` on a ``QuantizedTensor`` that is a traced argument of the timed loop, as in the model's
    compiled decode loop: stored words (``Model.with_weight_layout("words")``) -> the word kernels; the byte
    layout -> the v3 byte kernels (docs/KERNELS.md §2, "Getting the word kernels")."""
    mode = "interpret" if interpret else "pallas"

    def f(x: jax.Array, w: QuantizedTensor) -> jax.Array:
        return ops.qmatmul(x, w, mode=mode)

    layouts = ("words",) if tab.smoke else ("words", "bytes")
    for layout in layouts:
        held = [w.with_layout(layout) for w in ws]  # repacked once per weight, before timing
        tab.add(name, 1, f"{fmt} ops.qmatmul (traced, stored {layout})", f, list(zip(xs, held, strict=False)),
                nbytes, t_bf16, f"w{32 if layout == 'words' else 8} via moqe_jax.ops")


def run(smoke: bool, out: str, plan: list[tuple[tuple[int, int], tuple[int, ...]]] | None = None,
        formats: list[str] | None = None, trace: bool = False, sweep: bool = False) -> list[list[Any]]:
    interpret = not backend.gpu_kernels_available()
    if interpret and not smoke:
        print("no GPU kernels available: running in interpret mode (numbers are not meaningful)", file=sys.stderr)
    plan = plan or ([((256, 96), (1, 3))] if smoke else PLAN)
    formats = formats or list(FORMATS)
    meta = device_info()
    bw = dt.copy_bandwidth(smoke=smoke)
    meta.update(copy_bandwidth_GBps=bw / 1e9, l2_bytes=dt.l2_bytes(), timing="device: jitted fori_loop over rotated "
                "sets; wall: one dispatched call; trace: profiler device events")
    print(f"# {meta['device']} jax {meta['jax']}: copy bandwidth {bw / 1e9:.0f} GB/s, L2 {dt.l2_bytes() >> 20} MiB",
          flush=True)
    tab = Table(bw, smoke, trace, sweep)
    key = jax.random.key(1234)
    for (k, n), batches in plan:
        key, kw = jax.random.split(key)
        nb_bf16 = k * n * 2
        w_bf16 = [jax.random.normal(kk, (k, n), jnp.bfloat16) * 0.02
                  for kk in jax.random.split(kw, dt.n_sets(nb_bf16, smoke=smoke))]
        qts = {fmt: _weights(key, FORMATS[fmt], k, n, smoke) for fmt in formats
               if FORMATS[fmt].granularity == "channel" or k % FORMATS[fmt].granularity == 0}
        for m in batches:
            nx = max(len(w_bf16), *(len(v) for v in qts.values()))
            xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in jax.random.split(jax.random.key(m), nx)]
            t_bf16 = tab.add(f"{k}x{n}", m, "bf16 XLA dot", jnp.dot, list(zip(xs, w_bf16, strict=False)),
                             nb_bf16 + (m * k + m * n) * 2, None)
            for fmt, ws in qts.items():
                if m == batches[0] or fmt in ALL_M_FORMATS:
                    _format_rows(tab, (k, n), m, fmt, ws, xs, t_bf16, interpret, m == batches[0])
        del w_bf16, qts
    notes = (f"Device time: median per call inside one jitted loop over rotated operand sets (≥ 2× the "
             f"{dt.l2_bytes() >> 20} MiB L2 of this device kind), minus one empty-call dispatch. Wall: one jitted "
             f"call dispatched and waited for at a time. Trace: device events of a jax.profiler trace of the loop "
             f"(nan = not taken / no device events). Floor = bytes that must move (weights incl. scales/zeros + x + y)"
             f" / copy bandwidth measured in this run ({bw / 1e9:.0f} GB/s, read+write, same loop method). "
             f"× vs bf16 = bf16 device time / this row's device time."
             f"{' SMOKE RUN (CPU, interpret mode): times are meaningless.' if interpret else ''}")
    write_results(out, "Dequant-matmul kernels vs XLA (device time)", HEADER, tab.rows, meta, notes)
    return tab.rows


def check_correct(smoke: bool) -> None:
    """One fresh random case per format and layout on the benchmark path (relative error vs float64 host math)."""
    interpret = not backend.gpu_kernels_available()
    rng = np.random.default_rng()
    k, n, m = (256, 96, 2) if smoke else (1024, 4096, 3)
    for fmt, spec in FORMATS.items():
        qt = random_qt(jax.random.key(int(rng.integers(1 << 30))), spec, k, n)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        ref = np.asarray(x, np.float64) @ np.asarray(qt.dequantize(jnp.float32), np.float64)
        for wb in (None, 8):
            y = np.asarray(quant_matmul(x, qt, interpret=interpret, word_bits=wb), np.float64)
            err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            print(f"check {fmt} {'bytes' if wb else 'auto layout'}: rel err {err:.2e}", flush=True)
            if not math.isfinite(err) or err > 2e-2:
                raise SystemExit(f"kernel {fmt} wrong: rel err {err}")


def compare(new_path: str, base_path: str, out: str) -> list[list[Any]]:
    """Join two result JSONs (``write_results`` format) on the columns before the first time column."""
    new, base = (json.loads(open(pth, encoding="utf-8").read()) for pth in (new_path, base_path))
    col = next(c for c in ("device µs", "time µs") if c in new["header"])
    bcol = next(c for c in ("device µs", "time µs") if c in base["header"])
    ti, bi = new["header"].index(col), base["header"].index(bcol)
    if base["header"][:bi] != new["header"][:ti]:
        raise SystemExit(f"{new_path} and {base_path} have different key columns")
    old = {tuple(r[:bi]): r[bi] for r in base["rows"]}
    rows = [[*r[:ti], old.get(tuple(r[:ti]), float("nan")), r[ti], old.get(tuple(r[:ti]), float("nan")) / r[ti],
             *(r[-1:] if new["header"][-1] == "blocks" else [])] for r in new["rows"]]
    header = [*new["header"][:ti], f"base {bcol}", f"new {col}", "× new vs base"] + \
        (["blocks"] if new["header"][-1] == "blocks" else [])
    notes = (f"new: {new_path} ({new['meta'].get('date')}, {new['meta'].get('device')}); base: {base_path} "
             f"({base['meta'].get('date')}, {base['meta'].get('device')}). nan = row absent from the base run. "
             "Different timing methods are not comparable row by row (device loop vs queued wall time).")
    write_results(out, "New vs base run", header, rows, new["meta"], notes)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--smoke", "--quick", action="store_true", dest="smoke", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--out", default=None, help="results name (default kernels_<platform>)")
    ap.add_argument("--formats", default=None, help="comma list of " + ",".join(FORMATS))
    ap.add_argument("--shapes", default=None, help="comma list of KxN (with --batches; default: the PLAN table)")
    ap.add_argument("--batches", default="1,16", help="comma list of M for --shapes")
    ap.add_argument("--trace", action="store_true", help="also time every row from a jax.profiler trace")
    ap.add_argument("--sweep", action="store_true", help="also time word-GEMV tilings (int4/int2, M=1)")
    ap.add_argument("--compare", nargs=2, metavar=("NEW_JSON", "BASE_JSON"), help="only join two result files")
    a = ap.parse_args(argv)
    if a.compare:
        compare(*a.compare, a.out or "compare")
        return 0
    plan = None
    if a.shapes:
        batches = tuple(int(v) for v in a.batches.split(","))
        plan = [(tuple(int(v) for v in s.split("x")), batches) for s in a.shapes.split(",")]
    out = a.out or ("kernels_smoke" if a.smoke else "kernels_" + jax.devices()[0].platform)
    check_correct(a.smoke)
    run(a.smoke, out, plan, a.formats.split(",") if a.formats else None, a.trace, a.sweep)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
