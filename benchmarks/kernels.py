"""Fused dequant-matmul kernel vs XLA bf16 ``jnp.dot`` vs XLA dequantize-then-dot (issue 6).

Switch expert shapes K×N (768×3072 … 4096×10240), batch M ∈ {1, 16, 64}. For every case: median time of one
matmul (weight sets rotated so L2 does not hold them, see benchmarks/common.py), achieved GB/s over the bytes
that must move (packed + scales + zeros + x + y; bf16: the bf16 weight), % of the measured copy bandwidth and
the speedup over XLA bf16. ``--quick`` runs tiny shapes (interpret mode on CPU) as a smoke test.

    python -m benchmarks.kernels [--quick] [--out kernels_h100] [--sweep]
    python -m benchmarks.kernels --compare NEW.json BASE.json --out kernels_v3_vs_v2

``--sweep`` adds GEMV (fma) tilings of the largest shape at M=1 (int4, int2) beside the planned one;
``--compare`` joins two result files of this or any benchmark (rows keyed by the columns before ``time µs``)
and writes ``base µs``, ``new µs`` and the speedup new vs base (e.g. kernels v3 vs the stored v2 run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import copy_bandwidth, device_info, n_sets_for, time_rotated, write_results
from moqe_jax import ops
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from pallas_kernels import backend
from pallas_kernels.dequant_matmul import Blocks, plan_blocks, qmm
from pallas_kernels.dequant_matmul import quant_matmul as raw_quant_matmul

XPREP = os.environ.get("MOQE_KERNEL_XPREP", "0") == "1"  # XLA residue split instead of strided loads (GPU fallback)

SHAPES = [(768, 3072), (3072, 768), (1024, 4096), (2080, 6144), (4096, 10240)]
BATCHES = [1, 16, 64]
FORMATS = {"int8": QuantSpec(8), "int4": QuantSpec(4), "int3": QuantSpec(3), "int2": QuantSpec(2),
           "ternary": QuantSpec("ternary"), "int4-g128": QuantSpec(4, symmetric=False, granularity=128)}
ALL_M_FORMATS = ("int4", "int2", "ternary")  # formats timed at every batch; the others at M=1 only
SWEEP_FMA = [(32, 64), (64, 64), (64, 128), (128, 32), (128, 64), (256, 32)]  # (BN, BKr) tried by --sweep


def quant_matmul(x: jax.Array, w: QuantizedTensor, *, interpret: bool, blocks: Blocks | None = None) -> jax.Array:
    """The kernel on a 2-D ``w`` (its raw operands from ``moqe_jax.ops``)."""
    arrays, layout = ops.kernel_operands(w)
    return raw_quant_matmul(x, *arrays, **layout, blocks=blocks, interpret=interpret, xprep=XPREP)


def grouped_quant_matmul(x: jax.Array, w: QuantizedTensor, *, interpret: bool) -> jax.Array:
    arrays, layout = ops.kernel_operands(w)
    return qmm(x, *arrays, **layout, interpret=interpret, xprep=XPREP)


def _plan(m: int, k: int, n: int, e: int, spec: QuantSpec) -> Blocks:
    return plan_blocks(m, k, n, e, code_bits=spec.code_bits,
                       group_size=None if spec.granularity == "channel" else spec.group_size(k))


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


def run(quick: bool, out: str, shapes=None, batches=None, formats=None, sweep: bool = False) -> list[list]:
    interpret = not backend.gpu_kernels_available()
    if interpret and not quick:
        print("no GPU kernels available: running in interpret mode (numbers are not meaningful)", file=sys.stderr)
    shapes = shapes or ([(200, 130)] if quick else SHAPES)
    batches = batches or ([1, 3] if quick else BATCHES)
    formats = formats or list(FORMATS)
    meta = device_info()
    bw = copy_bandwidth(quick=quick)
    meta["copy_bandwidth_GBps"] = bw / 1e9
    print(f"# {meta['device']} jax {meta['jax']}: measured copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows: list[list] = []
    key = jax.random.key(1234)
    for k, n in shapes:
        nb_bf16 = k * n * 2
        sets_bf16 = n_sets_for(nb_bf16, quick=quick)
        key, kw = jax.random.split(key)
        w_bf16 = [jax.random.normal(kk, (k, n), jnp.bfloat16) * 0.02 for kk in jax.random.split(kw, sets_bf16)]
        qts: dict[str, list[QuantizedTensor]] = {}
        for fmt in formats:
            spec = FORMATS[fmt]
            if spec.granularity != "channel" and k % spec.granularity:
                continue
            q0 = random_qt(key, spec, k, n)
            ns = n_sets_for(q0.nbytes, quick=quick)
            qts[fmt] = [q0] + [random_qt(kk, spec, k, n) for kk in jax.random.split(jax.random.fold_in(key, 7),
                                                                                   ns - 1)]
        for m in batches:
            xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in jax.random.split(jax.random.key(m), 64)]
            io_bytes = (m * k + m * n) * 2
            t_bf16 = time_rotated(lambda x, w: jnp.dot(x, w), list(zip(xs, w_bf16, strict=False)), quick=quick)
            rows.append([f"{k}x{n}", m, "bf16 XLA dot", t_bf16 * 1e6, (nb_bf16 + io_bytes) / t_bf16 / 1e9,
                         100 * (nb_bf16 + io_bytes) / t_bf16 / bw, 1.0, "-"])
            print(rows[-1], flush=True)
            for fmt, ws in qts.items():
                if m != batches[0] and fmt not in ALL_M_FORMATS:
                    continue
                nbytes = ws[0].nbytes + io_bytes
                sets = list(zip(xs, ws, strict=False))
                t_k = time_rotated(lambda x, w: quant_matmul(x, w, interpret=interpret), sets, quick=quick)
                b = _plan(m, k, n, 1, ws[0].spec)
                rows.append([f"{k}x{n}", m, f"{fmt} kernel", t_k * 1e6, nbytes / t_k / 1e9, 100 * nbytes / t_k / bw,
                             t_bf16 / t_k, f"{b.mode} bm{b.bm} bn{b.bn} bkr{b.bkr} s{b.splits} w{b.num_warps}"])
                print(rows[-1], flush=True)
                if fmt in ("int4", "int2") and (m == batches[0] or fmt == "int4"):
                    t_d = time_rotated(lambda x, w: jnp.dot(x, w.dequantize(jnp.bfloat16)), sets, quick=quick)
                    rows.append([f"{k}x{n}", m, f"{fmt} XLA dequant+dot", t_d * 1e6, nbytes / t_d / 1e9,
                                 100 * nbytes / t_d / bw, t_bf16 / t_d, "-"])
                    print(rows[-1], flush=True)
                if sweep and m == 1 and fmt in ("int4", "int2") and (k, n) == max(shapes, key=lambda kn: kn[0] * kn[1]):
                    for bn, bkr in SWEEP_FMA:
                        blk = Blocks(1, bn, bkr, 1, 4, 4, "fma")
                        if (bn, bkr) == (b.bn, b.bkr) or bn > n:
                            continue
                        t_s = time_rotated(lambda x, w, blk=blk: quant_matmul(x, w, interpret=interpret, blocks=blk),
                                           sets, quick=quick)
                        rows.append([f"{k}x{n}", m, f"{fmt} kernel (sweep)", t_s * 1e6, nbytes / t_s / 1e9,
                                     100 * nbytes / t_s / bw, t_bf16 / t_s, f"fma bm1 bn{bn} bkr{bkr} s1 w4"])
                        print(rows[-1], flush=True)
        if not quick and (k, n) == max(shapes, key=lambda kn: kn[0] * kn[1]):
            rows += grouped_rows(k, n, batches[0], bw, interpret)
    header = ["K×N", "M", "method", "time µs", "GB/s", "% copy BW", "× vs bf16", "blocks"]
    notes = (f"Median of one matmul over rotated weight sets (≥3× L2 of bytes). GB/s counts the bytes that must "
             f"move (weights incl. scales/zeros + x + y). Copy bandwidth measured in this run: {bw / 1e9:.0f} GB/s "
             f"(read+write).{' INTERPRET MODE (CPU smoke test): times are meaningless.' if interpret else ''}")
    write_results(out, "Dequant-matmul kernels vs XLA", header, rows, meta, notes)
    return rows


def grouped_rows(k: int, n: int, m: int, bw: float, interpret: bool, e: int = 8) -> list[list]:
    """One launch over ``e`` weight matrices (the MoE grouped case) vs XLA's batched bf16 dot: per-matrix time
    without per-launch overhead in either."""
    rows = []
    key = jax.random.key(99)
    x = jax.random.normal(key, (e, m, k), jnp.bfloat16)
    wb = jax.random.normal(key, (e, k, n), jnp.bfloat16) * 0.02
    io = (e * m * k + e * m * n) * 2
    t_b = time_rotated(lambda a, w: jnp.einsum("emk,ekn->emn", a, w), [(x, wb)]) / e
    rows.append([f"{k}x{n}", m, f"bf16 XLA batched dot ×{e} (per matrix)", t_b * 1e6,
                 (e * k * n * 2 + io) / e / t_b / 1e9, 100 * (e * k * n * 2 + io) / e / t_b / bw, 1.0, "-"])
    print(rows[-1], flush=True)
    del wb
    for fmt in ("int4", "int2"):
        spec = FORMATS[fmt]
        w = jax.vmap(lambda kk, s=spec: random_qt(kk, s, k, n))(jax.random.split(key, e))
        t = time_rotated(lambda a, ww: grouped_quant_matmul(a, ww, interpret=interpret), [(x, w)]) / e
        nb = (w.nbytes + io) / e
        blk = _plan(m, k, n, e, spec)
        rows.append([f"{k}x{n}", m, f"{fmt} grouped kernel ×{e} (per matrix)", t * 1e6, nb / t / 1e9,
                     100 * nb / t / bw, t_b / t, f"{blk.mode} bm{blk.bm} bn{blk.bn} bkr{blk.bkr} s{blk.splits}"])
        print(rows[-1], flush=True)
    return rows


def check_correct(quick: bool) -> None:
    """One fresh random case per format on the benchmark path (relative error vs float64 host math)."""
    interpret = not backend.gpu_kernels_available()
    rng = np.random.default_rng()
    k, n, m = (256, 96, 2) if quick else (1024, 4096, 16)
    for fmt, spec in FORMATS.items():
        qt = random_qt(jax.random.key(int(rng.integers(1 << 30))), spec, k, n)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        y = np.asarray(quant_matmul(x, qt, interpret=interpret), np.float64)
        ref = np.asarray(x, np.float64) @ np.asarray(qt.dequantize(jnp.float32), np.float64)
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        print(f"check {fmt}: rel err {err:.2e}", flush=True)
        if not math.isfinite(err) or err > 2e-2:
            raise SystemExit(f"kernel {fmt} wrong: rel err {err}")


def compare(new_path: str, base_path: str, out: str) -> list[list]:
    """Join two result JSONs (``write_results`` format) on the columns before ``time µs``: base vs new time."""
    new, base = (json.loads(open(pth, encoding="utf-8").read()) for pth in (new_path, base_path))
    ti = new["header"].index("time µs")
    if base["header"][:ti + 1] != new["header"][:ti + 1]:
        raise SystemExit(f"{new_path} and {base_path} have different key columns")
    old = {tuple(r[:ti]): r[ti] for r in base["rows"]}
    rows = [[*r[:ti], old.get(tuple(r[:ti]), float("nan")), r[ti], old.get(tuple(r[:ti]), float("nan")) / r[ti],
             *(r[-1:] if new["header"][-1] == "blocks" else [])] for r in new["rows"]]
    header = [*new["header"][:ti], "base µs", "new µs", "× new vs base"] + (["blocks"] if new["header"][-1] == "blocks"
                                                                          else [])
    notes = (f"new: {new_path} ({new['meta'].get('date')}, {new['meta'].get('device')}); base: {base_path} "
             f"({base['meta'].get('date')}, {base['meta'].get('device')}). nan = row absent from the base run.")
    write_results(out, "New vs base run", header, rows, new["meta"], notes)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--out", default=None, help="results name (default kernels_<device>)")
    ap.add_argument("--formats", default=None, help="comma list of " + ",".join(FORMATS))
    ap.add_argument("--shapes", default=None, help="comma list of KxN")
    ap.add_argument("--batches", default=None, help="comma list of M")
    ap.add_argument("--sweep", action="store_true", help="also time fma tilings (largest shape, M=1, int4/int2)")
    ap.add_argument("--compare", nargs=2, metavar=("NEW_JSON", "BASE_JSON"), help="only join two result files")
    a = ap.parse_args(argv)
    if a.compare:
        compare(*a.compare, a.out or "compare")
        return 0
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else None
    batches = [int(v) for v in a.batches.split(",")] if a.batches else None
    formats = a.formats.split(",") if a.formats else None
    out = a.out or ("kernels_quick" if a.quick else "kernels_" + jax.devices()[0].platform)
    check_correct(a.quick)
    run(a.quick, out, shapes, batches, formats, a.sweep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
