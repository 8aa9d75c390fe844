"""One Switch MoE layer decode step (router + top-1 dispatch + experts + combine): bf16 vs int4 vs int2 experts.

Base shape: switch-base-128 (E=128, D=768, F=3072, ReLU MLP), B ∈ {1, 16, 64} decode tokens (one group).
Two expert layouts:

* ``capacity``: the model's layout (Flaxformer): tokens scattered into ``[E, C, D]``, every expert computed
  (``moqe_jax.ops.grouped_qmatmul``; the kernel's grouped launch over all E experts);
* ``active``: one slot per token, slot ``b`` multiplies by ``W[expert[b]]`` — only chosen experts are read
  (kernel: ``moqe_jax.ops.indexed_qmatmul``, one launch; bf16 XLA: gather the chosen experts' weights, then a
  batched dot).

Routing uses ``moqe_jax.model.routing`` (top-1, in-order priority, capacity of spec §4.8).

``--layer``: the model's own ``MoeLayer`` on a decode step ``x [B, 1, D]``, ``routing_mode="t5x"`` (capacity
layout, every expert computed) vs ``"dropless"`` (slots sorted by expert, ``ops.ragged_qmatmul`` over the
active experts only) vs the floor (the distinct chosen experts' matmuls alone, their weights pre-sliced),
float and int4 experts, medians of ≥ 5 rounds over rotating token sets, compile time reported separately.
Notes and expectations: benchmarks/results/moe_decode_notes.md.

    python -m benchmarks.moe_decode [--quick]
    python -m benchmarks.moe_decode --layer [--quick] [--formats float32,int4] [--batches 1,16] [--cold]
    python -m benchmarks.moe_decode --forward [--rounds 7]     # whole model, batch 8: t5x vs hf vs dropless
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import copy_bandwidth, device_info, time_rotated, write_results
from benchmarks.kernels import random_qt
from moqe_jax import ops
from moqe_jax.config import SwitchConfig
from moqe_jax.model import routing
from moqe_jax.model.layers import MoeLayer
from moqe_jax.packed.qtensor import convert_layout
from moqe_jax.packed.spec import QuantSpec
from pallas_kernels import backend

CAPACITY_FACTOR = 2.0  # switch eval capacity factor
MIN_CAPACITY = 4


def _route(x: jax.Array, router: jax.Array, e: int, cap: int):
    probs = jax.nn.softmax(x.astype(jnp.float32) @ router, axis=-1)
    return routing.top1_route(probs[None], cap)


def layer_capacity(x, router, wi, wo, *, mode: str):
    """Capacity layout: ``[B, D]`` -> ``[B, D]`` (f32), every expert computed."""
    b, d = x.shape
    e = router.shape[-1]
    cap = routing.expert_capacity(b, e, CAPACITY_FACTOR, MIN_CAPACITY)
    r = _route(x, router, e, cap)
    slot = jnp.where(r.kept[0], r.expert[0] * cap + r.priority[0], e * cap)
    buf = jnp.zeros((e * cap, d), x.dtype).at[slot].set(x, mode="drop").reshape(e, cap, d)
    h = jax.nn.relu(ops.grouped_qmatmul(buf, wi, mode=mode))
    o = ops.grouped_qmatmul(h, wo, mode=mode).reshape(e * cap, d)
    y = o[jnp.minimum(slot, e * cap - 1)].astype(jnp.float32) * r.gate[0][:, None]
    return jnp.where(r.kept[0][:, None], y, 0.0)


def layer_active(x, router, wi, wo, *, impl: str):
    """Active layout: one slot per token, only the chosen experts' weights are read."""
    e = router.shape[-1]
    r = _route(x, router, e, x.shape[0])
    ids = r.expert[0]
    xs = x[:, None, :]
    if impl == "xla":  # bf16 (or dequantized) weights gathered per token, then a batched dot
        def mm(a, w):  # gather the chosen experts first (packed, if quantized), then dequantize only those
            return jnp.einsum("bcd,bdf->bcf", a, ops.dequantize_weight(w[ids], a.dtype))
    else:
        def mm(a, w):
            return ops.indexed_qmatmul(a, w, ids, mode=impl)
    h = jax.nn.relu(mm(xs, wi))
    o = mm(h, wo)[:, 0]
    return o.astype(jnp.float32) * r.gate[0][:, None]


