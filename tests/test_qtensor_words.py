"""The stored word layout of ``QuantizedTensor`` (docs/FORMATS.md §1, "word layout"; docs/KERNELS.md).

A words-layout tensor must decode to exactly the bytes-layout tensor and to an independent float64 NumPy
reference written from the FORMATS text; traced words-layout weights inside ``jit`` must reach the uint32
word kernels (the pallas_call name carries ``_w32``); checkpoints keep each layout; a tiny Switch model gives
the same logits in both layouts. Kernels run in Pallas interpret mode on CPU; every test draws fresh inputs.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_qt

from moqe_jax import ops
from moqe_jax.api import Model
from moqe_jax.checkpoint import store
from moqe_jax.config import SwitchConfig
from moqe_jax.packed.qtensor import QuantizedTensor, convert_layout
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.rtn import quantize_tensor
from moqe_jax.quant.sub1 import encode
from moqe_jax.tree import flatten_params, unflatten_params

WORD_SPECS = [QuantSpec(4), QuantSpec(2, symmetric=False), QuantSpec("ternary"), QuantSpec(8, granularity=64),
              QuantSpec(4, scheme="log"), QuantSpec(4, symmetric=False, granularity=128)]


def np_word_codes(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    """uint32 words ``[*b, W, N]`` -> codes ``[*b, K, N]`` from the FORMATS text: code of K row ``k`` sits in word
    ``k // (32/b)`` at bits ``[(k mod 32/b)·b, …)`` (the byte layout's rows 4w … 4w+3, little-endian)."""
    per = 32 // bits
    w = words.astype(np.int64)
    ks = np.arange(k)
    return (w[..., ks // per, :] >> ((ks % per) * bits)[:, None]) & ((1 << bits) - 1)


def np_dequant(codes: np.ndarray, qt: QuantizedTensor) -> np.ndarray:
    spec, q = qt.spec, codes.astype(np.float64)
    rep = qt.k // qt.scales.shape[-2]
    s = np.repeat(np.asarray(qt.scales, np.float64), rep, axis=-2)
    z = None if qt.zeros is None else np.repeat(np.asarray(qt.zeros, np.float64), rep, axis=-2)
    if spec.is_ternary:
        return np.where(q == 2, s, np.where(q == 1, z, 0.0))
    b = spec.code_bits
    if spec.scheme == "log":
        half = 2 ** (b - 1)
        return np.where(q >= half, -1.0, 1.0) * s * 2.0 ** (-np.where(q >= half, q - half, q))
    return s * (q - (2.0 ** (b - 1) if z is None else z))


def kernel_names(fn, *args) -> set[str]:
    """Word widths of the dequant-matmul kernels in ``fn``'s jaxpr: {"w32"} / {"w8"} (pallas_call names
    ``qmm_<mode>_<format>_w<bits>``, maybe with a uniquifying number)."""
    return {m for m in re.findall(r"qmm_[a-z]+_[a-z]+\d_[a-z0-9]+_(w32|w8)", str(jax.make_jaxpr(fn)(*args)))}


@pytest.mark.parametrize("spec", WORD_SPECS, ids=lambda s: s.describe())
def test_words_equal_bytes_equal_numpy(spec: QuantSpec, seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 256 if spec.granularity != "channel" else int(rng.integers(9, 80))  # ragged K: padding words
    qt = random_qt(rng, spec, (3, k, 5))
    qw = qt.to_words()
    assert qw.layout == "words" and qw.packed.dtype == np.uint32 and qt.layout == "bytes"
    assert qw.packed.shape == (3, -(-qt.packed.shape[-2] // 4), 5)
    codes = np.asarray(qt.codes())
    np.testing.assert_array_equal(np_word_codes(np.asarray(qw.packed), spec.code_bits, k), codes)
    np.testing.assert_array_equal(np.asarray(qw.codes()), codes)
    ref = np_dequant(codes, qt)
    np.testing.assert_allclose(np.asarray(qw.dequantize(), np.float64), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), np.asarray(qt.dequantize()))
    np.testing.assert_array_equal(np.asarray(qw.to_bytes().packed), np.asarray(qt.packed))  # exact inverse
    assert qw.to_words() is qw and qt.to_bytes() is qt
    # expert slicing keeps the layout; under jit with a traced index too
    i = int(rng.integers(3))
    for sub, want in ((qw[i], ref[i]), (qw[1:3], ref[1:3])):
        assert sub.layout == "words"
        np.testing.assert_allclose(np.asarray(sub.dequantize(), np.float64), want, rtol=1e-6, atol=1e-7)
    got = jax.jit(lambda t, j: t[j].dequantize())(qw, jnp.int32(i))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(qt.dequantize())[i])
    v = jax.vmap(lambda t: t.dequantize())(qw)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(qt.dequantize()))
    assert qw.nbytes == sum(x.nbytes for x in jax.tree_util.tree_leaves(qw)) and "words" in repr(qw)
    assert jax.tree_util.tree_structure(qw) != jax.tree_util.tree_structure(qt)  # the layout is static aux data


def test_no_word_layout_is_a_clear_error(seed: int) -> None:
    rng = np.random.default_rng(seed)
    three = random_qt(rng, QuantSpec(3), (2, 16, 4))
    short = random_qt(rng, QuantSpec(4, granularity=64), (2, 128, 4))
    with pytest.raises(ValueError, match="3-bit codes have no word layout"):
        three.to_words()
    with pytest.raises(ValueError, match="group size 64 too small"):
        short.to_words()
    with pytest.raises(ValueError, match="layout must be one of"):
        three.with_layout("nibbles")
    tree = {"a": three, "b": short, "c": random_qt(rng, QuantSpec(2), (2, 16, 4)), "d": jnp.ones(3)}
    out = convert_layout(tree)
    assert out["a"] is three and out["b"] is short and out["c"].layout == "words" and out["d"] is tree["d"]
    assert convert_layout(out, "bytes")["c"].layout == "bytes"
    arrays, meta = out["c"].to_arrays()
    with pytest.raises(ValueError, match="do not fit"):
        QuantizedTensor.from_arrays({**arrays, "packed": np.zeros((2, 4, 4), np.uint8)}, meta)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(2, symmetric=False), QuantSpec("ternary"),
                                  QuantSpec(8)], ids=lambda s: s.describe())
