"""GPTQ solver vs a float64 NumPy transcription of the reference (IST-DASLab/gptq fasterquant, QMoE batch_gptq)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from moqe_jax.errors import QuantizationError
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.gptq import gptq_quantize, layer_error, rtn_codes, solve_one_jit


def find_params(x: np.ndarray, bits: int | str, sym: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """quant.py ``Quantizer.find_params`` per row of ``x [rows, cols]`` (perchannel, mse=False)."""
    xmin = np.minimum(x.min(axis=1), 0)
    xmax = np.maximum(x.max(axis=1), 0)
    if bits == "ternary":  # trits / maxq = -1: scale := xmax, zero := xmin
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, +1
        return xmax, xmin
    maxq = 2 ** int(bits) - 1
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        tmp = xmin < 0
        xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp], xmax[tmp] = -1, +1
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    return scale, zero


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int | str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, dequantized) of ``x`` with per-row ``scale``/``zero`` (same shape as x). Codes use QMoE symbols."""
    if bits == "ternary":
        codes = np.where(x > scale / 2, 2, np.where(x < zero / 2, 1, 0))
        return codes, np.where(codes == 2, scale, np.where(codes == 1, zero, 0.0))
    maxq = 2 ** int(bits) - 1
    q = np.clip(np.round(x / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def fasterquant(w: np.ndarray, h: np.ndarray, bits: int | str, *, blocksize: int = 128, percdamp: float = 0.1,
                groupsize: int = -1, actorder: bool = False, dead_inputs: str = "zero",
                static_groups: bool = True) -> dict:
    """Reference GPTQ on ``w [rows, cols]``, ``h [cols, cols]`` (groups when groupsize > 0).

    ``dead_inputs="zero"``: gptq ``fasterquant`` (``H[dead, dead] = 1``, ``W[:, dead] = 0``); ``"keep"``: QMoE
    ``batch_gptq`` (no dead-input step; the damping alone makes H invertible). Static groups are built after
    the dead-input step, on the unpermuted W (gptq); ``static_groups=False``: gptq's dynamic groups, the grid
    refit on ``W[:, c:c+groupsize]`` of the outer (lazily block-updated) W when column ``c % groupsize == 0``.
    Returns codes ``[rows, cols]``, the loss Σ (w−q)²/d²/2 and whether the Cholesky fallback (H = I) was taken.
    """
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    rows, cols = w.shape
    fallback = False
    if not np.all(np.isfinite(h)):
        h, fallback = np.eye(cols), True
    w0 = w.copy()

    def prepare(h: np.ndarray, w: np.ndarray):
        w = w.copy()
        h = h.copy()
        groups = [find_params(w, bits)]  # the per-row grid of the original W
        if dead_inputs == "zero":
            dead = np.diag(h) == 0
            h[dead, dead] = 1
            w[:, dead] = 0
        if groupsize > 0 and static_groups:
            groups = [find_params(w[:, i:i + groupsize], bits) for i in range(0, cols, groupsize)]
        perm = np.arange(cols)
        if actorder:
            perm = np.argsort(-np.diag(h), kind="stable")
            w = w[:, perm]
            h = h[perm][:, perm]
        damp = max(percdamp * np.mean(np.diag(h)), 1e-6)
        h[np.arange(cols), np.arange(cols)] += damp
        lo = np.linalg.cholesky(h)  # raises LinAlgError when not positive definite
        linv = np.linalg.inv(lo)
        hinv = linv.T @ linv  # torch.cholesky_inverse
        u = np.linalg.cholesky(hinv).T  # cholesky(upper=True)
        return w, u, perm, groups

    try:
        w, hinv, perm, groups = prepare(h, w)
    except np.linalg.LinAlgError:
        fallback = True
        w, hinv, perm, groups = prepare(np.eye(cols), w0)
    codes = np.zeros((rows, cols), np.int64)
    margin = np.zeros_like(w)  # distance of the value being rounded to the nearest decision boundary / range
    losses = np.zeros_like(w)
    dynamic = groupsize > 0 and not static_groups
    if dynamic:
        groups = []
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].copy()
        c1 = np.zeros((rows, count), np.int64)
        err1 = np.zeros_like(w1)
        l1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if dynamic:
                if (i1 + i) % groupsize == 0:
                    groups.append(find_params(w[:, i1 + i:i1 + i + groupsize], bits))
                scale, zero = groups[-1]
            else:
                gidx = perm[i1 + i] // groupsize if groupsize > 0 else 0
                scale, zero = groups[gidx]
            c, q = quantize(col, scale, zero, bits)
            margin[:, i1 + i] = boundary_margin(col, scale, zero, bits)
            c1[:, i] = c
            l1[:, i] = (col - q) ** 2 / d ** 2
            e = (col - q) / d
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            err1[:, i] = e
        codes[:, i1:i2] = c1
        losses[:, i1:i2] = l1 / 2
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if actorder:
        codes = codes[:, np.argsort(perm)]
        margin = margin[:, np.argsort(perm)]
    return {"codes": codes, "loss": float(losses.sum()), "fallback": fallback, "groups": groups, "margin": margin}


def boundary_margin(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int | str) -> np.ndarray:
    """|x − nearest rounding threshold| relative to the grid range (small = a near-tie)."""
    if bits == "ternary":
        return np.minimum(np.abs(x - scale / 2), np.abs(x - zero / 2)) / (scale - zero)
    maxq = 2 ** int(bits) - 1
    t = x / scale + zero  # thresholds at half-integers strictly inside (0, maxq)
    half = np.clip(np.floor(t) + 0.5, 0.5, maxq - 0.5)
    return np.abs(t - half) / maxq


def assert_codes_match(codes: np.ndarray, ref: dict, max_row_rate: float = 0.1, tie: float = 1e-4) -> None:
    """Codes equal the reference's, except rows whose FIRST difference is a near-tie of the reference.

    f32 vs f64 rounding decides a near-tie; the error feedback then legitimately changes the rest of that row,
    so a code-level identity rate fails on one early tie (seed 2622345433: one row of 24 diverged at input 74,
    margin 1.9e-9, and 7 later codes followed). Over 488 seeded cases of test_gptq_qmoe_options 2 had one
    diverged row, none had two. A bug breaks the first check (a difference at a non-tie); the row bound only
    catches ties that are suspiciously frequent.
    """
    diff = codes != ref["codes"]
    rows = np.nonzero(diff.any(axis=1))[0]
    for r in rows:
        c = int(np.argmax(diff[r]))
        m = ref["margin"][r, c]
        assert m < tie, f"row {r}: first differing code at input {c} is not a tie (margin {m:.2e})"
    assert len(rows) <= max(1, int(max_row_rate * codes.shape[0])), f"{len(rows)} of {codes.shape[0]} rows diverged"


# ================================ tests ======================================================



K, N = 160, 24  # K not a multiple of 128: exercises the padded last block


def _spec(bits, group=None):
    if bits == "ternary":
        return QuantSpec(bits="ternary")
    return QuantSpec(bits=bits, symmetric=False, granularity="channel" if group is None else group)


def _hessian(rng, kind: str, k: int = K, t: int = 600) -> np.ndarray:
    """Correlated, non-isotropic calibration inputs -> H = 2 XᵀX (float32, like the model's)."""
    if kind == "well":
        x = rng.standard_normal((t, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
    elif kind == "ill":  # low-rank + scaled features + dead inputs: cond(H) ~ 1e9 before damping
        r = k // 4
        x = rng.standard_normal((t, r)) @ rng.standard_normal((r, k))
        x = x * np.logspace(0, -3, k)[None, :] + 1e-5 * rng.standard_normal((t, k))
        x[:, rng.choice(k, 5, replace=False)] = 0.0
    else:
        raise ValueError(kind)
    return (2 * x.T @ x).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 3, 2, "ternary"])
@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("kind", ["well", "ill"])
def test_codes_match_float64_reference(bits, actorder, kind):
    rng = np.random.default_rng([{4: 4, 3: 3, 2: 2, "ternary": 1}[bits], int(actorder), len(kind)])
    w = rng.standard_normal((K, N)).astype(np.float32)
    h = _hessian(rng, kind)
    spec = _spec(bits)
    percdamp = 0.1 if kind == "well" else 0.01
    res = solve_one_jit(w, h, spec, percdamp=percdamp, actorder=actorder)
    ref = fasterquant(w.T, h, bits, percdamp=percdamp, actorder=actorder)
    # f32 vs f64: a weight within rounding noise of a decision boundary may flip, and its error feedback then
    # perturbs the later inputs of that row only (in practice 100 % identical; see assert_codes_match).
    assert_codes_match(np.asarray(res["codes"]).T, ref)
    assert not bool(res["fallback"]) and not ref["fallback"]
    np.testing.assert_allclose(float(np.sum(res["loss"])), ref["loss"], rtol=2e-3)
    # the grid: GPTQ's scales/zeros are the reference's per-row min-max grid of the original weights
    scale, zero = ref["groups"][0]
    np.testing.assert_allclose(np.asarray(res["scales"])[0], scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(res["zeros"])[0], zero, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("actorder", [False, True])
def test_static_groups_match_reference(actorder):
    rng = np.random.default_rng(7)
    k = 128
    w = rng.standard_normal((k, N)).astype(np.float32)
    h = _hessian(rng, "well", k)
    res = solve_one_jit(w, h, _spec(4, group=32), actorder=actorder, blocksize=64)
    ref = fasterquant(w.T, h, 4, groupsize=32, actorder=actorder, blocksize=64)
    assert_codes_match(np.asarray(res["codes"]).T, ref)
    np.testing.assert_allclose(np.asarray(res["scales"]), np.stack([g[0] for g in ref["groups"]]), rtol=1e-6)


def test_singular_and_nan_hessians_fall_back_to_rtn():
    rng = np.random.default_rng(3)
    e, k = 4, 64
    w = rng.standard_normal((e, k, N)).astype(np.float32)
    h = np.stack([_hessian(rng, "well", k) for _ in range(e)])
    q = rng.standard_normal((k, k))
    h[1] = -(q @ q.T).astype(np.float32)  # negative definite: Cholesky fails even after damping
    h[2, 3, 5] = np.nan
    spec = _spec("ternary")
    qt, stats = gptq_quantize(w, h, spec, group=None)
    assert stats.fallback.tolist() == [False, True, False, False]
    assert stats.nan_hessian.tolist() == [False, False, True, False]
    assert stats.num_fallback == 2
    rtn = np.asarray(rtn_codes(w, spec).codes())
    codes = np.asarray(qt.codes())
    for i in (1, 2):  # exactly round-to-nearest on the same grid
        np.testing.assert_array_equal(codes[i], rtn[i])
        ref = fasterquant(w[i].T, h[i], "ternary")
        assert ref["fallback"]
        np.testing.assert_array_equal(codes[i].T, ref["codes"])
    assert not np.array_equal(codes[0], rtn[0])


def test_zero_hessian_expert_is_rtn_and_nan_weights_raise():
    rng = np.random.default_rng(4)
    k = 64
    w = rng.standard_normal((2, k, N)).astype(np.float32)
    h = np.stack([np.zeros((k, k), np.float32), _hessian(rng, "well", k)])  # expert 0 saw no tokens
    spec = _spec(2)
    qt, stats = gptq_quantize(w, h, spec)
    assert int(stats.dead[0]) == k and not stats.fallback.any()
    # all inputs dead -> W zeroed before quantization: codes are the zero point (reference behaviour)
    ref = fasterquant(w[0].T, h[0], 2)
    np.testing.assert_array_equal(np.asarray(qt.codes())[0].T, ref["codes"])
    w[1, 5, 7] = np.nan
    with pytest.raises(QuantizationError, match=r"layer_x: NaN/inf weights in expert\(s\) \[1\]"):
        gptq_quantize(w, h, spec, name="layer_x")


def test_gptq_beats_rtn_on_every_expert():
    rng = np.random.default_rng(5)
    e, k, n = 6, 128, 32
    w = (rng.standard_normal((e, k, n)) * np.linspace(0.5, 2, k)[None, :, None]).astype(np.float32)
    h = np.stack([_hessian(rng, "well", k) for _ in range(e)])
    for spec in (_spec("ternary"), _spec(2), _spec(4)):
        qt, _ = gptq_quantize(w, h, spec, group=4)  # 6 experts in groups of 4: exercises the dummy padding
        g_err = layer_error(w, np.asarray(qt.dequantize()), h)
        r_err = layer_error(w, np.asarray(rtn_codes(w, spec).dequantize()), h)
        assert np.all(g_err < r_err), (spec.describe(), g_err, r_err)
        # ‖XW − XQ‖ from H matches the direct computation
    x = rng.standard_normal((50, k))
    h1 = 2 * x.T @ x
    q = w[0] + 0.1
    direct = np.linalg.norm(x @ w[0] - x @ q) / np.linalg.norm(x @ w[0])
    np.testing.assert_allclose(layer_error(w[0], q, h1), [direct], rtol=1e-10)


def test_batched_equals_per_expert_loop_bitwise():
    rng = np.random.default_rng(6)
    e, k = 5, 96
    w = rng.standard_normal((e, k, N)).astype(np.float32)
    h = np.stack([_hessian(rng, "well", k) for _ in range(e)])
    spec = _spec("ternary")
    qt, stats = gptq_quantize(w, h, spec, group=None, blocksize=32)
    for i in range(e):
        one = solve_one_jit(w[i], h[i], spec, blocksize=32)
        np.testing.assert_array_equal(np.asarray(qt.codes()[i]), np.asarray(one["codes"]))
        assert stats.loss[i] == np.sum(np.asarray(one["loss"], np.float64))


_SHARDED = textwrap.dedent('''
    import os
    import numpy as np, jax
    from moqe_jax.quant.gptq import gptq_quantize, solve_one_jit
    from moqe_jax.packed.spec import QuantSpec
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("expert",))
    rng = np.random.default_rng(0)
    e, k, n = 6, 64, 16  # 6 experts on 4 devices: padded with 2 dummy experts
    w = rng.standard_normal((e, k, n)).astype(np.float32)
    x = rng.standard_normal((e, 200, k)).astype(np.float32) @ rng.standard_normal((k, k)).astype(np.float32)
    h = 2 * np.einsum("etk,etj->ekj", x, x)
    for spec, ao in ((QuantSpec(bits="ternary"), False), (QuantSpec(bits=2, symmetric=False), True)):
        qt, st = gptq_quantize(w, h, spec, mesh=mesh, group=None, actorder=ao, blocksize=32)
        codes = np.asarray(qt.codes())
        for i in range(e):
            one = solve_one_jit(w[i], h[i], spec, actorder=ao, blocksize=32)
            assert np.array_equal(codes[i], np.asarray(one["codes"])), (spec, i)
            assert np.array_equal(np.asarray(qt.scales[i]), np.asarray(one["scales"]))
            assert st.loss[i] == np.sum(np.asarray(one["loss"], np.float64)), (st.loss[i], one["loss"])
    # the whole calibration with the expert solves sharded over the 4 devices equals the unsharded run
    from moqe_jax.api import Model
    from moqe_jax.calibration import gptq_quantize_model
    tiny = Model.init("tiny", seed=0)
    calib = [{"input_ids": rng.integers(2, 128, (4, 12)), "decoder_input_ids": rng.integers(2, 128, (4, 8))}]
    a, _ = gptq_quantize_model(tiny, QuantSpec(bits="ternary"), calib, mesh=mesh, group_experts=2)
    b, _ = gptq_quantize_model(tiny, QuantSpec(bits="ternary"), calib)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    print("SHARDED-OK")
''')


def test_sharded_solver_equals_loop_on_4_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "SHARDED-OK" in out.stdout, out.stderr[-3000:]


def test_bad_shapes_raise():
    with pytest.raises(QuantizationError, match="do not fit"):
        gptq_quantize(np.ones((2, 8, 4)), np.ones((2, 4, 4)), _spec(2), name="w")
