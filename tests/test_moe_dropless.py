"""Dropless MoE dispatch (``routing_mode="dropless"``) and ``ops.ragged_qmatmul``.

References: a NumPy float64 grouped matmul written from the definition (rows sorted by expert, one group per
expert), a NumPy float64 top-k MoE layer, and the Flaxformer-faithful ``routing_mode="t5x"`` path itself
(bit-checked against NumPy in tests/test_model_switch.py) whenever it drops no token.

Tolerances: float32 logits ≤ 1e-6 relative (the two paths compute each token's expert MLP as the same
row × W[e] dot; only XLA's blocking of the dot differs — capacity layout ``[E, G·C, D]`` einsum vs one row or
one tile — so the f32 sums may differ in the last bits). bfloat16: the same per-row dots, but each expert
matmul output is rounded to bf16, so a last-bit difference in the f32 accumulation can flip one bf16 rounding
(relative 2^-8 on that element) and propagate; the bound is a few bf16 ulps of the logit scale.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_tiny_model

import moqe_jax
from moqe_jax import ops
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import ConfigError
from moqe_jax.model import routing
from moqe_jax.model.layers import MoeLayer
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.sub1 import encode


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _np_ragged(x, w, sizes):
    """NumPy f64: rows of group e (in order) times w[e]; rows past the total are 0."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y = np.zeros((x.shape[0], w.shape[2]))
    r = 0
    for e, s in enumerate(sizes):
        y[r:r + s] = x[r:r + s] @ w[e]
        r += s
    return y


def _sizes(rng, m, e, mode):
    if mode == "one":  # every row to one expert
        s = np.zeros(e, int)
        s[rng.integers(e)] = m
    elif mode == "short":  # fewer rows in groups than rows (tail rows belong to no expert)
        s = np.bincount(rng.integers(0, e, max(m - 2, 0)), minlength=e)
    else:  # random, most experts empty when m < e
        s = np.bincount(rng.integers(0, e, m), minlength=e)
    return s.astype(np.int32)


def _packed(rng, kind, e, k, n):
    if kind == "float":
        return jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32)
    spec = QuantSpec(4) if kind == "int4" else QuantSpec(2, symmetric=False)
    codes = rng.integers(0, spec.maxq + 1, (e, k, n))
    scales = rng.uniform(0.5, 1.0, (e, 1, n))
    zeros = rng.integers(0, spec.maxq + 1, (e, 1, n)) if spec.has_zeros else None
    return QuantizedTensor.from_codes(codes, scales, zeros, spec)


@pytest.mark.parametrize("kind", ["float", "int4", "int2"])
@pytest.mark.parametrize("m", [1, 5, 40])  # m < E: per-row slots (or the indexed kernel); m ≥ E: tiles
@pytest.mark.parametrize("sizes_mode", ["random", "one", "short"])
def test_ragged_qmatmul_matches_numpy(seed, kind, m, sizes_mode):
    rng = np.random.default_rng(seed)
    e, k, n = 8, 24, 20
    w = _packed(rng, kind, e, k, n)
    wf = np.asarray(ops.dequantize_weight(w, jnp.float32), np.float64)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    sizes = _sizes(rng, m, e, sizes_mode)
    ref = _np_ragged(x, wf, sizes)
    y = jax.jit(lambda x, w, g: ops.ragged_qmatmul(x, w, g, mode="xla"))(x, w, jnp.asarray(sizes))
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert _rel(y, ref) <= 1e-5
    assert ops.ragged_plan(x, w, mode="xla") == ("slots" if m < e else "tiles")
    if kind == "float":  # same semantics as jax.lax.ragged_dot (a dense O(E) reference on CPU)
        assert _rel(y, jax.lax.ragged_dot(x, w, jnp.asarray(sizes))) <= 1e-6


