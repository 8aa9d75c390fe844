"""Fused dequant-matmul kernels (pallas_kernels/) vs an independent float64 NumPy reference and the XLA path.

The NumPy reference unpacks ``packed`` itself from docs/FORMATS.md §1 (it does not call qtensor's unpacking)
and evaluates the value table of §1. Every run draws fresh random inputs; kernel outputs are NaN-poisoned
before the launch so that unwritten tiles fail (interpret mode also NaN-fills outputs itself). On CPU the
kernels run in Pallas interpret mode; the tests marked ``gpu`` run the same cases through the Triton backend.
The kernels take raw arrays; ``moqe_jax.ops.kernel_operands`` gives them for a ``QuantizedTensor``.
"""

from __future__ import annotations

import _helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moqe_jax import ops
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from pallas_kernels import backend
from pallas_kernels import dequant_matmul as dq
from pallas_kernels.codes import code_consts, code_values, codes_per_row, value_shift
from pallas_kernels.dequant_matmul import Blocks, plan_blocks

ON_GPU = backend.gpu_kernels_available()
INTERPRET = not ON_GPU
RNG: np.random.Generator  # set for every test from the `seed` fixture (tests/conftest.py)


@pytest.fixture(autouse=True)
def _seeded_rng(seed: int) -> None:
    """Fresh inputs every run, replayable with MOQE_TEST_SEED."""
    global RNG
    RNG = np.random.default_rng(seed)


