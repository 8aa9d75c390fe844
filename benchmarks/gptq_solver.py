"""Batched (vmap + jit, optionally expert-sharded) GPTQ vs a per-expert loop of the same jitted solver.

QMoE Table 1 measures the same thing with torch (|E| = 1 / 4 / 16 experts per ``batch_gptq`` call:
174.1 / 54.4 / 28.8 s for a base128 sparse layer). Here:

* ``loop``: ``moqe_jax.quant.gptq.solve_one_jit`` called once per expert (one dispatch per expert,
  the column loop inside jit);
* ``batched``: ``gptq_quantize``'s jitted ``vmap`` over a group of experts (``--group``), sharded over
  all local devices (``expert`` mesh axis) when there is more than one.

Compilation is excluded (one warm-up call each). Shapes: ``--shape small`` (CPU-friendly) or
``--shape small-mt`` (the bundled model's experts, E=8, 256×1024 / 1024×256) or
``--shape base128`` (switch-base-128 expert stacks: E=128, ``wi`` 768×3072 and ``wo`` 3072×768; GPU).

  python -m benchmarks.gptq_solver                       # CPU, small shapes
  python -m benchmarks.gptq_solver --shape base128       # GPU run (writes gptq_solver_gpu.md)
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from benchmarks.common import device_info, write_results
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.gptq import _batched_fn, actorder_perm, solve_one_jit

SHAPES = {
    "small": [("wi 64x256", 64, 256), ("wo 256x64", 256, 64)],
    "small-mt": [("wi 256x1024", 256, 1024), ("wo 1024x256", 1024, 256)],
    "base128": [("wi 768x3072", 768, 3072), ("wo 3072x768", 3072, 768)],
}


def _problem(e: int, k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((e, k, n)) * 0.05).astype(np.float32)
    # correlated inputs, a different mixing per expert group (cheap to build for large K)
    t = max(2 * k, 256)
    mix = (np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)
    h = np.empty((e, k, k), np.float32)
    for i in range(e):
        x = rng.standard_normal((t, k)).astype(np.float32) @ mix * rng.uniform(0.5, 2.0, k).astype(np.float32)
        h[i] = 2 * x.T @ x
    return w, h


def bench(label: str, e: int, k: int, n: int, group: int, spec: QuantSpec, actorder: bool, reps: int) -> list:
    w, h = _problem(e, k, n)
    ndev = jax.device_count()
    mesh = jax.make_mesh((ndev,), ("expert",)) if ndev > 1 else None
    grp = -(-group // ndev) * ndev
    fn = _batched_fn(spec, 0.1, 128, actorder, 1, mesh, "expert")
    perms = actorder_perm(h) if actorder else np.zeros((e, k), np.int32)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert")) if mesh else jax.devices()[0]
    groups = [tuple(jax.device_put(a[s:s + grp], sh) for a in (w, h, perms)) for s in range(0, e, grp)]
    singles = [(jax.device_put(w[i], jax.devices()[0]), jax.device_put(h[i], jax.devices()[0])) for i in range(e)]

    def run_batched():
        with jax.default_matmul_precision("highest"):
            return [fn(*g) for g in groups]

    def run_loop():
        return [solve_one_jit(a, b, spec, actorder=actorder) for a, b in singles]

    out_b = jax.block_until_ready(run_batched())  # compile + warm-up
    out_l = jax.block_until_ready(run_loop())
    same = all(np.array_equal(np.asarray(out_b[i // grp]["codes"][i % grp]), np.asarray(out_l[i]["codes"]))
               for i in range(e))
    times = {}
    for name, f in (("batched", run_batched), ("loop", run_loop)):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            ts.append(time.perf_counter() - t0)
        times[name] = float(np.median(ts))
    return [label, e, grp, ndev, times["batched"], times["loop"], times["loop"] / times["batched"],
            1e3 * times["batched"] / e, "yes" if same else "NO"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="small")
    ap.add_argument("--experts", type=int, default=None, help="experts per layer (default 16 small / 128 base128)")
    ap.add_argument("--group", type=int, default=16, help="experts per batched call (QMoE par_exp=16)")
    ap.add_argument("--bits", default="ternary")
    ap.add_argument("--actorder", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--note", default="", help="extra note for the results file (e.g. host load)")
    args = ap.parse_args(argv)
    spec = QuantSpec(bits="ternary") if args.bits == "ternary" else QuantSpec(bits=int(args.bits), symmetric=False)
    e = args.experts or {"small": 16, "small-mt": 8, "base128": 128}[args.shape]
    rows = [bench(label, e, k, n, args.group, spec, args.actorder, args.reps) for label, k, n in SHAPES[args.shape]]
    meta = device_info()
    tot_b = sum(r[4] for r in rows)
    tot_l = sum(r[5] for r in rows)
    rows.append(["total (wi + wo)", e, rows[0][2], rows[0][3], tot_b, tot_l, tot_l / tot_b, 1e3 * tot_b / e, ""])
    name = f"gptq_solver_{meta['platform']}" + ("" if args.shape == "small" else f"_{args.shape}")
    note = "Median of --reps runs, compile excluded. Same jitted single-expert solver in both; the batched call " \
        "vmaps it over `group` experts (QMoE Table 1: |E|=16 is 6x faster than 1)."
    note += (" " + args.note) if args.note else ""
    write_results(name, f"GPTQ solver: batched vmap+jit vs per-expert loop ({spec.describe()}, shape {args.shape})",
                  ["matrix", "E", "group", "devices", "batched s", "loop s", "speed-up", "ms/expert batched",
                   "codes identical"], rows, meta,
                  notes=note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