def run(quick: bool, out: str, batches: list[int] | None = None) -> list[list]:
    gpu = backend.gpu_kernels_available()
    kmode = "pallas" if gpu else "interpret"
    e, d, f = (4, 64, 128) if quick else (128, 768, 3072)
    batches = batches or ([1, 3] if quick else [1, 16, 64])
    meta = device_info()
    bw = copy_bandwidth(quick=quick)
    meta.update(copy_bandwidth_GBps=bw / 1e9, experts=e, d_model=d, d_ff=f,
                weight_layout="words" if gpu else "bytes")
    key = jax.random.key(7)
    n_w = 2  # two independent layers' weights, alternated, so L2 does not hold the chosen experts
    routers = [jax.random.normal(k, (d, e), jnp.float32) for k in jax.random.split(jax.random.key(3), n_w)]
    weights = {"bf16": [(jax.random.normal(k1, (e, d, f), jnp.bfloat16) * 0.02,
                         jax.random.normal(k2, (e, f, d), jnp.bfloat16) * 0.02)
                        for k1, k2 in jax.random.split(key, (n_w, 2))]}
    for name, spec in (("int4", QuantSpec(4)), ("int2", QuantSpec(2))):
        ws = []
        for k1, k2 in jax.random.split(jax.random.fold_in(key, 1), (n_w, 2)):
            wi = jax.vmap(lambda kk, s=spec: random_qt(kk, s, d, f))(jax.random.split(k1, e))
            wo = jax.vmap(lambda kk, s=spec: random_qt(kk, s, f, d))(jax.random.split(k2, e))
            ws.append((wi, wo))
        # on GPU the packed experts are held in the kernels' stored word layout (docs/KERNELS.md §2), as a decode
        # loop that wants the word GEMV holds them; on CPU (interpret mode) the byte layout is kept
        weights[name] = convert_layout(ws, "words") if gpu else ws
    rows: list[list] = []
    # correctness of the benchmarked paths (fresh random tokens), int4 vs its XLA reference
    xc = jax.random.normal(jax.random.key(int(np.random.default_rng().integers(1 << 30))), (3, d), jnp.bfloat16)
    wi, wo = weights["int4"][0]
    ref = np.asarray(layer_active(xc, routers[0], wi, wo, impl="xla"), np.float64)
    for got in (layer_active(xc, routers[0], wi, wo, impl=kmode if gpu else "interpret"),
                layer_capacity(xc, routers[0], wi, wo, mode=kmode)):
        err = float(np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref))
        print(f"check moe layer int4 kernel vs XLA: rel err {err:.2e}", flush=True)
        if not err < 2e-2:
            raise SystemExit(f"MoE layer kernel path wrong: rel err {err}")
    n_x = 2 if quick else 8
    for b in batches:
        xs = [jax.random.normal(k, (b, d), jnp.bfloat16) for k in jax.random.split(jax.random.key(b), n_x)]
        base = {}
        for fmt, ws in weights.items():
            sets = [(xs[i], routers[i % n_w], *ws[i % n_w]) for i in range(n_x)]
            if fmt == "bf16":
                cases = [("capacity", "bf16 XLA", lambda x, r, a, c: layer_capacity(x, r, a, c, mode="xla")),
                         ("active", "bf16 XLA gather", lambda x, r, a, c: layer_active(x, r, a, c, impl="xla"))]
            else:
                cases = [("capacity", f"{fmt} kernel", lambda x, r, a, c: layer_capacity(x, r, a, c, mode=kmode)),
                         ("active", f"{fmt} kernel", lambda x, r, a, c: layer_active(x, r, a, c, impl=kmode))]
                if fmt == "int4":
                    cases.append(("active", "int4 XLA dequant", lambda x, r, a, c: layer_active(x, r, a, c,
                                                                                                impl="xla")))
            for layout, label, fn in cases:
                t = time_rotated(fn, sets, quick=quick)
                if fmt == "bf16":
                    base[layout] = t
                best_bf16 = min(base.values()) if base else t
                rows.append([b, layout, label, t * 1e6, base.get(layout, t) / t, best_bf16 / t])
                print(rows[-1], flush=True)
    header = ["tokens", "layout", "experts", "time µs", "× vs bf16 same layout", "× vs best bf16"]
    notes = (f"One MoE layer decode step, E={e}, D={d}, F={f} (ReLU), top-1, capacity factor {CAPACITY_FACTOR} "
             f"(min {MIN_CAPACITY}). Two layers' weights alternate across {n_x} token sets. Copy bandwidth "
             f"{bw / 1e9:.0f} GB/s.{'' if gpu else ' INTERPRET MODE (CPU smoke test): times are meaningless.'}")
    write_results(out, "MoE layer decode step: bf16 vs int4 vs int2 experts", header, rows, meta, notes)
    return rows


