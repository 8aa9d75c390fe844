"""RTN quantizers (moqe_jax.quant.rtn) against an independent float64 NumPy reference.

The reference is written from the rules in docs/MOQE.md §4 (FasterTransformer absmax, Marian log) and
docs/QMOE.md §1.1/§5 (GPTQ min-max, MSE grid, ternary), one (group, channel) vector at a time.

Ties: JAX computes in float32, the reference in float64, so an element whose pre-rounding value lies
within ~1e-5 (relative) of a decision boundary may legitimately round differently; the reference flags
such elements (and whole channels whose zero-point or MSE choice is a near-tie) as ambiguous. Codes
must match exactly everywhere else, and ambiguous elements must be rare (< 1 %).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moqe_jax.errors import MoqeError, QuantizationError
from moqe_jax.packed.qtensor import QuantizedTensor, unpack_codes
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.rtn import (
    LOG_MSE_STEPS,
    fake_quantize,
    find_params,
    quantize_arrays,
    quantize_codes,
    quantize_tensor,
)

TIE = 1e-5


# ------------------------------------------------------------------------------------------
# float64 reference (one vector x = the weights of one (group, output channel))
# ------------------------------------------------------------------------------------------
def _near_half(u: np.ndarray) -> np.ndarray:
    return np.abs((u - np.floor(u)) - 0.5) < TIE


def ref_linear_codes(x, s, z, b, sym):
    """Codes + ambiguity of a linear grid (scale s, zero z; sym uses FT's clip)."""
    u = x / s
    if sym:
        mid = 2 ** (b - 1)
        q = np.clip(np.round(u), -mid, mid - 1) + mid
    else:
        q = np.clip(np.round(u) + z, 0, 2**b - 1)
    return q.astype(np.int64), _near_half(u)


def ref_ternary_codes(x, hi, lo):
    q = np.where(x > hi / 2, 2, np.where(x < lo / 2, 1, 0))
    amb = (np.abs(x - hi / 2) <= TIE * abs(hi)) | (np.abs(x - lo / 2) <= TIE * abs(lo))
    return q.astype(np.int64), amb


def ref_log_codes(x, S, b):
    """Marian quantizeLog: e = -clip(floor(log2(|clip(v,S)|/S*4/3)), -(2^(b-1)-1), 0); 0 -> smallest magnitude."""
    emax = 2 ** (b - 1) - 1
    q = np.zeros(x.shape, np.int64)
    amb = np.zeros(x.shape, bool)
    for i, v in enumerate(x):
        if S == 0:
            e, t = 0, 0.5
        elif v == 0:
            e, t = emax, 0.5
        else:
            t = math.log2(min(abs(v), S) / S * 4.0 / 3.0)
            e = -min(max(math.floor(t), -emax), 0)
        q[i] = (2 ** (b - 1) if v < 0 else 0) + e
        amb[i] = abs(t - round(t)) < TIE
    return q, amb


def ref_values(q, s, z, spec):
    if spec.is_ternary:
        return np.where(q == 2, s, np.where(q == 1, z, 0.0))
    b = int(spec.bits)
    if spec.scheme == "log":
        sign = q >> (b - 1)
        e = q & (2 ** (b - 1) - 1)
        return np.where(sign == 1, -1.0, 1.0) * s * 2.0 ** (-e.astype(np.float64))
    return s * (q - (2 ** (b - 1) if spec.symmetric else z))


def ref_vector(x: np.ndarray, spec: QuantSpec):
    """(codes, scale, zero, ambiguous-mask) of one (group, channel) vector in float64."""
    x = x.astype(np.float64)
    if spec.scheme == "log" and not spec.is_ternary:
        b = int(spec.bits)
        S = float(np.max(np.abs(x)))
        amb_ch = False
        if spec.mse:
            for _ in range(LOG_MSE_STEPS):
                q, amb = ref_log_codes(x, S, b)
                amb_ch |= bool(amb.any())
                a = ref_values(q, 1.0, None, spec)
                if np.sum(a * a) > 0:
                    S = float(np.sum(a * x) / np.sum(a * a))
        q, amb = ref_log_codes(x, S, b)
        return q, S, None, amb | amb_ch  # a near-tie during refinement makes the whole channel ambiguous
    if spec.is_ternary or not spec.symmetric:
        lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
        if lo == 0 and hi == 0:
            lo, hi = -1.0, 1.0
    else:
        amax = float(np.max(np.abs(x))) or 1.0
        lo, hi = -amax, amax

    def grid(p):
        lo1, hi1 = p * lo, p * hi
        if spec.is_ternary:
            return hi1, lo1, False
        b = int(spec.bits)
        if spec.symmetric:
            return hi1 / 2 ** (b - 1), None, False
        s = (hi1 - lo1) / (2**b - 1)
        return s, float(np.round(-lo1 / s)), bool(_near_half(np.array(-lo1 / s)))

    def codes(s, z):
        if spec.is_ternary:
            return ref_ternary_codes(x, s, z)
        return ref_linear_codes(x, s, z, int(spec.bits), spec.symmetric)

    if not spec.mse:
        s, z, ztie = grid(1.0)
        q, amb = codes(s, z)
        return q, s, z, amb | ztie
    errs, cands = [], []
    for i in range(80):  # GPTQ: p = 1 - i/100 for i < maxshrink*grid = 80
        s, z, ztie = grid(1.0 - i / 100)
        q, amb = codes(s, z)
        errs.append(float(np.sum(np.abs(ref_values(q, s, z, spec) - x) ** 2.4)))
        cands.append((q, s, z, amb | ztie))
    errs = np.array(errs)
    best = int(np.argmin(errs))  # first strict minimum, like GPTQ's `err < best`
    q, s, z, amb = cands[best]
    second = np.min(np.delete(errs, best)) if len(errs) > 1 else np.inf
    if second <= errs[best] * (1 + 1e-5) or amb.any():
        amb = np.ones_like(amb)  # the MSE choice itself is a near-tie (or hinges on a tie): channel ambiguous
    return q, s, z, amb


def reference(w: np.ndarray, spec: QuantSpec):
    *lead, k, n = w.shape
    gs = spec.group_size(k)
    g = k // gs
    codes = np.zeros(w.shape, np.int64)
    amb = np.zeros(w.shape, bool)
    scales = np.zeros((*lead, g, n))
    zeros = np.zeros((*lead, g, n))
    for idx in np.ndindex(*lead):
        for gi in range(g):
            rows = slice(gi * gs, (gi + 1) * gs)
            for c in range(n):
                q, s, z, a = ref_vector(w[idx][rows, c], spec)
                codes[idx][rows, c] = q
                amb[idx][rows, c] = a
                scales[idx][gi, c] = s
                zeros[idx][gi, c] = 0.0 if z is None else z
    vals = ref_values(codes, np.repeat(scales, gs, axis=-2), np.repeat(zeros, gs, axis=-2), spec)
    return codes, scales, zeros, vals, amb


def weights(rng, shape):
    """Batch 0: normal; batch 1: heavy-tailed Student-t (df=2); never zero."""
    w = np.stack([rng.standard_normal(shape), 0.1 * rng.standard_t(2, size=shape)])
    return w.astype(np.float32)


SPECS = (
    [QuantSpec(b, "linear", g, sym, mse) for b in (8, 4, 3, 2) for sym in (True, False)
     for g in ("channel", 16) for mse in (False, True)]
    + [QuantSpec(b, "log", g, True, mse) for b in (8, 4, 3, 2) for g in ("channel", 16) for mse in (False, True)]
    + [QuantSpec("ternary", "linear", g, False, mse) for g in ("channel", 16) for mse in (False, True)]
)


@pytest.mark.parametrize("spec", SPECS, ids=[s.describe() for s in SPECS])
def test_quantizer_matches_float64_reference(spec, seed):
    rng = np.random.default_rng(seed)
    w = weights(rng, (32, 8))  # [2, 32, 8]: batch (normal, student-t), K=32, N=8
    qt = quantize_tensor(w, spec, name="w")
    assert isinstance(qt, QuantizedTensor) and qt.shape == w.shape and qt.spec == spec
    codes = np.asarray(qt.codes()).astype(np.int64)
    rc, rs, rz, rv, amb = reference(w, spec)
    assert amb.mean() < 0.01 or spec.mse, f"too many ties ({amb.mean():.3%})"
    assert (amb.mean() < 0.2), f"too many ambiguous channels ({amb.mean():.3%})"
    mismatch = (codes != rc) & ~amb
    assert not mismatch.any(), f"{mismatch.sum()} code mismatches, e.g. at {np.argwhere(mismatch)[:3].tolist()}"
    ok = ~amb
    # scales / zeros: equal to float rounding wherever the channel is unambiguous
    gs = spec.group_size(32)
    ch_ok = ok.reshape(2, 32 // gs, gs, 8).all(axis=2)
    np.testing.assert_allclose(np.asarray(qt.scales)[ch_ok], rs[ch_ok], rtol=2e-6, atol=0)
    if spec.has_zeros:
        np.testing.assert_allclose(np.asarray(qt.zeros)[ch_ok], rz[ch_ok], rtol=2e-6, atol=0)
    else:
        assert qt.zeros is None
    # values: to float rounding
    vals = np.asarray(qt.dequantize())
    scale_e = np.repeat(np.abs(rs), gs, axis=-2)
    np.testing.assert_allclose(vals[ok], rv[ok], rtol=2e-6, atol=1e-6 * scale_e[ok].max())
    # the unpacked fake-quant path gives the same values bit for bit
    np.testing.assert_array_equal(np.asarray(fake_quantize(w, spec)), vals)
    # packing round-trips bit-exactly and nbytes is the bytes really stored
    c2, s2, z2 = quantize_arrays(jnp.asarray(w), spec)
    np.testing.assert_array_equal(np.asarray(c2), codes)
    np.testing.assert_array_equal(np.asarray(unpack_codes(qt.packed, spec.code_bits, 32)), codes)
    stored = qt.packed.size + 4 * qt.scales.size + (4 * qt.zeros.size if qt.zeros is not None else 0)
    assert qt.nbytes == stored == sum(np.asarray(a).nbytes for a in qt.to_arrays()[0].values())
    assert qt.packed.shape[-2] == 32 * spec.code_bits // 8


def test_quantization_error_is_sane(seed):
    """RTN error falls with bits, MSE never increases the Σ|q-w|^2.4 error, group < channel."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, 64, 16)).astype(np.float32)

    def err(spec, p=2.0):
        return float(np.sum(np.abs(np.asarray(fake_quantize(w, spec)) - w) ** p))

    for sym in (True, False):
        e = [err(QuantSpec(b, symmetric=sym)) for b in (2, 3, 4, 8)]
        assert e == sorted(e, reverse=True) and e[-1] < 1e-3 * e[0]
        for b in (2, 4):
            assert err(QuantSpec(b, symmetric=sym, mse=True), 2.4) <= err(QuantSpec(b, symmetric=sym), 2.4) * (1 + 1e-6)
            assert err(QuantSpec(b, symmetric=sym, granularity=16)) < err(QuantSpec(b, symmetric=sym))
    assert err(QuantSpec("ternary", mse=True), 2.4) <= err(QuantSpec("ternary"), 2.4) * (1 + 1e-6)
    assert err(QuantSpec(4, "log", mse=True)) <= err(QuantSpec(4, "log")) * (1 + 1e-6)


def test_ft_symmetric_scale_rule_and_edge_cases():
    """FT absmax: scale = absmax/2^(b-1), clip [-2^(b-1), 2^(b-1)-1]; zero channels; log zero handling."""
    w = np.zeros((16, 4), np.float32)
    w[:, 0] = np.linspace(-1, 1, 16)
    w[:, 1] = np.linspace(0.1, 3, 16)  # all positive
    w[3, 2] = -0.5  # one non-zero
    # column 3 all zeros
    for b in (8, 4, 3, 2):
        qt = quantize_tensor(w, QuantSpec(b))
        s = np.asarray(qt.scales)[0]
        np.testing.assert_allclose(s[:3], np.array([1.0, 3.0, 0.5]) / 2 ** (b - 1), rtol=1e-7)
        v = np.asarray(qt.dequantize())
        assert v[:, 3].tolist() == [0.0] * 16 and v[:, 2][w[:, 2] == 0].tolist() == [0.0] * 15
        assert v[:, 1].max() == pytest.approx(3.0 * (2 ** (b - 1) - 1) / 2 ** (b - 1))  # +absmax clips
        assert v[:, 0].min() == pytest.approx(-1.0)  # -absmax representable
    for spec in (QuantSpec(2, symmetric=False), QuantSpec("ternary")):  # degenerate row -> [-1, 1]
        qt = quantize_tensor(w, spec)
        assert np.asarray(qt.dequantize())[:, 3].tolist() == [0.0] * 16
    # log: an all-zero channel stays exactly 0 (S = 0); an exact 0 in a live channel -> smallest magnitude
    qt = quantize_tensor(w, QuantSpec(3, "log"))
    v = np.asarray(qt.dequantize())
    assert v[:, 3].tolist() == [0.0] * 16
    assert v[0, 2] == pytest.approx(0.5 * 2.0 ** -3)
    # Marian's docstring example (positive data, S = 1): rounding happens in linear space at 0.75·2^k
    x = np.array([0.9, 0.7, 0.5, 0.2, 1.0, 0.74, 0.76, 0.3], np.float32).reshape(8, 1)
    v = np.asarray(quantize_tensor(x, QuantSpec(8, "log")).dequantize())[:, 0]
    np.testing.assert_allclose(v, [1.0, 0.5, 0.5, 0.25, 1.0, 0.5, 1.0, 0.25])


def test_find_params_and_codes_are_jittable_and_batch_first(seed):
    """The building blocks GPTQ reuses: jit, vmap over experts, single-column quantize_codes."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, 32, 8)).astype(np.float32)
    for spec in (QuantSpec(2, symmetric=False), QuantSpec("ternary"), QuantSpec(4, granularity=8),
                 QuantSpec(3, "log", mse=True), QuantSpec(4, mse=True)):
        s, z = jax.jit(find_params, static_argnums=1)(w, spec)
        g = spec.num_groups(32)
        assert s.shape == (3, g, 8) and (z is None) == (not spec.has_zeros)
        sv, zv = jax.vmap(lambda x, sp=spec: find_params(x, sp))(w)  # noqa: B023
        np.testing.assert_array_equal(np.asarray(sv), np.asarray(s))
        codes = jax.jit(quantize_codes, static_argnums=3)(w, s, z, spec)
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(quantize_tensor(w, spec).codes()))
        # column by column (how GPTQ calls it) gives the same codes
        col = 5
        gi = col // spec.group_size(32)
        c1 = quantize_codes(w[:, col:col + 1, :], s[:, gi:gi + 1], None if z is None else z[:, gi:gi + 1], spec)
        np.testing.assert_array_equal(np.asarray(c1)[:, 0], np.asarray(codes)[:, col])
    # inside jit: returns a QuantizedTensor pytree
    qt = jax.jit(lambda x: quantize_tensor(x, QuantSpec(4)))(w)
    np.testing.assert_array_equal(np.asarray(qt.packed), np.asarray(quantize_tensor(w, QuantSpec(4)).packed))


def test_bf16_input_and_chunking(monkeypatch, seed):
    import moqe_jax.quant.rtn as rtn

    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((5, 16, 8)), jnp.bfloat16)
    full = quantize_tensor(w, QuantSpec(4, symmetric=False), "experts")
    monkeypatch.setattr(rtn, "_CHUNK_ELEMS", 2 * 16 * 8)
    chunked = quantize_tensor(w, QuantSpec(4, symmetric=False), "experts")
    assert full.dtype == jnp.bfloat16 and full.dequantize().dtype == jnp.bfloat16
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(chunked), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_name_the_tensor(bad, seed):
    w = np.random.default_rng(seed).standard_normal((16, 8)).astype(np.float32)
    w[3, 2] = bad
    with pytest.raises(QuantizationError, match=r"encoder/layers_1/mlp/expert/wi/kernel.*NaN/inf"):
        quantize_tensor(w, QuantSpec(4), name="encoder/layers_1/mlp/expert/wi/kernel")