# ---------------------------------------------------------------- independent NumPy reference (FORMATS.md §1)
def np_unpack(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """uint8 ``[*b, R, N]`` -> int codes ``[*b, K, N]`` written from the spec text, loop-free but independent."""
    packed = packed.astype(np.int64)
    ks = np.arange(k)
    if bits == 3:
        k8 = packed.shape[-2] // 3
        code = np.zeros((*packed.shape[:-2], k, packed.shape[-1]), np.int64)
        for c in range(3):
            plane = packed[..., c * k8 + ks // 8, :]
            code |= ((plane >> (ks % 8)[:, None]) & 1) << c
        return code
    p = 8 // bits
    rows = packed[..., ks // p, :]
    return (rows >> ((ks % p) * bits)[:, None]) & ((1 << bits) - 1)


def np_dequant(qt: QuantizedTensor) -> np.ndarray:
    spec = qt.spec
    q = np_unpack(np.asarray(qt.packed), spec.code_bits, qt.k).astype(np.float64)
    rep = qt.k // qt.scales.shape[-2]
    s = np.repeat(np.asarray(qt.scales, np.float64), rep, axis=-2)
    z = None if qt.zeros is None else np.repeat(np.asarray(qt.zeros, np.float64), rep, axis=-2)
    if spec.is_ternary:
        return np.where(q == 2, s, np.where(q == 1, z, 0.0))
    b = int(spec.bits)
    if spec.scheme == "log":
        half = 2 ** (b - 1)
        sign = np.where(q >= half, -1.0, 1.0)
        e = np.where(q >= half, q - half, q)
        return sign * s * 2.0 ** (-e)
    if z is None:
        z = 2.0 ** (b - 1)
    return s * (q - z)


def random_qt(spec: QuantSpec, shape: tuple[int, ...]) -> QuantizedTensor:
    return _helpers.random_qt(RNG, spec, shape)


def launch(x: jax.Array, qt: QuantizedTensor, *, ids: jax.Array | None = None, blocks: Blocks | None = None,
           interpret: bool = INTERPRET, word_bits: int | None = None) -> jax.Array:
    """The raw kernel on ``qt``'s operands, output NaN-poisoned: ``x [..., K]`` for a 2-D weight, else
    ``x [A, C, K]`` (grouped, or indexed by ``ids``). ``word_bits``: operand layout (None = the adapter's)."""
    (packed, scales, zeros), layout = ops.qt_kernel_operands(qt, word_bits)
    if qt.ndim == 2:
        packed, scales, zeros = packed[None], scales[None], None if zeros is None else zeros[None]
        x3 = x.reshape(1, -1, x.shape[-1])
    else:
        x3 = x
    call = dq.qmm_call(x3, packed, scales, zeros, ids, **layout, blocks=blocks, interpret=interpret)
    y = poisoned(call, interpret)
    return y.reshape(*x.shape[:-1], y.shape[-1]) if qt.ndim == 2 else y


def poisoned(call: dq.KernelCall, interpret: bool) -> jax.Array:
    """Run a prepared launch into an output pre-filled with NaN (aliased into the kernel), so any element the
    kernel fails to write shows up as NaN (interpret mode NaN-fills outputs itself; the GPU does not)."""
    out = jnp.full(call.out_shape.shape, jnp.nan, call.out_shape.dtype)

    def kernel(*refs):  # the aliased poison input is the same buffer as the output
        call.kernel(*refs[:-2], refs[-1])

    run = backend.pallas_call(kernel, out_shape=call.out_shape, grid=call.grid, interpret=interpret,
                              num_warps=call.plan.blocks.num_warps, num_stages=call.plan.blocks.num_stages,
                              input_output_aliases={len(call.args): 0})
    return call.finish(run(*call.args, out))


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    assert np.all(np.isfinite(a)), "non-finite output (unwritten or poisoned tile)"
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def tol(dtype) -> float:
    if jnp.dtype(dtype) == jnp.bfloat16:
        return 2e-2
    # f32: exact-ish in interpret mode; Triton's f32 dot measured at TF32 level (~3e-4) on the H100
    return 1e-5 if INTERPRET else 2e-3


# (spec, granularity) coverage: every bits × scheme × symmetry, channel and group scales
SPECS = [
    QuantSpec(8), QuantSpec(8, "log"), QuantSpec(8, symmetric=False, granularity=128),
    QuantSpec(4), QuantSpec(4, symmetric=False), QuantSpec(4, "log"), QuantSpec(4, granularity=64),
    QuantSpec(4, symmetric=False, granularity=128),
    QuantSpec(3), QuantSpec(3, symmetric=False), QuantSpec(3, "log", granularity=128),
    QuantSpec(2), QuantSpec(2, symmetric=False), QuantSpec(2, "log"), QuantSpec(2, symmetric=False, granularity=64),
    QuantSpec("ternary"), QuantSpec("ternary", granularity=128),
]
MS = (1, 3, 16, 64)


def _shape(spec: QuantSpec, i: int) -> tuple[int, int, int]:
    m = MS[i % len(MS)]
    if spec.granularity == "channel":
        k = (203, 77, 264, 130)[i % 4]  # ragged: not multiples of 8 or of any block
    else:
        k = 3 * spec.granularity  # 3 groups
    n = (37, 129, 5, 66)[(i // 2) % 4]  # odd / ragged N
    return m, k, n


@pytest.mark.parametrize("i,spec", list(enumerate(SPECS)), ids=[s.describe() for s in SPECS])
def test_quant_matmul_matches_numpy_and_xla(i: int, spec: QuantSpec) -> None:
    m, k, n = _shape(spec, i)
    dtype = jnp.bfloat16 if i % 3 == 2 else jnp.float32
    qt = random_qt(spec, (k, n))
    x = jnp.asarray(RNG.standard_normal((m, k)), dtype)
    y = launch(x, qt)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = np.asarray(x, np.float64) @ np_dequant(qt)
    assert rel_err(y, ref) < tol(dtype), (spec.describe(), m, k, n, dtype)
    xla = ops.qmatmul(x, qt, mode="xla")
    assert rel_err(y, np.asarray(xla, np.float64)) < tol(dtype)


CODE_SPECS = [QuantSpec(8), QuantSpec(8, symmetric=False), QuantSpec(8, "log"), QuantSpec(4), QuantSpec(4, "log"),
              QuantSpec(4, symmetric=False), QuantSpec(3), QuantSpec(3, symmetric=False), QuantSpec(3, "log"),
              QuantSpec(2), QuantSpec(2, symmetric=False), QuantSpec(2, "log"), QuantSpec("ternary")]


@pytest.mark.parametrize("spec", CODE_SPECS, ids=lambda s: s.describe())
def test_code_values_every_code_matches_value_table(spec: QuantSpec) -> None:
    """v3 inner-loop algebra (magic-number floats, in-place codes, scale after the reduction) on every code at
    every in-byte position vs the FORMATS.md §1 value table in float64."""
    n = 7
    codes = np.arange(spec.maxq + 1)[:, None] * np.ones((1, n), np.int64)
    s = RNG.uniform(0.2, 1.5, (1, n)) * (1e-2 if spec.scheme == "log" else 1.0)
    z = None
    if spec.is_ternary:
        z = -RNG.uniform(0.2, 1.5, (1, n))
    elif spec.has_zeros:
        z = RNG.integers(0, spec.maxq + 1, (1, n)).astype(np.float64)
    b = int(spec.bits) if not spec.is_ternary else 2
    if spec.is_ternary:
        ref = np.where(codes == 2, s, np.where(codes == 1, z, 0.0))
    elif spec.scheme == "log":
        half = 2 ** (b - 1)
        ref = np.where(codes >= half, -1.0, 1.0) * s * 2.0 ** -np.where(codes >= half, codes - half, codes)
    else:
        ref = s * (codes - (2.0 ** (b - 1) if z is None else z))
    fmt = {"scheme": spec.code_scheme, "code_bits": spec.code_bits}
    p = codes_per_row(spec.code_bits)
    shifts = [j * spec.code_bits for j in range(p)] if value_shift(**fmt) else [0]
    for sh in shifts:
        q = jnp.asarray(codes << sh, jnp.uint32)
        s32 = jnp.asarray(s, jnp.float32)
        z32 = None if z is None else jnp.asarray(z, jnp.float32)
        v = np.asarray(code_values(q, code_consts(s32, z32, **fmt, shift=sh), **fmt, shift=sh), np.float64)
        got = v if spec.is_ternary else np.asarray(s32, np.float64) * v * 2.0 ** -sh
        # 8-bit log code e=127 (2^-127, subnormal) decodes to 0: allowed by the absolute floor
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max() if spec.is_ternary else 1e-36)


def test_explicit_blocks_split_k_and_m_tiles() -> None:
    """Several M tiles, N tiles and K splits in one launch (uneven split of K tiles, ragged last tile)."""
    spec = QuantSpec(4, symmetric=False)
    m, k, n = 40, 330, 75
    qt = random_qt(spec, (k, n))
    x = jnp.asarray(RNG.standard_normal((2, m // 2, k)), jnp.float32)
    ref = np.asarray(x, np.float64) @ np_dequant(qt)
    blocks = Blocks(bm=16, bn=32, bkr=16, splits=3)
    y = launch(x, qt, blocks=blocks)
    assert y.shape == (2, m // 2, n)
    assert rel_err(y, ref) < tol(jnp.float32)
    # GEMV (fma) form with split-K, 3 rows
    y = launch(x[0, :3], qt, blocks=Blocks(bm=3, bn=32, bkr=16, splits=2, mode="fma"))
    assert y.shape == (3, n) and rel_err(y, ref[0, :3]) < 1e-5


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(2, symmetric=False, granularity=128), QuantSpec("ternary"),
                                  QuantSpec(3)], ids=lambda s: s.describe())
@pytest.mark.parametrize("m", [1, 16])
def test_full_tiles_without_masks(spec: QuantSpec, m: int) -> None:
    """Shapes that fill every tile exactly (the kernel then drops all load/store masks), split-K included."""
    k, n = 512, 64
    qt = random_qt(spec, (k, n))
    x = jnp.asarray(RNG.standard_normal((m, k)), jnp.float32)
    ref = np.asarray(x, np.float64) @ np_dequant(qt)
    for blocks in (None, Blocks(bm=m, bn=32, bkr=16, splits=2, mode="fma" if m == 1 else "dot")):
        y = launch(x, qt, blocks=blocks)
        assert y.shape == (m, n) and rel_err(y, ref) < tol(jnp.float32), blocks


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, symmetric=False), QuantSpec("ternary"),
                                  QuantSpec(2, granularity=64), QuantSpec(8, "log")],
                         ids=lambda s: s.describe())
@pytest.mark.parametrize("c", [1, 5])
def test_grouped_matches_numpy(spec: QuantSpec, c: int) -> None:
    e, k, n = 3, (128 if spec.granularity == "channel" else 192), 45
    qt = random_qt(spec, (e, k, n))
    x = jnp.asarray(RNG.standard_normal((e, c, k)), jnp.bfloat16 if c == 5 else jnp.float32)
    y = launch(x, qt)
    assert y.shape == (e, c, n)
    ref = np.einsum("eck,ekn->ecn", np.asarray(x, np.float64), np_dequant(qt))
    assert rel_err(y, ref) < tol(x.dtype)
    # the ops entry point with the interpret kernels equals the XLA reference
    y2 = ops.grouped_qmatmul(x, qt, mode="interpret" if INTERPRET else "pallas")
    y3 = ops.grouped_qmatmul(x, qt, mode="xla")
    assert rel_err(y2, np.asarray(y3, np.float64)) < tol(x.dtype)


def test_dispatch_routes_and_falls_back() -> None:
    spec = QuantSpec(4)
    qt = random_qt(spec, (2, 64, 24))
    x = jnp.asarray(RNG.standard_normal((2, 3, 4, 64)), jnp.float32)
    assert ops.explain(x, qt) is None
    y = ops.qmatmul(x, qt, mode="interpret")  # stacked weight, x [E, ..., K]
    assert y.shape == (2, 3, 4, 24)
    ref = np.einsum("eabk,ekn->eabn", np.asarray(x, np.float64), np_dequant(qt))
    assert rel_err(y, ref) < 1e-5
    assert "pallas_call" in str(jax.make_jaxpr(lambda a: ops.qmatmul(a, qt, mode="interpret"))(x))
    # unsupported cases run the XLA reference (no kernel launch), explain says why
    assert "dtype" in ops.explain(jnp.ones((3, 64), jnp.int32), qt[0])
    small_groups = random_qt(QuantSpec(2, granularity=8), (64, 16))
    assert "group size" in ops.explain(x[0, 0], small_groups)
    jaxpr = str(jax.make_jaxpr(lambda a: ops.qmatmul(a, small_groups, mode="interpret"))(x[0, 0]))
    assert "pallas_call" not in jaxpr
    assert rel_err(ops.qmatmul(x[0, 0], small_groups, mode="interpret"),
                   np.asarray(x[0, 0], np.float64) @ np_dequant(small_groups)) < 1e-5
    assert ops.explain(x[0, 0], jnp.ones((64, 4))) is not None
    with pytest.raises(ValueError, match="kernel mode"):
        ops.qmatmul(x[0, 0], qt[0], mode="triton")


def test_plan_blocks_table() -> None:
    b = plan_blocks(1, 4096, 10240, 1, code_bits=4, group_size=None)
    assert (b.mode, b.bm, b.bn, b.bkr, b.splits) == ("fma", 1, 32, 128, 1)
    b = plan_blocks(16, 3072, 768, 1, code_bits=4, group_size=None)
    assert b.mode == "dot" and b.bm == 16 and b.splits > 1
    b = plan_blocks(256, 768, 3072, 1, code_bits=2, group_size=128)
    assert b.bm == 64 and b.bkr == 32 and b.splits >= 1
    for blk in (b.bm, b.bn, b.bkr):
        assert blk & (blk - 1) == 0


def test_backend_messages() -> None:
    assert isinstance(backend.gpu_kernels_available(), bool)
    if not ON_GPU:
        with pytest.raises(backend.KernelBackendError, match="xla"):
            backend.pallas_call(lambda o: None, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), grid=(1,))
        with pytest.raises(ops.KernelError, match="xla"):
            ops.qmatmul(jnp.ones((1, 64)), random_qt(QuantSpec(4), (64, 16)), mode="pallas")


def test_tiny_switch_model_interpret_equals_xla() -> None:
    from moqe_jax.api import Model
    from moqe_jax.config import SwitchConfig
    from moqe_jax.model.switch import SwitchTransformer
    from moqe_jax.quant.rtn import quantize_tensor

    # float32 activations: the kernel and XLA then agree to rounding (bf16 differs by its own rounding, ~5e-3)
    cfg = SwitchConfig.preset("tiny").replace(dtype="float32")
    model = Model.init(cfg, seed=int(RNG.integers(1 << 30)))
    flat = jax.tree_util.tree_flatten_with_path(model.params)[0]

    def quantize(path, leaf):
        keys = "/".join(str(getattr(p, "key", p)) for p in path)
        if "expert" in keys and keys.endswith("kernel"):
            return quantize_tensor(leaf, QuantSpec(4, symmetric=False), keys)
        return leaf

    params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(model.params),
                                          [quantize(p, v) for p, v in flat])
    assert any(isinstance(v, QuantizedTensor)
               for v in jax.tree_util.tree_leaves(params, is_leaf=lambda t: isinstance(t, QuantizedTensor)))
    ids = jnp.asarray(RNG.integers(2, cfg.vocab_size, (2, 7)), jnp.int32)
    dids = jnp.asarray(RNG.integers(2, cfg.vocab_size, (2, 5)), jnp.int32)

    def fwd(kernels):
        return SwitchTransformer(cfg, kernels).apply({"params": params}, ids, dids, None, None, False)[0]

    ref = jax.jit(fwd, static_argnums=0)("xla")
    got = jax.jit(fwd, static_argnums=0)("interpret" if INTERPRET else "pallas")
    assert rel_err(got, np.asarray(ref, np.float64)) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU with the Pallas Triton backend")
@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, symmetric=False), QuantSpec("ternary"),
                                  QuantSpec(2, granularity=128), QuantSpec(8)], ids=lambda s: s.describe())