def test_traced_words_run_the_word_kernel(spec: QuantSpec, seed: int) -> None:
    """qmatmul / grouped / indexed inside jit with the weight as a traced argument: words -> ``_w32`` kernels
    (bytes -> ``_w8``), results equal to the float64 reference."""
    rng = np.random.default_rng(seed)
    e, k, n = 3, 72, 24
    qt = random_qt(rng, spec, (e, k, n))
    qw = qt.to_words()
    w64 = np_dequant(np.asarray(qt.codes()), qt)
    x = jnp.asarray(rng.standard_normal((e, 2, k)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, e, 2), jnp.int32)
    xi = jnp.asarray(rng.standard_normal((2, 1, k)), jnp.float32)
    mm = jax.jit(lambda a, w: ops.qmatmul(a, w, mode="interpret"))
    gr = jax.jit(lambda a, w: ops.grouped_qmatmul(a, w, mode="interpret"))
    ix = jax.jit(lambda a, w, j: ops.indexed_qmatmul(a, w, j, mode="interpret"))
    for fn, args, ref in ((mm, (x,), np.einsum("eck,ekn->ecn", np.asarray(x, np.float64), w64)),
                          (gr, (x,), np.einsum("eck,ekn->ecn", np.asarray(x, np.float64), w64)),
                          (ix, (xi, ids), np.einsum("ack,akn->acn", np.asarray(xi, np.float64),
                                                    w64[np.asarray(ids)]))):
        names = kernel_names(fn, args[0], qw, *args[1:])
        assert names == {"w32"}, names
        assert kernel_names(fn, args[0], qt, *args[1:]) == {"w8"}
        y = np.asarray(fn(args[0], qw, *args[1:]), np.float64)
        assert np.linalg.norm(y - ref) <= 1e-5 * np.linalg.norm(ref)
    # a 2-D expert slice of a words tensor, traced index
    one = jax.jit(lambda a, w, j: ops.qmatmul(a, w[j], mode="interpret"))
    j = int(rng.integers(e))
    assert kernel_names(one, x[0], qw, jnp.int32(j)) == {"w32"}
    y = np.asarray(one(x[0], qw, jnp.int32(j)), np.float64)
    ref = np.asarray(x[0], np.float64) @ w64[j]
    assert np.linalg.norm(y - ref) <= 1e-5 * np.linalg.norm(ref)
    # explicit byte operands of a words tensor (benchmarks compare both layouts)
    (p8, _, _), _ = ops.qt_kernel_operands(qw, 8)
    np.testing.assert_array_equal(np.asarray(p8), np.asarray(qt.packed))


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_checkpoint_keeps_each_layout(tmp_path, fmt: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    qt = random_qt(rng, QuantSpec(4, symmetric=False), (2, 40, 6))
    params = {"bytes": {"kernel": qt}, "words": {"kernel": qt.to_words()}, "three": {"kernel":
              random_qt(rng, QuantSpec(3), (2, 16, 3))}}
    d = store.save_params(params, tmp_path / "ck", format=fmt)
    man = store.read_manifest(d)
    assert "layout" not in man["leaves"]["bytes/kernel"]["meta"]  # the byte layout's manifest is unchanged
    assert man["leaves"]["words/kernel"]["meta"]["layout"] == "words"
    assert man["leaves"]["words/kernel"]["fields"]["packed"]["dtype"] == "uint32"
    back, _ = store.load_params(d)
    for name in ("bytes", "words", "three"):
        a, b = params[name]["kernel"], back[name]["kernel"]
        assert b.layout == a.layout and np.dtype(b.packed.dtype) == np.dtype(a.packed.dtype)
        np.testing.assert_array_equal(np.asarray(b.packed), np.asarray(a.packed))
        np.testing.assert_array_equal(np.asarray(b.dequantize()), np.asarray(qt.dequantize() if name != "three"
                                                                             else a.dequantize()))


def test_sub1_encode_reads_words_as_bytes(seed: int) -> None:
    qt = random_qt(np.random.default_rng(seed), QuantSpec("ternary"), (2, 24, 5))
    a, b = encode(qt), encode(qt.to_words())
    for x, y in zip(a.to_arrays()[0].values(), b.to_arrays()[0].values(), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_model_logits_and_decode_loop_bytes_vs_words(seed: int) -> None:
    """Model.with_weight_layout('words') on a tiny Switch whose four expert kernels are int4 / int2 / ternary /
    int8: the same logits as the byte layout (XLA: bit-identical; word kernels: close), and the compiled greedy
    decode loop runs the word kernels on its traced weights (the byte layout: the byte kernels)."""
    from moqe_jax.model import decode

    m = Model.init(SwitchConfig.preset("tiny").replace(dtype="float32"), seed=seed % (1 << 30))
    specs = iter([QuantSpec(4), QuantSpec(2, symmetric=False), QuantSpec("ternary"), QuantSpec(8)])
    flat = {k: quantize_tensor(v, next(specs), k) if "expert" in k and k.endswith("kernel") else v
            for k, v in flatten_params(m.params).items()}
    qb = m.replace(params=unflatten_params(flat))
    qw = qb.with_weight_layout("words")
    leaves = [x for x in jax.tree_util.tree_leaves(qw.params, is_leaf=lambda x: isinstance(x, QuantizedTensor))
              if isinstance(x, QuantizedTensor)]
    assert sorted(x.spec.describe()[:4] for x in leaves) == ["int2", "int4", "int8", "tern"]
    assert all(x.layout == "words" for x in leaves)
    assert qw.with_weight_layout("bytes").params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"].layout \
        == "bytes"
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(2, 128, (2, 7)), jnp.int32)
    dids = jnp.asarray(rng.integers(2, 128, (2, 5)), jnp.int32)
    logits = jax.jit(lambda mm, i, d: mm.logits(i, d))
    ref = np.asarray(logits(qb.with_kernels("xla"), ids, dids))
    np.testing.assert_array_equal(np.asarray(logits(qw.with_kernels("xla"), ids, dids)), ref)
    np.testing.assert_allclose(np.asarray(logits(qw.with_kernels("interpret"), ids, dids)), ref,
                               rtol=2e-4, atol=2e-4)
    mask, valid = ids > 0, jnp.ones((2,), bool)
    sc = (jnp.int32(2), jnp.int32(0), jnp.int32(1))

    def names(params: dict) -> set[str]:
        return kernel_names(lambda p: decode.greedy_search(m.config, p, ids, 8, mask, valid, *sc,
                                                           kernels="interpret"), params)

    assert names(qw.params) == {"w32"}
    assert names(qb.params) == {"w8"}


def test_sharding_specs_and_placement_keep_words(seed: int) -> None:
    from jax.sharding import AbstractMesh, Mesh
    from jax.sharding import PartitionSpec as P

    from moqe_jax import sharding as shd

    rng = np.random.default_rng(seed)
    m = Model.init("tiny", 0)
    e, d, f = m.config.num_experts, m.config.d_model, m.config.d_ff
    qw = QuantizedTensor.from_codes(rng.integers(0, 16, (e, d, f)), rng.uniform(0.5, 1, (e, 1, f)),
                                    rng.integers(0, 16, (e, 1, f)).astype(np.float32), QuantSpec(4, symmetric=False),
                                    layout="words")
    assert qw.layout == "words" and qw.packed.dtype == np.uint32
    p = m.params
    p["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"] = qw
    got = shd.param_specs(p, AbstractMesh((1, 2, 2), shd.MESH_AXES))["encoder"]["layers_1"]["mlp"]["expert"]["wi"]
    spec = got["kernel"]
    assert isinstance(spec, QuantizedTensor) and spec.layout == "words"
    assert spec.packed == spec.scales == spec.zeros == P("expert", None, None)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), shd.MESH_AXES)
    placed = jax.device_put(p, shd.param_shardings(p, mesh))["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    assert placed.layout == "words"
    np.testing.assert_array_equal(np.asarray(placed.dequantize()), np.asarray(qw.dequantize()))
