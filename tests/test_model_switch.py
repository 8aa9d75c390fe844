"""Switch model math vs independent NumPy references (docs/T5X_SWITCH.md §4)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moqe_jax.api import Model
from moqe_jax.config import SwitchConfig
from moqe_jax.model import layerwise, routing
from moqe_jax.model.layers import MoeLayer, relative_position_bucket, rms_norm

# ---- relative position buckets: the spec's tables (§4.6) -------------------------------------------
BIDIR = [((0, 0), 0), ((-7, -1), None), ((-11, -8), 8), ((-15, -12), 9), ((-22, -16), 10), ((-31, -23), 11),
         ((-45, -32), 12), ((-63, -46), 13), ((-90, -64), 14), ((-400, -91), 15), ((1, 7), None), ((8, 11), 24),
         ((12, 15), 25), ((16, 22), 26), ((23, 31), 27), ((32, 45), 28), ((46, 63), 29), ((64, 90), 30),
         ((91, 400), 31)]
CAUSAL_N = [((16, 18), 16), ((19, 20), 17), ((21, 23), 18), ((24, 26), 19), ((27, 30), 20), ((31, 34), 21),
            ((35, 39), 22), ((40, 45), 23), ((46, 51), 24), ((52, 58), 25), ((59, 66), 26), ((67, 76), 27),
            ((77, 86), 28), ((87, 98), 29), ((99, 112), 30), ((113, 600), 31)]


def test_relpos_buckets_match_spec_tables():
    for (lo, hi), want in BIDIR:
        rp = np.arange(lo, hi + 1)
        got = np.asarray(relative_position_bucket(rp, True))
        if want is None:  # exact region: -1..-7 -> 1..7, +1..+7 -> 17..23
            want = np.where(rp < 0, -rp, 16 + rp)
        np.testing.assert_array_equal(got, np.broadcast_to(want, rp.shape), err_msg=f"rp {lo}..{hi}")
    # unidirectional, in terms of n = -rp; rp > 0 clamps to bucket 0
    n = np.arange(0, 16)
    np.testing.assert_array_equal(np.asarray(relative_position_bucket(-n, False)), n)
    np.testing.assert_array_equal(np.asarray(relative_position_bucket(np.arange(1, 50), False)), 0)
    for (lo, hi), want in CAUSAL_N:
        n = np.arange(lo, hi + 1)
        np.testing.assert_array_equal(np.asarray(relative_position_bucket(-n, False)), want, err_msg=f"n {lo}..{hi}")


def test_rms_norm_vs_numpy_f32_and_bf16():
    rs = np.random.RandomState(0)
    x = rs.randn(3, 5, 48) * 3.0
    s = rs.randn(48)
    ref = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * s
    got = np.asarray(rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32), 1e-6, jnp.float32))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    # bf16 path: normalised value rounded to bf16, then a bf16 multiply by the bf16 scale (spec §4.3)
    bf = jnp.bfloat16
    y = np.asarray(jnp.asarray((x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6)).astype(np.float32), bf))
    want = np.asarray(jnp.asarray(y.astype(np.float32) * np.asarray(jnp.asarray(s, bf)).astype(np.float32), bf))
    got = np.asarray(rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32), 1e-6, bf))
    assert got.dtype == bf
    mism = np.mean(got.astype(np.float32) != want.astype(np.float32))
    assert mism < 0.01  # only f32-rsqrt last-ulp ties may flip a bf16 rounding


def test_sparse_layer_rule():
    c = SwitchConfig.preset("switch-base-8")
    assert c.sparse_layers("encoder") == (1, 3, 5, 7, 9, 11)
    assert SwitchConfig.preset("switch-c-2048").sparse_layers("decoder") == tuple(range(15))
    assert c.replace(encoder_sparse_step=4).sparse_layers("encoder") == (3, 7, 11)  # Flaxformer, not HF's 1,5,9
    assert c.replace(decoder_sparse_step=0).sparse_layers("decoder") == ()


# ---- routing helpers and the MoE layer vs an independent NumPy reference (§4.8) --------------------
def _np_pad_amounts(b, l, n):
    t = b * l
    if t % n == 0:
        return 0, 0
    pb = next(p for p in range(1, 10 ** 6) if (t + p * l) % n == 0)
    ps = next(p for p in range(1, 10 ** 6) if (t + p * b) % n == 0)
    return (pb, 0) if ps * b > pb * l else (0, ps)


def test_routing_static_helpers():
    assert routing.maybe_pad_amounts(3, 5, 4) == _np_pad_amounts(3, 5, 4) == (1, 0)  # batch padding
    assert routing.maybe_pad_amounts(2, 7, 4) == (0, 1)  # sequence padding
    assert routing.maybe_pad_amounts(2, 3, 4) == (0, 1)  # tie (ps·B = pb·L... ) -> sequence
    assert routing.num_groups(512, 8192, 128) == 128  # base-128: 128 groups of 4 tokens
    assert routing.num_groups(4096, 1024, 8) == 8
    assert routing.num_groups(24, 4, 4) == 8  # 24//4 = 6 -> 8 (divides 24, multiple of 4)
    assert routing.expert_capacity(8, 4, 1.25, 1) == 2  # round(2.5) = 2 (banker's)
    assert routing.expert_capacity(12, 4, 1.25, 1) == 4  # round(3.75)
    assert routing.expert_capacity(4, 8, 2.0, 4) == 4  # min capacity
    assert routing.expert_capacity(28, 8, 1.0, 1) == 4  # round(3.5) = 4 (banker's, even)


def _np_moe(x, wr, wi, wo, wi1, e, cf, min_cap, mgs, gated):
    """Independent per-token loop implementation of Flaxformer's MoeLayer (f64)."""
    b, l, d = x.shape
    pb, ps = _np_pad_amounts(b, l, e)
    xp = np.zeros((b + pb, l + ps, d))
    xp[:b, :l] = x
    t = xp.shape[0] * xp.shape[1]
    g = max(t // mgs, e)
    while g < t and not (t % g == 0 and g % e == 0):
        g += 1
    s = t // g
    cap = max(int(round(cf * s / e)), min_cap)
    flat = xp.reshape(t, d)
    out = np.zeros_like(flat)
    dropped = np.zeros(t, bool)
    for gi in range(g):
        used = [0] * e
        for ti in range(s):
            tok = flat[gi * s + ti]
            lg = tok @ wr
            p = np.exp(lg - lg.max())
            p /= p.sum()
            k = int(np.argmax(p))
            if used[k] < cap:
                if gated:
                    u = tok @ wi[k]
                    gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
                    h = gelu * (tok @ wi1[k])
                else:
                    h = np.maximum(tok @ wi[k], 0)
                out[gi * s + ti] = p[k] * (h @ wo[k])
            else:
                dropped[gi * s + ti] = True
            used[k] += 1
    return (out.reshape(xp.shape)[:b, :l], dropped.reshape(xp.shape[:2])[:b, :l], cap)


@pytest.mark.parametrize("shape,act", [((3, 5), "relu"), ((2, 7), "relu"), ((2, 8), "gated-gelu")])
def test_moe_layer_token_dropping_vs_numpy(shape, act):
    b, l = shape
    e, d, f = 4, 16, 24
    cfg = SwitchConfig.preset("tiny", d_model=d, d_ff=f, num_experts=e, dtype="float32", activation=act,
                              max_group_size=8, eval_capacity_factor=1.25, min_expert_capacity=1)
    rs = np.random.RandomState(hash(shape) % 1000)
    x = rs.randn(b, l, d)
    x[0, -2:] = 0.0  # logit-masked padding positions: routed to expert 0, consuming its capacity
    wr = rs.randn(d, e) * 0.5
    wi = rs.randn(e, d, f) / np.sqrt(d)
    wi1 = rs.randn(e, d, f) / np.sqrt(d)
    wo = rs.randn(e, f, d) / np.sqrt(f)
    experts = {"wi_0": {"kernel": wi}, "wi_1": {"kernel": wi1}, "wo": {"kernel": wo}} if act != "relu" else \
        {"wi": {"kernel": wi}, "wo": {"kernel": wo}}
    params = {"router": {"router_weights": {"w": {"kernel": wr}}}, "expert": experts}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    out, info = MoeLayer(cfg).apply({"params": params}, jnp.asarray(x, jnp.float32))
    ref, dropped, cap = _np_moe(x, wr, wi, wo, wi1, e, 1.25, 1, 8, act != "relu")
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(~np.asarray(info["kept"]), dropped)
    assert dropped.any() and (~dropped).any()
    assert np.all(np.asarray(out)[dropped] == 0.0)  # dropped tokens -> exactly 0
    assert np.all(np.asarray(info["expert"])[0, -2:] == 0)  # zero tokens -> expert 0
    assert abs(float(info["dropped_fraction"]) - 0) >= 0  # scalar present
    assert math.isfinite(float(info["aux_loss"])) and float(info["aux_loss"]) > 0


# ---- whole model --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def f32_model():
    cfg = SwitchConfig.preset("tiny", dtype="float32", eval_capacity_factor=1.0, min_expert_capacity=1)
    return Model.init(cfg, seed=1)


def _batch(seed=0, v=128):
    rs = np.random.RandomState(seed)
    ids = rs.randint(2, v, (3, 9))
    ids[1, 6:] = 0
    dec = rs.randint(2, v, (3, 6))
    dec[:, 0] = 0
    dec[2, 4:] = 0
    return ids, dec


def test_layerwise_equals_full_forward(f32_model):
    m = f32_model
    cfg, p = m.config, m.params
    ids, dec = _batch()
    full, aux = m.apply(ids, dec)
    x, ctx = layerwise.encode_embed(cfg, p, ids)
    infos = []
    for i in range(cfg.num_layers):
        x, info = layerwise.encoder_layer(cfg, p, i, x, ctx)
        infos.append(info)
    enc = layerwise.encoder_final(cfg, p, x, ctx)
    np.testing.assert_allclose(np.asarray(enc), np.asarray(aux["encoder_output"]), rtol=1e-5, atol=1e-6)
    assert infos[1]["inputs"].shape == (3, 9, cfg.d_model) and not infos[0]
    y, dctx = layerwise.decode_embed(cfg, p, dec, enc, ctx)
    for i in range(cfg.num_decoder_layers):
        y, _ = layerwise.decoder_layer(cfg, p, i, y, dctx)
    logits = layerwise.decoder_final(cfg, p, y, dctx)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), rtol=1e-5, atol=1e-5)
    # padded encoder positions reach the MoE as exact zero vectors (logit mask)
    assert np.all(np.asarray(infos[1]["inputs"])[1, 6:] == 0)
    # swapping one layer's params changes only what follows
    p2 = jax.tree_util.tree_map(lambda a: a, p)
    p2["encoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"] = p["encoder"]["layers_1"]["mlp"]["expert"]["wo"][
        "kernel"] * 0.5
    x2, _ = layerwise.encoder_layer(cfg, p2, 1, layerwise.encoder_layer(cfg, p2, 0, *layerwise.encode_embed(
        cfg, p2, ids))[0], ctx)
    assert not np.allclose(np.asarray(x2), np.asarray(x))