@pytest.mark.parametrize("kind", ["int4", "sub1"])
def test_ragged_qmatmul_kernel_interpret(seed, kind):
    """Fewer rows than experts and a packed weight: the indexed Pallas kernel (interpret mode) runs."""
    rng = np.random.default_rng(seed)
    e, k, n, m = 8, 64, 32, 3
    w = _sub1_weight(rng, e, k, n) if kind == "sub1" else _packed(rng, "int4", e, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    sizes = _sizes(rng, m, e, "random")
    assert ops.ragged_plan(x, w, mode="interpret") == "indexed"
    y = ops.ragged_qmatmul(x, w, jnp.asarray(sizes), mode="interpret")
    assert _rel(y, _np_ragged(x, ops.dequantize_weight(w, jnp.float32), sizes)) <= 1e-5


def _sub1_weight(rng, e, k, n):
    codes = rng.choice(3, size=(e, k, n), p=[0.85, 0.075, 0.075]).astype(np.uint8)
    return encode(QuantizedTensor.from_codes(codes, rng.uniform(0.1, 1, (e, 1, n)), -rng.uniform(0.1, 1, (e, 1, n)),
                                             QuantSpec(bits="ternary")))


@pytest.mark.parametrize("kind", ["int4", "int2", "sub1"])
@pytest.mark.parametrize("sizes_mode", ["random", "one", "short"])
def test_ragged_qmatmul_indexed_tiles_interpret(seed, kind, sizes_mode):
    """At least as many rows as experts and a packed weight (megablox-style): ONE launch of the indexed Pallas
    kernel (interpret mode) over (tile, expert) work items, equal to NumPy f64; empty experts, all rows to one
    expert and rows past the groups' total (0) included."""
    rng = np.random.default_rng(seed)
    e, k, n, m = 4, 64, 32, 37  # tm = 16: 3 tiles, group boundaries inside tiles
    w = _sub1_weight(rng, e, k, n) if kind == "sub1" else _packed(rng, kind, e, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    sizes = _sizes(rng, m, e, sizes_mode)
    assert ops.ragged_plan(x, w, mode="interpret") == "indexed_tiles"
    assert ops.ragged_plan(x, w, mode="xla") == "tiles"
    f = jax.jit(lambda x, w, g: ops.ragged_qmatmul(x, w, g, mode="interpret"))
    jaxpr = str(jax.make_jaxpr(f)(x, w, jnp.asarray(sizes)))
    assert jaxpr.count("pallas_call") == 1, "one kernel launch for all work items"
    y = f(x, w, jnp.asarray(sizes))
    assert y.shape == (m, n)
    assert _rel(y, _np_ragged(x, ops.dequantize_weight(w, jnp.float32), sizes)) <= 1e-5


@pytest.mark.parametrize("kind", ["int4-words", "sub1"])
def test_indexed_tiles_lowers_to_one_triton_kernel(seed, kind):
    """The prefill plan compiles for the GPU as ONE Triton kernel (lowered for CUDA on this machine, no GPU:
    benchmarks/ttir.py), for the word-layout dequant kernel and the sub-1-bit decoder."""
    from benchmarks.ttir import triton_modules

    rng = np.random.default_rng(seed)
    e, k, n, m = 8, 256, 384, 300
    if kind == "sub1":
        w = _sub1_weight(rng, e, k, n)
    else:
        w = QuantizedTensor.from_codes(rng.integers(0, 16, (e, k, n)), rng.uniform(.5, 1, (e, 1, n)), None,
                                       QuantSpec(4), layout="words")
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((e,), jnp.int32)
    assert ops.ragged_plan(x, w, mode="pallas") == "indexed_tiles"
    assert len(triton_modules(lambda x, w, g: ops.ragged_qmatmul(x, w, g, mode="pallas"), x, w, gs)) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m", [1, 3])
def test_ragged_qmatmul_chunks_plan(seed, dtype, m):
    """f32 experts over ``_CHUNK_MIN_BYTES`` on CPU: each row reads its expert in K-chunks (two streams summed
    in f32, cast once); bf16 ones stay whole slots; per row still that row times W[e] (NumPy f64; bf16: within
    the output's rounding)."""
    rng = np.random.default_rng(seed)
    e, k, n = 4, 256, 2560  # 2.6 MB per expert as f32: two 640 KiB blocks per stream
    assert 0 < ops._chunk_rows(k, n, 4) < k // ops._CHUNK_STREAMS  # the block loop runs more than once
    w = jnp.asarray(rng.standard_normal((e, k, n)), dtype)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    sizes = _sizes(rng, m, e, "random")
    assert ops.ragged_plan(x, w) == ("chunks" if dtype == "float32" else "slots")
    assert ops.ragged_plan(x, w[:, :, :64]) == "slots"
    y = jax.jit(lambda x, w, g: ops.ragged_qmatmul(x, w, g))(x, w, jnp.asarray(sizes))
    assert y.shape == (m, n) and y.dtype == jnp.dtype(dtype)
    assert _rel(y, _np_ragged(x, w, sizes)) <= (1e-5 if dtype == "float32" else 2 ** -7)


def test_ragged_qmatmul_bf16_weight_grad(seed):
    """bf16 experts are sliced through a uint16 view: the gradient still flows (d sum(y) / d W[e] = the sum of
    group e's rows, broadcast over N; NumPy f64), and experts without rows get 0."""
    rng = np.random.default_rng(seed)
    e, k, n, m = 4, 256, 24, 3
    w = jnp.asarray(rng.standard_normal((e, k, n)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    sizes = _sizes(rng, m, e, "random")
    g = jax.jit(jax.grad(lambda w: jnp.sum(ops.ragged_qmatmul(x, w, jnp.asarray(sizes)).astype(jnp.float32))))(w)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    xs = np.asarray(x, np.float64)
    ref = np.stack([np.broadcast_to(xs[starts[i]:starts[i + 1]].sum(0)[:, None], (k, n)) for i in range(e)])
    assert g.dtype == jnp.bfloat16 and _rel(g, ref) <= 2 ** -7


def test_bf16_dropless_has_no_f32_expert_stack():
    """XLA:CPU converts the whole bf16 operand of a dynamic-slice to f32 (float normalization) and copies a
    whole-stack bitcast-convert: neither may happen, so the compiled layer holds no f32
    value of an expert stack's shape and its temp memory stays under half of one bf16 stack (slots, tiles)."""
    e, d = 16, 256
    for f, b in ((128, 2), (128, 16)):  # slots, tiles (b·1·k ≥ E)
        cfg = SwitchConfig.preset("tiny", d_model=d, d_ff=f, num_experts=e, dtype="bfloat16", routing_mode="dropless")
        params = {"router": {"router_weights": {"w": {"kernel": jnp.zeros((d, e))}}},
                  "expert": {"wi": {"kernel": jnp.zeros((e, d, f), jnp.bfloat16)},
                             "wo": {"kernel": jnp.zeros((e, f, d), jnp.bfloat16)}}}
        x = jnp.zeros((b, 1, d), jnp.bfloat16)
        layer = MoeLayer(cfg)
        c = jax.jit(lambda p, x, layer=layer: layer.apply({"params": p}, x)[0]).lower(params, x).compile()
        hlo = c.as_text()
        assert f"bf16[{e},{d},{f}]" in hlo  # the stacks themselves are in the module
        assert f"f32[{e},{d},{f}]" not in hlo and f"f32[{e},{f},{d}]" not in hlo, (f, b)
        assert c.memory_analysis().temp_size_in_bytes < e * d * f * 2 / 2, (f, b)


def test_ragged_qmatmul_bad_shapes():
    w = jnp.zeros((4, 8, 6))
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        ops.ragged_qmatmul(jnp.zeros((3, 7)), w, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="group_sizes"):
        ops.ragged_qmatmul(jnp.zeros((3, 8)), w, jnp.zeros(3, jnp.int32))
    assert ops.ragged_qmatmul(jnp.zeros((0, 8)), w, jnp.zeros(4, jnp.int32)).shape == (0, 6)


def test_routing_mode_validated():
    with pytest.raises(ConfigError, match="dropless"):
        SwitchConfig(routing_mode="capacity")
    assert SwitchConfig(routing_mode="dropless").routing_mode == "dropless"


def test_sort_unsort_topk_roundtrip(seed):
    rng = np.random.default_rng(seed)
    t, k, e = 9, 3, 5
    expert = rng.integers(0, e + 1, (t, k)).astype(np.int32)  # value e = dropped
    s = routing.sort_slots(jnp.asarray(expert), e)
    flat = expert.reshape(-1)
    np.testing.assert_array_equal(np.asarray(s.group_sizes), np.bincount(flat, minlength=e + 1)[:e])
    np.testing.assert_array_equal(np.asarray(s.order), np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.asarray(s.token), np.argsort(flat, kind="stable") // k)
    vals = jnp.asarray(rng.standard_normal((t * k, 4)), jnp.float32)
    back = routing.unsort_slots(vals[s.order], s.order, k)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(vals).reshape(t, k, 4))


# ---- the MoE layer ------------------------------------------------------------------------------
def _layer_params(rng, e, d, f):
    return {"router": {"router_weights": {"w": {"kernel": jnp.asarray(rng.standard_normal((d, e)), jnp.float32)}}},
            "expert": {"wi": {"kernel": jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), jnp.float32)},
                       "wo": {"kernel": jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), jnp.float32)}}}