@pytest.mark.parametrize("m", [1, 64])
def test_gpu_large_shapes(spec: QuantSpec, m: int) -> None:
    """Triton backend on a benchmark-sized shape, vs float64 NumPy (bf16 activations)."""
    k, n = 1024, 4096
    qt = random_qt(spec, (k, n))
    x = jnp.asarray(RNG.standard_normal((m, k)), jnp.bfloat16)
    y = launch(x, qt, interpret=False)
    ref = np.asarray(x, np.float64) @ np_dequant(qt)
    assert rel_err(y, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU with the Pallas Triton backend")
@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(2), QuantSpec("ternary"), QuantSpec(4, granularity=128)],
                         ids=lambda s: s.describe())
def test_gpu_word_gemv_and_byte_layouts(spec: QuantSpec) -> None:
    """Triton backend: the word GEMV at M = 1 and 4, the dot mode at M = 16 on words, the v3 byte GEMV at M = 1,
    ragged K and N, vs float64 NumPy (bf16 activations)."""
    k, n = 2080 if spec.granularity == "channel" else 2048, 1000
    qt = random_qt(spec, (k, n))
    ref_w = np_dequant(qt)
    for m, wb in ((1, 32), (4, 32), (16, 32), (1, 8)):
        x = jnp.asarray(RNG.standard_normal((m, k)), jnp.bfloat16)
        y = launch(x, qt, interpret=False, word_bits=wb)
        assert rel_err(y, np.asarray(x, np.float64) @ ref_w) < 2e-2, (m, wb)