def test_bf16_dtype_policy():
    cfg = SwitchConfig.preset("tiny")
    m = Model.init(cfg, seed=0)
    ids, dec = _batch()
    x, ctx = layerwise.encode_embed(cfg, m.params, ids)
    assert x.dtype == jnp.bfloat16
    x0, _ = layerwise.encoder_layer(cfg, m.params, 0, x, ctx)
    x1, info = layerwise.encoder_layer(cfg, m.params, 1, x0, ctx)
    assert x0.dtype == jnp.bfloat16 and x1.dtype == jnp.float32  # residual becomes f32 at the first sparse layer
    assert info["inputs"].dtype == jnp.bfloat16
    logits, aux = m.apply(ids, dec)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
    assert float(aux["aux_loss"]) > 0


def test_quantized_expert_leaf_passes_through(f32_model):
    from moqe_jax.packed.qtensor import QuantizedTensor
    from moqe_jax.packed.spec import QuantSpec

    m = f32_model
    cfg = m.config
    rs = np.random.RandomState(3)
    spec = QuantSpec(bits=4, symmetric=True)
    codes = rs.randint(0, 16, (cfg.num_experts, cfg.d_model, cfg.d_ff))
    scales = rs.uniform(0.01, 0.05, (cfg.num_experts, 1, cfg.d_ff))
    qt = QuantizedTensor.from_codes(codes, scales, None, spec)
    pq = jax.tree_util.tree_map(lambda a: a, m.params)
    pf = jax.tree_util.tree_map(lambda a: a, m.params)
    pq["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"] = qt
    pf["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"] = qt.dequantize(jnp.float32)
    ids, dec = _batch(5)
    lq = Model(cfg, pq).logits(ids, dec)
    lf = Model(cfg, pf).logits(ids, dec)
    lo = m.logits(ids, dec)
    np.testing.assert_allclose(lq, lf, rtol=1e-5, atol=1e-5)
    assert not np.allclose(lq, lo, atol=1e-3)