def _np_layer(x, p, k):
    """NumPy f64 top-k dropless MoE layer: sum over the k best experts of gate · relu(x W_i) W_o."""
    x = np.asarray(x, np.float64)
    wr = np.asarray(p["router"]["router_weights"]["w"]["kernel"], np.float64)
    wi = np.asarray(p["expert"]["wi"]["kernel"], np.float64)
    wo = np.asarray(p["expert"]["wo"]["kernel"], np.float64)
    lg = x @ wr
    pr = np.exp(lg - lg.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        for ex in np.argsort(-pr[idx], kind="stable")[:k]:
            out[idx] += pr[idx][ex] * (np.maximum(x[idx] @ wi[ex], 0) @ wo[ex])
    return out


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shape", [(1, 3), (2, 16)])  # slots path (B·L·k < E) and tiles path
def test_dropless_layer_matches_numpy_topk(seed, k, shape):
    rng = np.random.default_rng(seed)
    e, d, f = 8, 16, 24
    cfg = SwitchConfig.preset("tiny", d_model=d, d_ff=f, num_experts=e, dtype="float32", routing_mode="dropless")
    p = _layer_params(rng, e, d, f)
    x = rng.standard_normal((*shape, d)).astype(np.float32)
    out, info = MoeLayer(cfg, num_selected=k).apply({"params": p}, jnp.asarray(x))
    assert out.dtype == jnp.float32 and float(info["dropped_fraction"]) == 0.0
    assert _rel(out, _np_layer(x, p, k)) <= 1e-5


@pytest.mark.parametrize("mode", ["hf"])  # "t5x" has Flaxformer's top-k since issue 17 (test_moe_routing_options)
def test_topk_needs_dropless(mode):
    cfg = SwitchConfig.preset("tiny", routing_mode=mode)
    p = _layer_params(np.random.default_rng(0), 4, 32, 64)
    with pytest.raises(ConfigError, match="top-k needs routing_mode='dropless'"):
        MoeLayer(cfg, num_selected=2).apply({"params": p}, jnp.zeros((1, 2, 32)))


def test_dropless_keeps_what_t5x_drops(seed):
    """With capacity drops, t5x zeroes the dropped tokens; dropless keeps them. Every other token is equal."""
    rng = np.random.default_rng(seed)
    e, d, f = 4, 16, 24
    base = SwitchConfig.preset("tiny", d_model=d, d_ff=f, num_experts=e, dtype="float32", max_group_size=64,
                               eval_capacity_factor=0.5, min_expert_capacity=1)
    p = _layer_params(rng, e, d, f)
    x = jnp.asarray(rng.standard_normal((2, 16, d)), jnp.float32)
    y_t5x, i_t5x = MoeLayer(base).apply({"params": p}, x)
    y_dl, i_dl = MoeLayer(base.replace(routing_mode="dropless")).apply({"params": p}, x)
    kept = np.asarray(i_t5x["kept"])
    assert 0 < (~kept).sum() < kept.size  # drops really happen
    assert bool(np.all(np.asarray(i_dl["kept"]))) and float(i_dl["dropped_fraction"]) == 0.0
    np.testing.assert_array_equal(np.asarray(i_dl["expert"]), np.asarray(i_t5x["expert"]))
    y_t5x, y_dl = np.asarray(y_t5x), np.asarray(y_dl)
    assert np.all(y_t5x[~kept] == 0.0)
    assert _rel(y_dl[kept], y_t5x[kept]) <= 1e-6
    ref = _np_layer(x, p, 1)
    assert _rel(y_dl[~kept], ref[~kept]) <= 1e-5  # the dropped tokens: what the expert computes


def test_dropless_empty_experts_and_all_to_one(seed):
    """A router that sends every token to one expert (the others get no tokens) and B·L < E."""
    rng = np.random.default_rng(seed)
    e, d, f = 8, 16, 24
    cfg = SwitchConfig.preset("tiny", d_model=d, d_ff=f, num_experts=e, dtype="float32", routing_mode="dropless")
    p = _layer_params(rng, e, d, f)
    target = int(rng.integers(e))
    wr = np.zeros((d, e), np.float32)
    wr[:, target] = 1.0
    p["router"]["router_weights"]["w"]["kernel"] = jnp.asarray(wr)
    for shape in ((1, 1), (1, 3), (3, 11)):
        x = np.abs(rng.standard_normal((*shape, d))).astype(np.float32) + 0.1  # positive: logit of `target` wins
        out, info = MoeLayer(cfg).apply({"params": p}, jnp.asarray(x))
        assert np.all(np.asarray(info["expert"]) == target)
        assert _rel(out, _np_layer(x, p, 1)) <= 1e-5


# ---- whole model: dropless == t5x when t5x drops nothing ---------------------------------------------
def _models(seed, kind, e, dtype="float32"):
    m = random_tiny_model(seed, num_experts=e, dtype=dtype, eval_capacity_factor=float(e))
    if kind == "int4":
        m = moqe_jax.quantize(m, QuantSpec(4), method="rtn")
    elif kind == "int2":
        m = moqe_jax.quantize(m, QuantSpec(2, symmetric=False), method="rtn")
    elif kind == "sub1":
        m, _ = moqe_jax.compress_sub1(moqe_jax.quantize(m, QuantSpec("ternary"), method="rtn"), verbose=False)
    return m, m.replace(config=m.config.replace(routing_mode="dropless"))


def _ids(seed, b, l, t):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 128, (b, l)).astype(np.int32)
    dec = rng.integers(2, 128, (b, t)).astype(np.int32)
    dec[:, 0] = 0
    return ids, dec