# ---- --layer: the model's MoeLayer, t5x capacity vs dropless vs the floor ----------------------------------
def _timed_compile(fn, *args):
    t0 = time.perf_counter()
    c = jax.jit(fn).lower(*args).compile()
    return c, time.perf_counter() - t0


_FLUSH: list[np.ndarray] = []


def _flush_caches() -> None:
    """Evict the CPU caches (read + write 64 MiB, more than this machine's L3): the next call reads its weights
    from DRAM, as a decode step of a real model does (each layer's experts are evicted by the other layers')."""
    if not _FLUSH:
        _FLUSH.append(np.zeros(8 << 20))
    _FLUSH[0] += 1.0


def _median_per_call(cases: dict[str, list], rounds: int, cold: bool = False) -> dict[str, float]:
    """Per case, the median over ``rounds`` of the mean seconds of one call. Each round runs every case's
    ``(fn, args)`` calls once, the cases interleaved call by call (so load from other processes hits all alike)
    in an order rotated per call (so no case always runs right after another read the same weights).
    ``cold``: the caches are flushed (untimed) before every call."""
    per: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for _ in range(rounds):
        tot = dict.fromkeys(cases, 0.0)
        for i in range(max(len(c) for c in cases.values())):
            for name in names[i % len(names):] + names[:i % len(names)]:
                calls = cases[name]
                if i < len(calls):
                    fn, args = calls[i]
                    if cold:
                        _flush_caches()
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*args))
                    tot[name] += time.perf_counter() - t0
        for name, calls in cases.items():
            per[name].append(tot[name] / len(calls))
    return {name: statistics.median(v) for name, v in per.items()}


def _expert_weights(fmt: str, key: jax.Array, e: int, d: int, f: int):
    k1, k2 = jax.random.split(key)
    if fmt in ("float32", "bfloat16"):
        dt = jnp.dtype(fmt)
        return (jax.random.normal(k1, (e, d, f), dt) * d ** -0.5, jax.random.normal(k2, (e, f, d), dt) * f ** -0.5)
    spec = {"int4": QuantSpec(4), "int2": QuantSpec(2)}[fmt]
    return (jax.vmap(lambda kk: random_qt(kk, spec, d, f))(jax.random.split(k1, e)),
            jax.vmap(lambda kk: random_qt(kk, spec, f, d))(jax.random.split(k2, e)))