def test_bad_specs_and_shapes(seed):
    w = np.random.default_rng(seed).standard_normal((24, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="unsupported bits"):
        QuantSpec(5)
    for bad in (5, 1, {"bits": 16}, {"bits": 4, "scheme": "fp4"}):
        with pytest.raises(QuantizationError, match="invalid quantization spec"):
            quantize_tensor(w, bad, name="w")
    with pytest.raises(QuantizationError, match=r"w: group size 16 does not divide .*K=24"):
        quantize_tensor(w, QuantSpec(4, granularity=16), name="w")
    with pytest.raises(QuantizationError, match="1-D"):
        quantize_tensor(w[0], QuantSpec(4), name="norm/scale")
    with pytest.raises(QuantizationError, match="dtype"):
        quantize_tensor(w.astype(np.int32), QuantSpec(4), name="w")
    assert issubclass(QuantizationError, MoqeError)


def test_shape_only_quantize_matches_real_nbytes(seed):
    """quantize_tensor on a ShapeDtypeStruct gives the packed layout without computing anything."""
    w = np.random.default_rng(seed).standard_normal((3, 40, 24)).astype(np.float32)
    for spec in (QuantSpec(3), QuantSpec("ternary"), QuantSpec(2, granularity=8, mse=True), QuantSpec(4, "log")):
        real = quantize_tensor(w, spec)
        proj = quantize_tensor(jax.ShapeDtypeStruct(w.shape, jnp.float32), spec)
        assert proj.nbytes == real.nbytes and proj.shape == real.shape
