"""Sub1Tensor codec: bit-exact round trips, an independent pure-Python greedy encoder, storage
validation on corrupt streams, QMoE's w_comp/row_off/ter_minmax layout (docs/QMOE.md §1.5–1.7)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moqe_jax.checkpoint.qmoe import from_qmoe, load_qmoe_experts, qmoe_layers_from_state_dict, to_qmoe
from moqe_jax.errors import CheckpointError, QuantizationError
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.packed.sub1 import Sub1Tensor, decode_pairs
from moqe_jax.packed.sub1_dict import get_dictionary
from moqe_jax.quant.sub1 import encode, encode_pairs, ternary_entropy_bits
from moqe_jax.quant.sub1_compress import compress_params

TERN = QuantSpec(bits="ternary")
BF16 = np.dtype(ml_dtypes.bfloat16)


def ref_encode_row(pairs):
    """QMoE's per-row greedy longest match, written with a dict of tuples (no trie table)."""
    d = get_dictionary()
    index = getattr(ref_encode_row, "_index", None)
    if index is None:
        index = {tuple(d.seq[c, :d.length[c]].tolist()): c for c in range(len(d.length))}
        ref_encode_row._index = index
    out, cur = [], ()
    for r in pairs:
        if cur + (int(r),) in index:
            cur = cur + (int(r),)
        else:
            out.append(index[cur])
            cur = (int(r),)
    out.append(index[cur])
    return out


def ref_decode_row(codewords):
    d = get_dictionary()
    return [int(r) for c in codewords for r in d.seq[c, :d.length[c]]]


def random_qt(rng, shape, p0, dtype=np.float32):
    codes = rng.choice(3, size=shape, p=[p0, (1 - p0) / 2, (1 - p0) / 2]).astype(np.uint8)
    g = (*shape[:-2], 1, shape[-1])
    s = rng.uniform(0.1, 1.0, g).astype(np.float32)
    z = -rng.uniform(0.1, 1.0, g).astype(np.float32)
    return QuantizedTensor.from_codes(codes, s, z, TERN, dtype), codes


@pytest.mark.parametrize("p0", [0.5, 0.75, 0.885, 0.97])
def test_encoder_matches_python_reference(p0, seed):
    rng = np.random.default_rng(seed)
    t = rng.choice(3, size=(23, 2 * 57), p=[p0, (1 - p0) / 2, (1 - p0) / 2])
    pairs = (t[:, 0::2] + 3 * t[:, 1::2]).astype(np.uint8)
    stream, row_off = encode_pairs(pairs, chunk_elems=57 * 5)  # several row chunks
    assert stream.dtype == np.uint16 and row_off.dtype == np.int32 and row_off[0] == 0
    for r in range(pairs.shape[0]):
        got = stream[row_off[r]:row_off[r + 1]].tolist()
        assert got == ref_encode_row(pairs[r])
        assert ref_decode_row(got) == pairs[r].tolist()
    np.testing.assert_array_equal(np.asarray(decode_pairs(stream, *pairs.shape)), pairs)


@pytest.mark.parametrize("p0,shape", [(0.5, (2, 40, 24)), (0.885, (3, 96, 40)), (0.97, (64, 17)),
                                      (0.8, (2, 2, 33, 8))])
def test_roundtrip_bit_exact(p0, shape, seed):
    rng = np.random.default_rng(seed)
    qt, codes = random_qt(rng, shape, p0)
    st = encode(qt)
    assert st.shape == qt.shape
    back = st.decode()
    np.testing.assert_array_equal(np.asarray(back.codes()), codes)
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(qt.packed))
    np.testing.assert_array_equal(np.asarray(back.scales), np.asarray(qt.scales))
    np.testing.assert_array_equal(np.asarray(back.zeros), np.asarray(qt.zeros))
    assert back.spec == qt.spec and back.k == qt.k
    # traced decode (XLA reference path under jit) equals the eager one
    dq = jax.jit(lambda s: s.dequantize(jnp.float32))(st)
    np.testing.assert_array_equal(np.asarray(dq), np.asarray(qt.dequantize(jnp.float32)))
    # accounting: 2 B/codeword + 4 B/offset + 2×4 B per row
    rows = int(np.prod(shape[:-2], dtype=np.int64)) * shape[-1]
    assert st.nbytes == 2 * st.stream.size + 4 * (rows + 1) + 8 * rows
    assert st.bits_per_param == pytest.approx(8 * st.nbytes / np.prod(shape))


def test_rtn_ternary_roundtrip_and_compression(seed):
    from moqe_jax.quant.rtn import quantize_tensor

    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=(4, 256, 48)).astype(np.float32) * 0.02
    qt = quantize_tensor(w, QuantSpec(bits="ternary"), "rtn")
    st = encode(qt)
    np.testing.assert_array_equal(np.asarray(st.decode().dequantize()), np.asarray(qt.dequantize()))
    codes = np.asarray(qt.codes())
    c = np.bincount(codes.reshape(-1), minlength=3) / codes.size
    h = -sum(p * np.log2(p) for p in c if p > 0)
    assert ternary_entropy_bits(qt) == pytest.approx(h)
    assert ternary_entropy_bits(0.885) == pytest.approx(0.6298, abs=1e-4)


