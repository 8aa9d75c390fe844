"""QuantizedTensor contract: packing layout (docs/FORMATS.md §1) against an independent NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moqe_jax.packed.qtensor import QuantizedTensor, dequant_codes, pack_codes, unpack_codes
from moqe_jax.packed.spec import QuantSpec


def np_pack(codes: np.ndarray, b: int) -> np.ndarray:
    """Bit-by-bit reference packer written from the FORMATS.md text (loops, no vectorised tricks)."""
    *lead, k, n = codes.shape
    kp = -(-k // 8) * 8
    c = np.zeros((*lead, kp, n), np.int64)
    c[..., :k, :] = codes
    if b == 3:
        k8 = kp // 8
        out = np.zeros((*lead, 3 * k8, n), np.int64)
        for kk in range(kp):
            i, j = divmod(kk, 8)
            for p in range(3):
                out[..., p * k8 + i, :] |= ((c[..., kk, :] >> p) & 1) << j
        return out.astype(np.uint8)
    per = 8 // b
    out = np.zeros((*lead, kp // per, n), np.int64)
    for kk in range(kp):
        i, j = divmod(kk, per)
        out[..., i, :] |= c[..., kk, :] << (j * b)
    return out.astype(np.uint8)


@pytest.mark.parametrize("b", [8, 4, 3, 2])
@pytest.mark.parametrize("shape", [(16, 8), (3, 21, 5), (2, 1, 7)])
def test_pack_matches_reference_and_roundtrips(b, shape, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**b, size=shape).astype(np.uint8)
    packed = np.asarray(pack_codes(codes, b))
    np.testing.assert_array_equal(packed, np_pack(codes, b))
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(unpack_codes(packed, b, shape[-2])), codes)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, symmetric=False), QuantSpec(2, scheme="log"),
                                  QuantSpec("ternary"), QuantSpec(8, granularity=8)])
def test_qtensor_pytree_nbytes_and_slicing(spec, seed):
    rng = np.random.default_rng(seed)
    e, k, n = 3, 16, 5
    codes = rng.integers(0, spec.maxq + 1, size=(e, k, n)).astype(np.uint8)
    g = spec.num_groups(k)
    scales = rng.uniform(0.1, 1, size=(e, g, n)).astype(np.float32)
    zeros = rng.uniform(-1, 0, size=(e, g, n)).astype(np.float32) if spec.has_zeros else None
    qt = QuantizedTensor.from_codes(codes, scales, zeros, spec)
    assert qt.shape == (e, k, n)
    leaves = jax.tree_util.tree_leaves(qt)
    assert qt.nbytes == sum(x.nbytes for x in leaves)
    np.testing.assert_array_equal(np.asarray(qt.codes()), codes)
    # vmap over the expert axis sees consistent per-expert tensors
    d = jax.vmap(lambda t: t.dequantize())(qt)
    np.testing.assert_allclose(np.asarray(d), np.asarray(qt.dequantize()), rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(qt[1].dequantize()), np.asarray(qt.dequantize())[1])
    # jit round trip of the pytree
    out = jax.jit(lambda t: t)(qt)
    assert out.spec == spec and out.shape == qt.shape


def test_dequant_values_against_numpy(seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(8, 4))
    s = rng.uniform(0.5, 2, size=(1, 4))
    z = rng.integers(0, 16, size=(1, 4)).astype(np.float64)
    got = np.asarray(dequant_codes(jnp.asarray(q), jnp.asarray(s, jnp.float32), jnp.asarray(z, jnp.float32),
                                   QuantSpec(4, symmetric=False)))
    np.testing.assert_allclose(got, s * (q - z), rtol=1e-6)
    got = np.asarray(dequant_codes(jnp.asarray(q), jnp.asarray(s, jnp.float32), None, QuantSpec(4, scheme="log")))
    sign = np.where(q >= 8, -1.0, 1.0)
    np.testing.assert_allclose(got, sign * s * 2.0 ** -(q % 8), rtol=1e-6)
    qt = rng.integers(0, 3, size=(8, 4))
    got = np.asarray(dequant_codes(jnp.asarray(qt), jnp.asarray(s, jnp.float32), jnp.asarray(-s, jnp.float32),
                                   QuantSpec("ternary")))
    np.testing.assert_allclose(got, np.choose(qt, [np.zeros_like(got), -s + 0 * got, s + 0 * got]), rtol=1e-6)


def test_spec_validation():
    with pytest.raises(ValueError):
        QuantSpec(5)
    with pytest.raises(ValueError):
        QuantSpec(4, granularity=12)
    assert QuantSpec(4, granularity="group:128").granularity == 128
    with pytest.raises(ValueError):
        QuantSpec(4, granularity=64).num_groups(96)


def test_component_classification():
    from moqe_jax.model.components import component_of

    assert component_of("encoder/layers_1/mlp/expert/wi/kernel") == "experts"
    assert component_of("decoder/layers_3/mlp/router/router_weights/w/kernel") == "router"
    assert component_of("decoder/layers_0/mlp/wo/kernel") == "dense"
    assert component_of("decoder/layers_0/encoder_decoder_attention/query/kernel") == "cross_attn"
    assert component_of("encoder/layers_0/attention/out/kernel") == "self_attn"
    assert component_of("decoder/layers_0/self_attention/key/kernel") == "self_attn"
    assert component_of("token_embedder/embedding") == "embeddings"
    assert component_of("decoder/decoder_norm/scale") == "norms"
    assert component_of("encoder/relpos_bias/rel_embedding") == "relpos"
    assert component_of("decoder/logits_dense/kernel") == "logits"


def test_storage_protocol_roundtrip(seed):
    rng = np.random.default_rng(seed)
    spec = QuantSpec(2, symmetric=False, granularity=8)
    codes = rng.integers(0, 4, size=(2, 16, 3)).astype(np.uint8)
    qt = QuantizedTensor.from_codes(codes, rng.uniform(size=(2, 2, 3)), rng.uniform(size=(2, 2, 3)), spec)
    arrays, meta = qt.to_arrays()
    back = QuantizedTensor.from_arrays({k: np.asarray(v) for k, v in arrays.items()}, meta)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qt.dequantize()))
    with pytest.raises(ValueError):
        QuantizedTensor.from_arrays({**{k: np.asarray(v) for k, v in arrays.items()},
                                     "packed": np.zeros((2, 3, 3), np.uint8)}, meta)