TILES, SLOTS = (4, 2, 12, 7), (16, 1, 3, 2)  # E, B, L, T: tiles path; slots path (B·L < E, decode-like)


@pytest.mark.parametrize("kind,shape", [("float", TILES), ("float", SLOTS), ("int4", TILES), ("int4", SLOTS),
                                        ("int2", SLOTS), ("sub1", TILES), ("sub1", SLOTS)])
def test_dropless_logits_equal_t5x_without_drops(seed, kind, shape):
    e, b, l, t = shape
    t5x, dl = _models(seed, kind, e)
    ids, dec = _ids(seed + 1, b, l, t)
    y_ref, aux = jax.jit(lambda m: m.apply(ids, dec))(t5x)
    assert float(aux["dropped_fraction"]) == 0.0  # t5x dropped nothing
    y, aux_dl = jax.jit(lambda m: m.apply(ids, dec))(dl)
    assert float(aux_dl["dropped_fraction"]) == 0.0
    for name, info in aux["moe"].items():  # same routing decisions in every sparse layer
        np.testing.assert_array_equal(np.asarray(aux_dl["moe"][name]["expert"]), np.asarray(info["expert"]))
    assert _rel(y, y_ref) <= 1e-6


def test_dropless_logits_bf16_within_rounding(seed):
    t5x, dl = _models(seed, "float", 4, dtype="bfloat16")
    ids, dec = _ids(seed + 1, 2, 12, 7)
    y_ref, aux = jax.jit(lambda m: m.apply(ids, dec))(t5x)
    assert float(aux["dropped_fraction"]) == 0.0
    y = jax.jit(lambda m: m.apply(ids, dec))(dl)[0]
    assert _rel(y, y_ref) <= 4 * 2.0 ** -8  # a few bf16 ulps of the logit scale