def test_iid_rate_matches_qmoe_figures(seed):
    """i.i.d. P(0)=0.885 on QMoE's base wo shape: ≈21.7 weights/codeword, ≈21.1× incl. row metadata (§1.7)."""
    rng = np.random.default_rng(seed)
    rows, cols = 96, 3072
    t = rng.choice(3, size=(rows, cols), p=[0.885, 0.0575, 0.0575])
    stream, _ = encode_pairs((t[:, 0::2] + 3 * t[:, 1::2]).astype(np.uint8))
    wpc = rows * cols / stream.size
    assert 21.2 < wpc < 22.2
    ratio = 16 * 768 * cols / (16 * stream.size * 768 / rows + 64 * 769)
    assert 20.6 < ratio < 21.6


def test_encode_rejects_bad_input(seed):
    rng = np.random.default_rng(seed)
    with pytest.raises(QuantizationError):
        encode(QuantizedTensor.from_codes(rng.integers(0, 16, (16, 4)), np.ones((1, 4)), np.zeros((1, 4)),
                                          QuantSpec(bits=4, symmetric=False)))
    with pytest.raises(QuantizationError):  # group-wise ternary has no QMoE representation
        encode(QuantizedTensor.from_codes(rng.integers(0, 3, (16, 4)), np.ones((2, 4)), -np.ones((2, 4)),
                                          QuantSpec(bits="ternary", granularity=8)))
    with pytest.raises(QuantizationError):  # code 3 is not a ternary symbol
        encode(QuantizedTensor.from_codes(np.full((16, 4), 3), np.ones((1, 4)), -np.ones((1, 4)), TERN))


def test_storage_roundtrip_and_corruption(seed):
    rng = np.random.default_rng(seed)
    qt, codes = random_qt(rng, (3, 64, 16), 0.885)
    st = encode(qt)
    arrays, meta = st.to_arrays()
    assert meta["type"] == "Sub1Tensor"
    back = Sub1Tensor.from_arrays({k: np.array(v) for k, v in arrays.items()}, meta)
    np.testing.assert_array_equal(np.asarray(back.decode().codes()), codes)

    def load(**changes):
        a = {k: np.array(v) for k, v in arrays.items()}
        m = dict(meta)
        for k, v in changes.items():
            (m if k in ("crc32", "type", "k", "dec_sha256") else a)[k] = v
        return Sub1Tensor.from_arrays(a, m)

    s = arrays["stream"]
    with pytest.raises(CheckpointError, match="checksum"):
        load(stream=rng.integers(0, 2**16, s.size).astype(np.uint16))
    with pytest.raises(CheckpointError, match="truncated"):
        load(stream=s[:-3].copy())
    ro = np.array(arrays["row_off"])
    bad = ro.copy()
    bad[5], bad[6] = bad[6], bad[5]
    with pytest.raises(CheckpointError, match="increasing"):
        load(row_off=bad)
    bad = ro.copy()
    bad[-1] = s.size + 100
    with pytest.raises(CheckpointError):
        load(row_off=bad)
    with pytest.raises(CheckpointError):
        load(crc32=meta["crc32"] ^ 1)
    with pytest.raises(CheckpointError):
        load(stream=s.astype(np.int32))
    with pytest.raises(CheckpointError):
        load(k=66)  # rows no longer decode to K/2 pairs
    with pytest.raises(CheckpointError):
        load(type="QuantizedTensor")
    with pytest.raises(CheckpointError):
        load(dec_sha256="0" * 64)
    # without a checksum, random bytes are still caught structurally (pair counts per row)
    m = dict(meta)
    m.pop("crc32")
    a = {k: np.array(v) for k, v in arrays.items()}
    a["stream"] = rng.integers(0, 2**16, s.size).astype(np.uint16)
    with pytest.raises(CheckpointError, match="pairs"):
        Sub1Tensor.from_arrays(a, m)


def _qmoe_reference_layout(codes_e, smin, smax):
    """QMoE buffers for one expert written independently: torch layout rows = out features = our N."""
    k, n = codes_e.shape
    w_comp, row_off = [], [0]
    for r in range(n):
        t = codes_e[:, r].astype(np.int64)
        cw = ref_encode_row(t[0::2] + 3 * t[1::2])
        w_comp += cw
        row_off.append(len(w_comp))
    mm = np.empty(2 * n, BF16)
    mm[0::2], mm[1::2] = smin.astype(BF16), smax.astype(BF16)
    return {"w_comp": np.array(w_comp, np.uint16).view(np.int16), "row_off": np.array(row_off, np.int32),
            "ter_minmax": mm}


