"""QMoE's sub-1-bit dictionary code for ternary experts (Frantar & Alistarh 2023, §4): the encoder and the
entropy bound. The :class:`~moqe_jax.packed.sub1.Sub1Tensor` type and its exact decoder live in
``moqe_jax.packed.sub1``; QMoE's ``.pt`` files are read and written by ``moqe_jax.checkpoint.qmoe``;
whole-model compression is ``moqe_jax.quant.sub1_compress``.

A ternary :class:`~moqe_jax.packed.qtensor.QuantizedTensor` ``[*batch, K, N]`` (channel-wise; codes
0 → 0, 1 → ``w_min`` = ``zeros``, 2 → ``w_max`` = ``scales``) already holds QMoE's symbols. QMoE's
"row" is our output channel ``n``: its weights run along K and are grouped in pairs
``r = t0 + 3·t1`` (k = 2i, 2i+1). Each row is encoded independently by greedy longest-match against
the fixed 2^16-entry dictionary (:mod:`moqe_jax.packed.sub1_dict`). Byte layout: docs/FORMATS.md §2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moqe_jax.errors import QuantizationError
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.sub1 import Sub1Tensor
from moqe_jax.packed.sub1_dict import TRIE_ROOT, get_dictionary
from moqe_jax.progress import progress

__all__ = ["encode", "encode_pairs", "pair_symbols", "ternary_entropy_bits"]


# ---------------------------------------------------------------------------------------------
# Encoder (docs/QMOE.md §1.5): greedy longest match through the trie, all rows in lockstep.
# ---------------------------------------------------------------------------------------------
def encode_pairs(pairs: np.ndarray, *, chunk_elems: int = 1 << 24, desc: str | None = None,
                 dictionary: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode pair symbols ``[R, P]`` (uint8, values < 9) -> ``(stream uint16 [T], row_off int32 [R+1])``.

    Per row: descend the trie while the node has a child for the next pair; otherwise emit the node's
    codeword and restart from the root with that pair; emit the last node at the row end (QMoE
    ``Sub1PreparePack``). Rows advance in lockstep (one vectorised trie gather per pair position).
    ``dictionary`` (default QMoE's fixed one) is only for experiments with fitted dictionaries.
    """
    pairs = np.asarray(pairs)
    if pairs.ndim != 2:
        raise QuantizationError(f"sub1 encode: expected pair symbols [rows, pairs], got shape {pairs.shape}")
    r_total, p = pairs.shape
    if p == 0:
        raise QuantizationError("sub1 encode: rows have no weights")
    if pairs.size and int(pairs.max()) > 8:
        raise QuantizationError("sub1 encode: pair symbols must be < 9 (ternary codes 0/1/2)")
    d = dictionary or get_dictionary()
    trie = d.trie.reshape(-1)
    root_child = d.trie[TRIE_ROOT].astype(np.int32)
    chunk = max(1, chunk_elems // p)
    streams: list[np.ndarray] = []
    counts = np.zeros(r_total, np.int64)
    bar = progress(total=r_total, desc=desc or "sub1 encode", unit="row", enable=None if r_total > chunk else False)
    for r0 in range(0, r_total, chunk):
        sym = np.ascontiguousarray(pairs[r0:r0 + chunk].T).astype(np.int32)  # [P, rows]
        rows = sym.shape[1]
        emit = np.empty((p + 1, rows), np.int32)  # emit[i] = codeword emitted before pair i (or -1)
        node = root_child[sym[0]]
        emit[0] = -1
        for i in range(1, p):
            s = sym[i]
            child = trie[node * 9 + s]
            fail = child < 0
            emit[i] = np.where(fail, node, -1)
            node = np.where(fail, root_child[s], child)
        emit[p] = node
        et = emit.T  # [rows, P+1], row-major codeword order
        mask = et >= 0
        counts[r0:r0 + rows] = mask.sum(axis=1)
        streams.append(et[mask].astype(np.uint16))
        bar.update(rows)
    bar.close()
    row_off = np.zeros(r_total + 1, np.int64)
    np.cumsum(counts, out=row_off[1:])
    if row_off[-1] >= 2**31:
        raise QuantizationError(f"sub1 encode: {row_off[-1]} codewords exceed int32 row offsets; split the tensor")
    stream = np.concatenate(streams) if streams else np.zeros(0, np.uint16)
    return stream, row_off.astype(np.int32)


def pair_symbols(qt: QuantizedTensor) -> np.ndarray:
    """Ternary QT ``[*batch, K, N]`` -> pair symbols uint8 ``[prod(batch)·N, ceil(K/2)]`` (rows = channels).

    Read straight from the packed bytes (2-bit codes, 4 per byte along K, LSB first: a nibble is one
    pair ``t0 + 3·t1``); an odd K ends with an implicit zero weight, as in QMoE. A word-layout ``qt`` is read
    as its bytes (``QuantizedTensor.to_bytes``).
    """
    packed = np.asarray(qt.to_bytes().packed)
    lut = np.array([(v & 3) + 3 * (v >> 2) for v in range(16)], np.uint8)
    *batch, rb, n = packed.shape
    lo, hi = lut[packed & 15], lut[packed >> 4]
    pairs = np.stack([lo, hi], axis=-2).reshape(*batch, 2 * rb, n)[..., :(qt.k + 1) // 2, :]
    return np.ascontiguousarray(np.swapaxes(pairs, -1, -2)).reshape(-1, (qt.k + 1) // 2)


def _check_ternary(qt: Any, name: str) -> None:
    if not isinstance(qt, QuantizedTensor) or not qt.spec.is_ternary:
        raise QuantizationError(f"sub1 encode {name}: expected a ternary QuantizedTensor, got {qt!r}")
    if qt.scales.shape[-2] != 1:
        raise QuantizationError(f"sub1 encode {name}: QMoE's code stores one (w_min, w_max) per output channel; "
                                f"group-wise ternary ({qt.spec.describe()}) is not supported")
    packed = np.asarray(qt.packed)
    if np.any(packed & (packed >> 1) & 0x55):  # some 2-bit field == 3
        raise QuantizationError(f"sub1 encode {name}: ternary codes must be 0/1/2 (found code 3)")


def encode(qt: QuantizedTensor, *, name: str = "tensor", scale_dtype: Any = np.float32) -> Sub1Tensor:
    """Ternary channel-wise :class:`QuantizedTensor` (either layout) -> :class:`Sub1Tensor` (bit-exact, see
    ``decode``)."""
    if isinstance(qt, QuantizedTensor):
        qt = qt.to_bytes()
    _check_ternary(qt, name)
    stream, row_off = encode_pairs(pair_symbols(qt), desc=f"sub1 {name}")
    batch = tuple(qt.packed.shape[:-2])
    n = qt.packed.shape[-1]
    scales = np.asarray(qt.scales, np.float32).reshape(*batch, n).astype(scale_dtype)
    zeros = np.asarray(qt.zeros, np.float32).reshape(*batch, n).astype(scale_dtype)
    return Sub1Tensor.from_flat(stream, row_off, scales, zeros, qt.spec, qt.k, qt.dtype)


# ---------------------------------------------------------------------------------------------
# Entropy (docs/QMOE.md §1.7)
# ---------------------------------------------------------------------------------------------
def ternary_entropy_bits(x: QuantizedTensor | Sub1Tensor | float) -> float:
    """Ideal (order-0) entropy in bits/weight: of a symbol histogram, or of i.i.d. P(0)=x (x float)."""
    if isinstance(x, float):
        p = np.array([x, (1 - x) / 2, (1 - x) / 2])
    else:
        qt = x.decode() if isinstance(x, Sub1Tensor) else x
        counts = np.bincount(np.asarray(qt.codes()).reshape(-1), minlength=3)[:3].astype(np.float64)
        p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())