_SHARDED = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from test_moe_dropless import _ids, _models
    from moqe_jax import sharding as shd
    assert jax.device_count() == 4, jax.devices()
    seed = int(sys.argv[1])
    mesh = shd.make_mesh("expert=4")
    ids, dec = _ids(seed + 1, 4, 8, 5)
    for kind in ("float", "int4"):
        t5x, dl = _models(seed, kind, 4)
        one = np.asarray(jax.jit(lambda m: m.logits(ids, dec))(dl))
        ref = np.asarray(jax.jit(lambda m: m.logits(ids, dec))(t5x))
        sharded = jax.device_put(dl.params, shd.param_shardings(dl.params, mesh))
        w = sharded["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
        leaf = w if isinstance(w, jax.Array) else w.packed
        assert len(leaf.sharding.device_set) == 4, leaf.sharding
        got = np.asarray(jax.jit(lambda m: m.logits(ids, dec))(dl.replace(params=sharded)))
        scale = np.abs(one).max()
        assert np.abs(got - one).max() <= 1e-6 * scale, (kind, np.abs(got - one).max())
        assert np.abs(one - ref).max() <= 1e-6 * scale, (kind, np.abs(one - ref).max())
        if kind == "int4":  # the word repack (load_model(weight_layout="words")) keeps the expert sharding
            wm = dl.replace(params=sharded).with_weight_layout("words")
            ww = wm.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
            assert ww.layout == "words" and ww.packed.sharding.is_equivalent_to(leaf.sharding, 3), ww.packed.sharding
            got = np.asarray(jax.jit(lambda m: m.logits(ids, dec))(wm))
            assert np.abs(got - one).max() <= 1e-6 * scale, ("words", np.abs(got - one).max())
    print("ok")
""")


def test_dropless_expert_sharded_on_forced_cpu_mesh(seed):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _SHARDED, str(seed)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("shape", [(1, 3), (2, 16)])
def test_dropless_grad_equals_t5x_without_drops(seed, shape):
    """Training through the dropless layer: same gradients as t5x when t5x drops nothing."""
    rng = np.random.default_rng(seed)
    e, d, f = 8, 16, 24
    p = _layer_params(rng, e, d, f)
    x = jnp.asarray(rng.standard_normal((*shape, d)), jnp.float32)
    grads = {}
    for mode in ("t5x", "dropless"):
        cfg = SwitchConfig.preset("tiny", d_model=d, d_ff=f, num_experts=e, dtype="float32", routing_mode=mode,
                                  eval_capacity_factor=float(e), max_group_size=64)
        grads[mode] = jax.grad(lambda p, cfg=cfg: jnp.sum(MoeLayer(cfg).apply({"params": p}, x)[0] ** 2))(p)
    for a, b in zip(jax.tree.leaves(grads["t5x"]), jax.tree.leaves(grads["dropless"]), strict=True):
        assert _rel(b, a) <= 1e-5


def test_dropless_decode_steps_equal_t5x(seed):
    """decode's MoE calls go through the same MoeLayer: greedy steps with routing_mode="dropless" give the
    t5x logits (a decode step routes B tokens; t5x pads them to E and drops none at this capacity)."""
    from moqe_jax.model import decode

    t5x, dl = _models(seed, "int4", 8)
    ids, _ = _ids(seed + 1, 3, 6, 1)
    logits = {}
    for m in (t5x, dl):
        cfg = m.config
        _, valid, cross = decode.encode_for_decoding(cfg, m.params, jnp.asarray(ids))
        cache = decode.init_cache(cfg, 3, 4)
        tok, out = jnp.zeros(3, jnp.int32), []
        for pos in range(3):
            lg, cache = decode.decode_step(cfg, m.params, tok, jnp.int32(pos), cache, cross, valid)
            tok = jnp.argmax(lg, -1).astype(jnp.int32)
            out.append(np.asarray(lg))
        logits[cfg.routing_mode] = np.stack(out)
    assert _rel(logits["dropless"], logits["t5x"]) <= 1e-6