def test_qmoe_import_export(tmp_path, seed):
    rng = np.random.default_rng(seed)
    e, k, n = 3, 48, 12
    codes = rng.choice(3, size=(e, k, n), p=[0.88, 0.06, 0.06]).astype(np.uint8)
    smin = -rng.uniform(0.1, 1, (e, n)).astype(np.float32)
    smax = rng.uniform(0.1, 1, (e, n)).astype(np.float32)
    experts = [_qmoe_reference_layout(codes[i], smin[i], smax[i]) for i in range(e)]
    st = from_qmoe(experts)  # K inferred from the first row
    assert st.shape == (e, k, n) and st.scales.dtype == BF16
    qt = st.decode()
    np.testing.assert_array_equal(np.asarray(qt.codes()), codes)
    np.testing.assert_array_equal(np.asarray(qt.zeros)[:, 0], smin.astype(BF16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(qt.scales)[:, 0], smax.astype(BF16).astype(np.float32))
    # our own encoder produces QMoE's stream bit for bit
    ours = encode(QuantizedTensor.from_codes(codes, smax[:, None], smin[:, None], TERN))
    np.testing.assert_array_equal(np.asarray(ours.stream), np.asarray(st.stream))
    np.testing.assert_array_equal(np.asarray(ours.row_off), np.asarray(st.row_off))
    out = to_qmoe(st)
    for a, b in zip(out, experts, strict=True):
        for key in ("w_comp", "row_off", "ter_minmax"):
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key].view(np.uint16) if key != "row_off" else a[key],
                                          b[key].view(np.uint16) if key != "row_off" else b[key])
    assert st[1].shape == (k, n)
    np.testing.assert_array_equal(np.asarray(st[1].decode().codes()), codes[1])
    # state-dict grouping, torch tensors (bf16 via int16 view)
    import torch

    sd = {}
    for i, ex in enumerate(experts):
        for key, v in ex.items():
            t = torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16) if key == "ter_minmax" \
                else torch.from_numpy(v.copy())
            sd[f"encoder.block.1.layer.1.mlp.experts.expert_{i}.wi.{key}"] = t
    layers = qmoe_layers_from_state_dict(sd)
    assert list(layers) == ["encoder.block.1.layer.1.mlp.wi"]
    np.testing.assert_array_equal(np.asarray(layers["encoder.block.1.layer.1.mlp.wi"].decode().codes()), codes)
    torch.save(sd, tmp_path / "exp00.pt")
    loaded = load_qmoe_experts([tmp_path / "exp00.pt"])
    assert list(loaded) == ["encoder/layers_1/mlp/expert/wi/kernel"]
    np.testing.assert_array_equal(np.asarray(loaded["encoder/layers_1/mlp/expert/wi/kernel"].codes()), codes)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        load_qmoe_experts([tmp_path / "bad.pt"])
    bad = dict(experts[0])
    bad["row_off"] = bad["row_off"][:-1].copy()
    with pytest.raises(CheckpointError):
        from_qmoe([bad])


def test_compress_params_tree(seed):
    rng = np.random.default_rng(seed)
    qt, _ = random_qt(rng, (4, 64, 32), 0.885)
    q4 = QuantizedTensor.from_codes(rng.integers(0, 16, (64, 32)), np.ones((1, 32)), None, QuantSpec(bits=4))
    tree = {"enc": {"expert": {"wi": {"kernel": qt}}, "attn": {"kernel": np.ones((8, 8), np.float32)}},
            "dense": {"kernel": q4}}
    new, rep = compress_params(tree)
    st = new["enc"]["expert"]["wi"]["kernel"]
    assert isinstance(st, Sub1Tensor) and new["dense"]["kernel"] is q4
    assert rep.tensors == 1 and rep.params == qt.size
    assert rep.bits_per_param == pytest.approx(st.bits_per_param)
    assert rep.ratio_vs_bf16 == pytest.approx(16 / st.bits_per_param)
    assert 0.8 < rep.zero_fraction < 0.95
    leaves = jax.tree_util.tree_leaves(new)  # Sub1Tensor is a pytree (4 leaves)
    assert any(getattr(x, "dtype", None) == np.uint16 for x in leaves)


def test_gptq_ternary_roundtrip(seed):
    from moqe_jax.quant.gptq import gptq_quantize

    rng = np.random.default_rng(seed)
    e, k, n = 2, 64, 24
    w = rng.normal(size=(e, k, n)).astype(np.float32) * 0.05
    x = rng.normal(size=(e, 256, k)).astype(np.float32)
    h = np.einsum("etk,etl->ekl", x, x) * (2 / 256)
    qt, _ = gptq_quantize(w, h, QuantSpec(bits="ternary"), name="gptq")
    st = encode(qt, name="gptq")
    back = st.decode()
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(qt.packed))
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qt.dequantize()))