@pytest.mark.parametrize("spec", [QuantSpec(4, symmetric=False), QuantSpec(2)], ids=lambda s: s.describe())
def test_indexed_active_experts_matches_numpy(spec: QuantSpec) -> None:
    """Decode launch over active experts only: slot a uses W[ids[a]] (repeats allowed, unused experts skipped)."""
    for k in (96, 128):  # ragged last K tile / full K tiles (tiled packed operand)
        e, n, a = 5, 52, 4
        qt = random_qt(spec, (e, k, n))
        ids = jnp.asarray(RNG.integers(0, e, a), jnp.int32)
        x = jnp.asarray(RNG.standard_normal((a, 1, k)), jnp.float32)
        y = launch(x, qt, ids=ids)
        w = np_dequant(qt)[np.asarray(ids)]
        ref = np.einsum("ack,akn->acn", np.asarray(x, np.float64), w)
        assert y.shape == (a, 1, n) and rel_err(y, ref) < 1e-5, k


# ---------------------------------------------------------------- word layout + GEMV (issue 14)
def test_pack_words_matches_formats_text() -> None:
    """Word ``w`` of a column = packed bytes 4w…4w+3 little-endian, code ``j`` of the word at bits [j·b, (j+1)·b)
    (docs/FORMATS.md §1, kernel word layout), checked against codes unpacked from the stored bytes."""
    for spec, k in ((QuantSpec(4), 77), (QuantSpec(2), 130), (QuantSpec(8), 41)):
        qt = random_qt(spec, (2, k, 9))
        words = np.asarray(dq.pack_words(qt.packed), np.int64)
        b = spec.code_bits
        p = 32 // b
        assert words.shape == (2, -(-qt.packed.shape[-2] // 4), 9)
        codes = np_unpack(np.asarray(qt.packed), b, qt.k)
        ks = np.arange(k)
        from_words = (words[:, ks // p, :] >> ((ks % p) * b)[:, None]) & ((1 << b) - 1)
        np.testing.assert_array_equal(from_words, codes)
        np.testing.assert_array_equal(np.asarray(dq.unpack_codes(dq.pack_words(qt.packed), code_bits=b, k=k)), codes)


# (spec, M values): together M = 1…4 and 16 on int4 / int3 / int2 / ternary / 8-bit log, channel and group scales
GEMV_CASES = [(QuantSpec(4), (1, 3, 16)), (QuantSpec(4, symmetric=False, granularity=128), (4,)),
              (QuantSpec(2, granularity=256), (2, 16)), (QuantSpec("ternary"), (1, 4)),
              (QuantSpec(3, symmetric=False), (2,)), (QuantSpec(8, "log"), (3,))]


@pytest.mark.parametrize("spec,ms", GEMV_CASES, ids=[c[0].describe() for c in GEMV_CASES])
def test_gemv_matches_reference(spec: QuantSpec, ms: tuple[int, ...]) -> None:
    """Batch 1–4 GEMV (fma) and M = 16 (dot) on both operand layouts vs ``qmm_reference`` (and the reference vs
    the float64 NumPy value table): ragged K and N, split-K planned for the small grid."""
    k = 2 * spec.granularity if spec.granularity != "channel" else 300
    n = 40
    qt = random_qt(spec, (k, n))
    gs = None if spec.granularity == "channel" else spec.granularity
    layouts = (8, 32) if dq.words_supported(spec.code_bits, gs) else (8,)
    for m in ms:
        x = jnp.asarray(RNG.standard_normal((m, k)), jnp.float32)
        ref64 = np.asarray(x, np.float64) @ np_dequant(qt)
        for wb in layouts:
            (packed, scales, zeros), layout = ops.qt_kernel_operands(qt, wb)
            args = (x[None], packed[None], scales[None], None if zeros is None else zeros[None])
            ref = np.asarray(dq.qmm_reference(*args, **layout), np.float64)[0]
            assert rel_err(ref, ref64) < 1e-6
            call = dq.qmm_call(*args, **layout, interpret=True)
            assert call.plan.blocks.mode == ("fma" if m <= (dq.GEMV_MAX_M if wb == 32 else dq.FMA_MAX_M) else "dot")
            y = poisoned(call, True)[0]
            assert y.shape == (m, n) and rel_err(y, ref) < 1e-5, (m, wb)


def test_word_plan_table() -> None:
    """Word GEMV plan: 16 words × 64 columns, split-K toward ~4 programs per SM; dot mode for M > 4."""
    b = plan_blocks(1, 4096, 10240, 1, code_bits=4, group_size=None, word_bits=32)
    assert (b.mode, b.bm, b.bn, b.bkr, b.splits) == ("fma", 1, 64, 16, 4)
    b = plan_blocks(4, 4096, 10240, 1, code_bits=2, group_size=None, word_bits=32)
    assert (b.mode, b.bm, b.bkr) == ("fma", 4, 16) and 4 * b.bkr * b.bn <= 4096
    b = plan_blocks(16, 2080, 6144, 1, code_bits=4, group_size=None, word_bits=32)
    assert (b.mode, b.bm, b.bkr) == ("dot", 16, 16)
    assert not dq.words_supported(3, None) and not dq.words_supported(2, 128) and dq.words_supported(4, 128)


def test_ttir_inner_loop_loads_32bit_words() -> None:
    """Lowered for CUDA on this machine (no GPU): the word GEMV's K loop loads one i32 tile (8 int4 codes per
    element) and no i8; the byte layout loads i8 (benchmarks/ttir.py reads the TTIR)."""
    from benchmarks.ttir import gemv_ttir, loads, loop_body

    words = loads(loop_body(gemv_ttir(4, "linear", 32, m=1, k=512, n=256)))
    assert "tensor<16x64x!tt.ptr<i32>>" in words and not any("i8>" in t for t in words), words
    assert sum("bf16" in t for t in words) == 8  # one strided activation vector per residue
    assert any("i8>" in t for t in loads(loop_body(gemv_ttir(4, "linear", 8, m=1, k=512, n=256))))