def run_layer(quick: bool, out: str, batches: list[int] | None = None, formats: list[str] | None = None,
              rounds: int = 5, n_sets: int = 4, kernels: str = "auto", cold: bool = False) -> list[list]:
    """Decode step of one MoE layer through ``MoeLayer``: t5x capacity vs dropless vs floor."""
    gpu = backend.gpu_kernels_available()
    e, d, f = (16, 64, 128) if quick else (128, 768, 3072)
    batches = batches or [1, 16]
    formats = formats or (["bfloat16", "int4"] if gpu else ["float32", "int4"])
    meta = device_info()
    meta.update(experts=e, d_model=d, d_ff=f, rounds=rounds, token_sets=n_sets, kernels=kernels, cold_caches=cold,
                weight_layout="words" if gpu else "bytes")
    rows: list[list] = []
    router = jax.random.normal(jax.random.key(3), (d, e), jnp.float32) * d ** -0.5
    for fmt in formats:
        act = "bfloat16" if fmt == "bfloat16" else "float32"
        base = SwitchConfig.preset("tiny", d_model=d, d_ff=f, num_experts=e, dtype=act, max_group_size=2048,
                                   eval_capacity_factor=CAPACITY_FACTOR, min_expert_capacity=MIN_CAPACITY)
        wi, wo = _expert_weights(fmt, jax.random.fold_in(jax.random.key(7), len(fmt)), e, d, f)
        if gpu:  # stored word layout for the packed experts on GPU (docs/KERNELS.md §2)
            wi, wo = convert_layout((wi, wo), "words")
        params = {"router": {"router_weights": {"w": {"kernel": router}}},
                  "expert": {"wi": {"kernel": wi}, "wo": {"kernel": wo}}}
        layers = {mode: MoeLayer(base.replace(routing_mode=mode), kernels) for mode in ("t5x", "dropless")}
        for b in batches:
            xs = [jax.random.normal(k, (b, 1, d), jnp.dtype(act)) for k in jax.random.split(jax.random.key(b), n_sets)]
            fns, compile_s = {}, {}
            for mode, layer in layers.items():
                fns[mode], compile_s[mode] = _timed_compile(
                    lambda p, x, layer=layer: layer.apply({"params": p}, x)[0], params, xs[0])
            # floor: per token set, the distinct chosen experts' pre-sliced weights times their tokens, two ways:
            # one jit over all chosen experts, and one jitted call per expert (XLA CPU runs the independent
            # experts of the one-jit form concurrently, which can be slower); the faster one is the floor
            floor_calls, seq_calls, floor_c = [], [], 0.0
            route = jax.jit(lambda p, x, layer=layers["dropless"]: layer.apply({"params": p}, x)[1]["expert"])
            one = {}
            for x in xs:
                ids = np.asarray(route(params, x)).reshape(-1)
                groups = {int(ex): np.flatnonzero(ids == ex) for ex in np.unique(ids)}
                ws = tuple((wi[ex], wo[ex]) for ex in groups)
                xe = tuple(x[t, 0] for t in groups.values())

                def floor(xe, ws):
                    return jnp.concatenate([ops.qmatmul(jax.nn.relu(ops.qmatmul(xt, a, mode=kernels)), c, mode=kernels)
                                            for xt, (a, c) in zip(xe, ws, strict=True)])
                fc, cs = _timed_compile(floor, xe, ws)
                floor_c = max(floor_c, cs)
                floor_calls.append((fc, (xe, ws)))
                for xt, (a, c) in zip(xe, ws, strict=True):
                    if xt.shape not in one:
                        one[xt.shape], cs = _timed_compile(
                            lambda xt, a, c: ops.qmatmul(jax.nn.relu(ops.qmatmul(xt, a, mode=kernels)), c,
                                                         mode=kernels), xt, a, c)
                        floor_c = max(floor_c, cs)

                def per_expert(xe, ws, one=one):
                    return [jax.block_until_ready(one[xt.shape](xt, a, c)) for xt, (a, c) in zip(xe, ws, strict=True)]
                # its own copy of the pre-sliced experts: the two floor forms must not warm each other's weights
                seq_calls.append((per_expert, (xe, jax.tree.map(jnp.copy, ws))))
            # check: dropless equals t5x (no drops at these shapes) on every set
            for x in xs[:2]:
                y_t, y_d = np.asarray(fns["t5x"](params, x), np.float64), np.asarray(fns["dropless"](params, x),
                                                                                     np.float64)
                err = float(np.abs(y_d - y_t).max() / np.abs(y_t).max())
                if not err <= (1e-2 if act == "bfloat16" else 1e-5):
                    raise SystemExit(f"dropless != t5x ({fmt}, {b} tokens): rel err {err:.2e}")
            r = rounds if not quick else 2
            t = _median_per_call({"floor": floor_calls, "floor_seq": seq_calls,
                                  "dropless": [(fns["dropless"], (params, x)) for x in xs]}, r, cold)
            t_floor, t_drop = min(t["floor"], t["floor_seq"]), t["dropless"]
            print(f"floor: one jit {t['floor'] * 1e3:.3g} ms, per-expert calls {t['floor_seq'] * 1e3:.3g} ms",
                  flush=True)
            meta.setdefault("floor_forms_ms", {})[f"{fmt} {b}"] = {"one_jit": t["floor"] * 1e3,
                                                                    "per_expert_calls": t["floor_seq"] * 1e3}
            t_cap = _median_per_call({"t5x": [(fns["t5x"], (params, xs[0]))]}, r, cold)["t5x"]
            for name, t, c in (("floor (chosen experts' matmuls)", t_floor, floor_c),
                               ("dropless", t_drop, compile_s["dropless"]),
                               ("t5x capacity", t_cap, compile_s["t5x"])):
                rows.append([b, fmt, name, t * 1e3, t / t_floor, c])
                print(rows[-1], flush=True)
            del fns, floor_calls, seq_calls
            _write_layer(out, rows, meta, e, d, f, kernels, rounds, n_sets, cold)  # a timed-out run keeps its rows
    return rows