def test_decode_cache_matches_full_recompute():
    from moqe_jax.model import decode

    cfg = SwitchConfig.preset("tiny", dtype="float32", eval_capacity_factor=64.0)
    m = Model.init(cfg, seed=2)
    p = m.params
    rs = np.random.RandomState(7)
    ids = rs.randint(2, 128, (2, 8))
    ids[1, 5:] = 0
    t = 6
    dec = rs.randint(2, 128, (2, t))
    dec[:, 0] = cfg.decoder_start_token_id
    full = m.logits(ids, dec, decoder_attention_mask=np.ones_like(dec))
    _, valid, cross = decode.encode_for_decoding(cfg, p, jnp.asarray(ids))
    cache = decode.init_cache(cfg, 2, t)
    step = jax.jit(lambda tok, pos, cache: decode.decode_step(cfg, p, tok, pos, cache, cross, valid))
    for i in range(t):
        lg, cache = step(jnp.asarray(dec[:, i]), i, cache)
        np.testing.assert_allclose(np.asarray(lg), full[:, i], rtol=1e-4, atol=1e-4, err_msg=f"step {i}")
    # greedy == argmax of full recomputation on its own prefix; beam 1 == greedy
    g = m.generate(ids, 6)
    prefix = np.concatenate([np.zeros((2, 1), int), g[:, :-1]], 1)
    am = np.argmax(m.logits(ids, prefix, decoder_attention_mask=np.ones_like(prefix)), -1)
    for r in range(2):
        stop = np.where(g[r] == cfg.eos_token_id)[0]
        n = stop[0] + 1 if len(stop) else 6
        np.testing.assert_array_equal(g[r, :n], am[r, :n])
    np.testing.assert_array_equal(m.generate(ids, 6, num_beams=1), g)
    b3 = m.generate(ids, 6, num_beams=3)
    assert b3.shape == (2, 6)


