"""Decode-fused sub1 Pallas kernel in interpret mode vs decode-then-matmul (float64 NumPy reference).

The kernel runs through ``moqe_jax.ops`` (mode ``"interpret"``; ``ops.explain`` is None, so no XLA fallback)
or on the raw operands of ``ops.kernel_operands``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moqe_jax import ops
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.sub1 import encode
from pallas_kernels.sub1_matmul import MAX_TOKENS, sub1_matmul_rows

TERN = QuantSpec(bits="ternary")


def make(rng, shape, p0=0.85):
    codes = rng.choice(3, size=shape, p=[p0, (1 - p0) / 2, (1 - p0) / 2]).astype(np.uint8)
    g = (*shape[:-2], 1, shape[-1])
    qt = QuantizedTensor.from_codes(codes, rng.uniform(0.1, 1, g), -rng.uniform(0.1, 1, g), TERN)
    return encode(qt), np.asarray(qt.dequantize(), np.float64)


@pytest.mark.parametrize("c", [1, 3, 16])
def test_grouped_matches_reference(c, seed):
    rng = np.random.default_rng(seed)
    st, wf = make(rng, (3, 136, 24))  # ragged K (not a multiple of a chunk), N not a power of two
    x = rng.normal(size=(3, c, 136)).astype(np.float32)
    assert ops.explain(jnp.asarray(x), st, "grouped") is None
    y = ops.grouped_qmatmul(jnp.asarray(x), st, mode="interpret")
    assert y.shape == (3, c, 24) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.einsum("eck,ekn->ecn", x.astype(np.float64), wf),
                               rtol=1e-5, atol=1e-5)


def test_dense_2d_and_block_choices(seed):
    rng = np.random.default_rng(seed)
    st, wf = make(rng, (77, 40), p0=0.6)  # odd K, low sparsity (short codewords)
    x = rng.normal(size=(2, 3, 77)).astype(np.float32)
    ref = x.astype(np.float64) @ wf
    assert ops.explain(jnp.asarray(x), st) is None
    y = ops.qmatmul(jnp.asarray(x), st, mode="interpret")
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    xt = jnp.asarray(x.reshape(6, 77).T[None])
    arrays, layout = ops.kernel_operands(st)
    for blocks, prefetch in [((1, 4), True), ((4, 8), False), ((8, 32), True)]:  # rows/program, codewords/chunk
        yr = sub1_matmul_rows(xt, *arrays, **layout, interpret=True, blocks=blocks, prefetch=prefetch)
        np.testing.assert_allclose(np.asarray(yr).T.reshape(2, 3, 40), ref, rtol=1e-5, atol=1e-5)


def test_bf16_input_and_dispatch_integration(seed):
    rng = np.random.default_rng(seed)
    st, wf = make(rng, (2, 64, 16), p0=0.95)
    x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.bfloat16)
    ref = np.einsum("eck,ekn->ecn", np.asarray(x, np.float64), wf)
    y = ops.grouped_qmatmul(x, st, mode="interpret")
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-2, atol=2e-2)
    y_xla = ops.grouped_qmatmul(x.astype(jnp.float32), st, mode="xla")
    y_k = jax.jit(lambda a, w: ops.grouped_qmatmul(a, w, mode="interpret"))(x.astype(jnp.float32), st)
    np.testing.assert_allclose(np.asarray(y_k), np.asarray(y_xla), rtol=1e-5, atol=1e-5)


def test_unsupported_cases_return_none(seed):
    rng = np.random.default_rng(seed)
    st, _ = make(rng, (2, 32, 8))
    assert ops.explain(jnp.zeros((2, MAX_TOKENS + 1, 32)), st, "grouped") is not None
    assert ops.explain(jnp.zeros((3, 4, 32)), st, "grouped") is not None  # expert count mismatch
    assert ops.explain(jnp.zeros((2, 4, 16)), st, "grouped") is not None  # K mismatch
    st2, _ = make(rng, (32, 8))
    assert ops.explain(jnp.zeros((MAX_TOKENS + 1, 32)), st2) is not None
    # unsupported: the XLA reference runs instead (no kernel launch)
    x = jnp.ones((2, MAX_TOKENS + 1, 32))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda a: ops.grouped_qmatmul(a, st, mode="interpret"))(x))
    assert "pallas_call" in str(jax.make_jaxpr(lambda a: ops.grouped_qmatmul(a, st, mode="interpret"))(x[:, :4]))


def test_sparse_dec_table_matches_qmoe_dec():
    """The kernel's one-word nonzero table re-expands to exactly the weights of QMoE's two-word dec."""
    from moqe_jax.packed.sub1_dict import get_dictionary, sparse_dec_table

    dec = get_dictionary().dec.view(np.uint32).reshape(-1, 2).astype(np.int64)
    sd = sparse_dec_table().astype(np.int64)
    assert np.all(sd >= 0) and np.all((sd & 15) == (dec[:, 0] & 15))
    dense = np.zeros((sd.size, 28), np.int64)
    for j in range(3):
        f = (sd >> (4 + 7 * j)) & 127
        c = np.nonzero(f & 64)[0]
        dense[c, f[c] & 31] = np.where(f[c] & 32, 2, 1)
    ref = np.stack([(dec[:, s // 14] >> (4 + 2 * (s % 14))) & 3 for s in range(28)], axis=1)
    np.testing.assert_array_equal(dense, ref)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (Triton backend)")
@pytest.mark.parametrize("m", [1, 5, 16, 64])
def test_gpu_triton_matches_reference(m, seed):
    """Triton-compiled kernel (not interpret) on Switch-like shapes, dense and grouped."""
    rng = np.random.default_rng(seed)
    st, wf = make(rng, (768, 3072 // 4), p0=0.885)
    x = rng.normal(size=(m, 768)).astype(np.float32)
    y = ops.qmatmul(jnp.asarray(x), jax.tree_util.tree_map(jnp.asarray, st), mode="pallas")
    ref = x.astype(np.float64) @ wf
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    stg, wg = make(rng, (8, 384, 200), p0=0.8)
    xg = rng.normal(size=(8, m, 384)).astype(np.float32)
    yg = ops.grouped_qmatmul(jnp.asarray(xg), jax.tree_util.tree_map(jnp.asarray, stg), mode="pallas")
    refg = np.einsum("eck,ekn->ecn", xg.astype(np.float64), wg)
    np.testing.assert_allclose(np.asarray(yg), refg, rtol=1e-4, atol=1e-4 * np.abs(refg).max())
    ids = jnp.asarray([5, 2], jnp.int32)
    ya = ops.indexed_qmatmul(jnp.asarray(xg[:2]), jax.tree_util.tree_map(jnp.asarray, stg), ids, mode="pallas")
    refa = np.einsum("ack,akn->acn", xg[:2].astype(np.float64), wg[[5, 2]])
    np.testing.assert_allclose(np.asarray(ya), refa, rtol=1e-4, atol=1e-4 * np.abs(refa).max())


def test_gathered_active_experts(seed):
    rng = np.random.default_rng(seed)
    st, wf = make(rng, (5, 72, 20))
    ids = np.array([3, 0, 3])
    x = rng.normal(size=(3, 2, 72)).astype(np.float32)
    y = jax.jit(lambda a, w, i: ops.indexed_qmatmul(a, w, i, mode="interpret"))(jnp.asarray(x), st, jnp.asarray(ids))
    ref = np.einsum("ack,akn->acn", x.astype(np.float64), wf[ids])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expert_ids"):
        ops.indexed_qmatmul(jnp.asarray(x), st, jnp.asarray(ids[:2]), mode="interpret")


def test_gemv_form_matches_reference(seed):
    """M ≤ 4 ("gemv" form: 2-D tiles, slots and tokens unrolled, wide row blocks) and the "tile" form vs
    ``sub1_matmul_rows_reference``, which itself equals the float64 decode-then-matmul of the exact decoder."""
    from pallas_kernels.sub1_matmul import plan_sub1, sub1_matmul_rows_reference

    rng = np.random.default_rng(seed)
    st, wf = make(rng, (3, 150, 20))  # odd pairs per chunk, N not a power of two
    arrays, layout = ops.kernel_operands(st)
    ids = jnp.asarray([2, 0], jnp.int32)
    for m, form, prefetch in ((1, None, False), (2, None, True), (3, "gemv", False), (4, "tile", False)):
        x = rng.normal(size=(2, 150, m)).astype(np.float32)                         # xt [A, K, M]
        ref64 = np.einsum("ank,akm->anm", np.swapaxes(wf, 1, 2)[np.asarray(ids)], x.astype(np.float64))
        ref = np.asarray(sub1_matmul_rows_reference(jnp.asarray(x), *arrays, **layout, expert_ids=ids))
        np.testing.assert_allclose(ref.reshape(2, 20, m), ref64, rtol=1e-5, atol=1e-5)
        want = form or ("gemv" if m <= 4 else "tile")
        assert plan_sub1(40, m, 150, 2, 20, 10, 4, form=form).form == want
        y = sub1_matmul_rows(jnp.asarray(x), *arrays, **layout, expert_ids=ids, interpret=True, form=form,
                             prefetch=prefetch, blocks=(8, 4) if m == 3 else None)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