def _write_layer(out: str, rows: list[list], meta: dict, e: int, d: int, f: int, kernels: str, rounds: int,
                 n_sets: int, cold: bool) -> None:
    header = ["tokens", "experts", "path", "time ms (median)", "× floor", "compile s"]
    notes = (f"One MoeLayer decode step x [B, 1, D], E={e}, D={d}, F={f} (ReLU), top-1, t5x capacity factor "
             f"{CAPACITY_FACTOR} (min {MIN_CAPACITY}), kernels={kernels!r}. Median over {rounds} rounds; each round "
             f"runs {n_sets} token sets once (different chosen experts), floor and dropless interleaved call by "
             "call in a rotated order, and reports the mean per call (the t5x path: one set, run after them). "
             "Floor: the distinct chosen experts' weights pre-sliced, each expert's tokens × its weights "
             "(int4: dequantize that expert + matmul), nothing else; the faster of one jit over all chosen "
             "experts and one jitted call per expert (both in the json meta; each form reads its own copy of the "
             "weights). dropless was checked equal to t5x on two sets before timing. Compile time: jit "
             "lower+compile of one call, separate from the times."
             + (" Cold caches: 64 MiB read+written (untimed) before every timed call, so every path reads its "
                "weights from DRAM." if cold else " Warm: no cache flush between calls (a path may find weights "
                "another path just read in L3: warm-biased; cold caches are a decode step's real situation)."))
    write_results(out, "MoE layer decode step: t5x capacity vs dropless vs floor", header, rows, meta, notes)