def test_moe_layer_bf16_cast_policy():
    """bf16 experts (inputs, kernels and outputs rounded to bf16), f32 router, f32 gate × f32(y) combine."""
    import ml_dtypes

    bf = ml_dtypes.bfloat16

    def rb(a):
        return np.asarray(a, np.float32).astype(bf).astype(np.float64)

    e, d, f = 4, 32, 48
    cfg = SwitchConfig.preset("tiny", d_model=d, d_ff=f, num_experts=e, max_group_size=64, eval_capacity_factor=2.0,
                              min_expert_capacity=4)
    rs = np.random.RandomState(21)
    x = rb(rs.randn(2, 8, d))
    wr, wi, wo = rs.randn(d, e), rs.randn(e, d, f) / np.sqrt(d), rs.randn(e, f, d) / np.sqrt(f)
    params = {"router": {"router_weights": {"w": {"kernel": wr}}},
              "expert": {"wi": {"kernel": wi}, "wo": {"kernel": wo}}}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    out, info = MoeLayer(cfg).apply({"params": params}, jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.float32 and bool(np.all(np.asarray(info["kept"])))
    wr32, wi_b, wo_b = np.float32(wr).astype(np.float64), rb(wi), rb(wo)
    lg = x @ wr32
    pr = np.exp(lg - lg.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    k = pr.argmax(-1)
    gate = np.take_along_axis(pr, k[..., None], -1)[..., 0]
    h = rb(np.maximum(rb(np.einsum("bld,bldf->blf", x, wi_b[k])), 0))
    y = rb(np.einsum("blf,blfd->bld", h, wo_b[k]))
    ref = np.float32(gate)[..., None].astype(np.float64) * y
    got = np.asarray(out, np.float64)
    close = np.isclose(got, ref, rtol=1e-6, atol=0)
    assert close.mean() > 0.97  # only f32-accumulation-order ties may round to the neighbouring bf16 value
    np.testing.assert_allclose(got, ref, rtol=2 ** -7, atol=1e-6)
    # an f32-expert computation is clearly different (proves the bf16 rounding really happens)
    y32 = np.einsum("blf,blfd->bld", np.maximum(np.einsum("bld,bldf->blf", x, wi[k]), 0), wo[k])
    assert np.mean(np.isclose(got, gate[..., None] * y32, rtol=1e-6, atol=0)) < 0.2