def run_forward(out: str, preset: str = "small-mt", batch: int = 8, length: int = 32, rounds: int = 7) -> list[list]:
    """Whole-model forward (``Model.logits``, f32, random weights) per routing mode: "hf" on the sorted
    machinery vs the default "t5x" capacity path vs "dropless"; modes interleaved, median of ``rounds``."""
    from moqe_jax import api
    from moqe_jax.tree import unflatten_params

    cfg = SwitchConfig.preset(preset, dtype="float32")
    rng = np.random.default_rng(0)
    flat = {}
    for path, shape in api.param_shapes(cfg).items():
        leaf = path.rsplit("/", 1)[-1]
        std = 1.0 if (leaf == "scale" or "embedd" in path) else 1.0 / np.sqrt(shape[-2] if len(shape) > 1 else 1)
        flat[path] = jnp.asarray(rng.standard_normal(shape) * std + (1.0 if leaf == "scale" else 0.0), jnp.float32)
    params = unflatten_params(flat)
    ids = rng.integers(2, cfg.vocab_size, (batch, length)).astype(np.int32)
    dec = rng.integers(2, cfg.vocab_size, (batch, length)).astype(np.int32)
    modes = ("t5x", "hf", "dropless")
    fns, comp = {}, {}
    for m in modes:
        fns[m], comp[m] = _timed_compile(lambda p, m=m: api.Model(cfg.replace(routing_mode=m), p).logits(ids, dec),
                                         params)
    t = _median_per_call({m: [(fns[m], (params,))] for m in modes}, rounds)
    rows = [[m, t[m] * 1e3, t[m] / t["t5x"], comp[m]] for m in modes]
    for r in rows:
        print(r, flush=True)
    meta = device_info()
    meta.update(preset=preset, batch=batch, length=length, rounds=rounds)
    notes = (f"Model.logits of the {preset} preset shape (E={cfg.num_experts}, D={cfg.d_model}, F={cfg.d_ff}, "
             f"{cfg.num_layers}+{cfg.num_decoder_layers} layers), random f32 weights, batch {batch}, {length} "
             f"encoder and {length} decoder tokens; median of {rounds} rounds, the modes interleaved.")
    write_results(out, "Forward per routing mode: t5x vs hf vs dropless", ["routing_mode", "time ms (median)",
                  "× t5x", "compile s"], rows, meta, notes)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default=None, help="comma list of decode token counts")
    ap.add_argument("--layer", action="store_true",
                    help="the model's MoeLayer: t5x capacity vs dropless vs the chosen experts' floor")
    ap.add_argument("--formats", default=None, help="--layer: comma list of float32,bfloat16,int4,int2")
    ap.add_argument("--rounds", type=int, default=5, help="--layer/--forward: timing rounds (median)")
    ap.add_argument("--cold", action="store_true", help="--layer: flush the CPU caches before every timed call")
    ap.add_argument("--sets", type=int, default=4, help="--layer: token sets per round (different chosen experts)")
    ap.add_argument("--forward", action="store_true",
                    help="whole-model forward per routing mode (t5x / hf / dropless), small-mt shape, batch 8")
    a = ap.parse_args(argv)
    batches = [int(v) for v in a.batches.split(",")] if a.batches else None
    if a.forward:
        run_forward(a.out or "moe_forward_" + jax.devices()[0].platform, rounds=max(a.rounds, 1))
        return 0
    if a.layer:
        plat = jax.devices()[0].platform  # CPU: moe_decode_cpu.md; GPU: moe_layer_gpu.md (moe_decode_gpu = kernels)
        out = a.out or ("moe_layer_quick" if a.quick else ("moe_decode_cpu" if plat == "cpu" else "moe_layer_" + plat))
        run_layer(a.quick, out, batches, a.formats.split(",") if a.formats else None, rounds=max(a.rounds, 1),
                  n_sets=max(a.sets, 1), cold=a.cold)
        return 0
    if not backend.gpu_kernels_available() and not a.quick:
        print("no GPU kernels: use --quick on CPU", file=sys.stderr)
    out = a.out or ("moe_decode_quick" if a.quick else "moe_decode_" + jax.devices()[0].platform)
    run(a.quick, out, batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
