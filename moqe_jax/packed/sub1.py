"""`Sub1Tensor`: QMoE's sub-1-bit dictionary-coded ternary weight (Frantar & Alistarh 2023, §4) and its
exact, traceable decoder. Byte layout: docs/FORMATS.md §2. The encoder, entropy, QMoE file I/O and
whole-model compression live above this layer (``moqe_jax.quant.sub1``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moqe_jax.errors import CheckpointError
from moqe_jax.packed.base import register_packed
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.packed.sub1_dict import DEC_SHA256, NZ_SLOTS, get_dictionary, sparse_dec_table

__all__ = ["Sub1Tensor", "decode_codes", "decode_pairs", "is_sub1"]

_BF16 = np.dtype(ml_dtypes.bfloat16)
_TERNARY = QuantSpec(bits="ternary", granularity="channel")

# ---------------------------------------------------------------------------------------------
# Decoder: traceable (jnp scatter), so the XLA reference path works under jit.
# ---------------------------------------------------------------------------------------------
def decode_pairs(stream: Any, num_rows: int, pairs_per_row: int) -> jax.Array:
    """uint16 stream of ``num_rows`` rows with exactly ``pairs_per_row`` pairs each -> uint8 ``[R, P]``."""
    c = decode_codes(stream, num_rows, 2 * pairs_per_row)
    return c[:, 0::2] + 3 * c[:, 1::2]


def decode_codes(stream: Any, num_rows: int, k: int) -> jax.Array:
    """uint16 stream -> ternary codes uint8 ``[R, k]`` (rows of exactly ``ceil(k/2)`` pairs; traceable).

    Only nonzero weights are scattered (≤ 3 per codeword, from :func:`sparse_dec_table`) into zeros;
    a codeword's first weight index is the exclusive cumsum of ``2·pair_count``.
    """
    stream = jnp.asarray(stream).astype(jnp.int32)
    word = jnp.asarray(sparse_dec_table())[stream]
    step = 2 * (word & 15)
    start = jnp.cumsum(step) - step                               # global weight index (rows are 2·P long)
    kp = 2 * ((k + 1) // 2)
    total = num_rows * kp
    f = (word[:, None] >> (4 + 7 * jnp.arange(NZ_SLOTS - 1, dtype=jnp.int32))[None, :]) & 127   # [T, 3]
    idx = jnp.where(f >= 64, start[:, None] + (f & 31), total)
    val = jnp.where((f & 32) != 0, 2, 1).astype(jnp.uint8)
    out = jnp.zeros((total,), jnp.uint8).at[idx.reshape(-1)].set(val.reshape(-1), mode="drop")
    return out.reshape(num_rows, kp)[:, :k]


def _is_concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _crc(stream: np.ndarray, row_off: np.ndarray) -> int:
    c = zlib.crc32(np.ascontiguousarray(stream, "<u2").tobytes())
    return zlib.crc32(np.ascontiguousarray(row_off, "<i4").tobytes(), c)


@register_packed("Sub1Tensor")
@jax.tree_util.register_pytree_node_class
class Sub1Tensor:
    """QMoE-compressed ternary weight ``[*batch, K, N]`` (docs/FORMATS.md §2).

    Leaves: ``stream`` uint16 ``[T]`` (codewords of all rows, row-major over ``(*batch, N)``),
    ``row_off`` int32 ``[R+1]`` (R = prod(batch)·N; row r = ``stream[row_off[r]:row_off[r+1]]``),
    ``scales`` (= ``w_max``) and ``zeros`` (= ``w_min``) ``[*batch, N]`` float32 (bf16 after a QMoE
    import). Static: the source ``QuantSpec``, logical K and float dtype. Not vmappable/sliceable
    through JAX transforms (the stream is ragged); :meth:`__getitem__` slices experts eagerly.
    """

    __slots__ = ("stream", "row_off", "scales", "zeros", "spec", "k", "dtype")

    def __init__(self, stream: Any, row_off: Any, scales: Any, zeros: Any, spec: QuantSpec = _TERNARY,
                 k: int = 0, dtype: Any = jnp.float32):
        self.stream, self.row_off, self.scales, self.zeros = stream, row_off, scales, zeros
        self.spec, self.k, self.dtype = spec, int(k), jnp.dtype(dtype)

    # ---- pytree ------------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.stream, self.row_off, self.scales, self.zeros), (self.spec, self.k, self.dtype.name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.stream, obj.row_off, obj.scales, obj.zeros = children
        obj.spec, obj.k, obj.dtype = aux[0], aux[1], jnp.dtype(aux[2])
        return obj

    # ---- logical view ------------------------------------------------------------------------
    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.scales.shape[:-1])

    @property
    def n(self) -> int:
        return int(self.scales.shape[-1])

    @property
    def num_rows(self) -> int:
        return math.prod(self.batch_shape) * self.n

    @property
    def pairs_per_row(self) -> int:
        return (self.k + 1) // 2

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.k, self.n)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    # ---- validation --------------------------------------------------------------------------
    def validate(self, name: str = "Sub1Tensor", crc32: int | None = None) -> None:
        """Structural checks (and the stream CRC when given); raises :class:`CheckpointError`."""
        if not _is_concrete(self.stream, self.row_off):
            return
        stream, row_off = np.asarray(self.stream), np.asarray(self.row_off)
        r = self.num_rows
        if stream.dtype != np.uint16 or stream.ndim != 1:
            raise CheckpointError(f"{name}: stream must be a 1-D uint16 array, got {stream.dtype}{list(stream.shape)}")
        if row_off.dtype != np.int32 or row_off.shape != (r + 1,):
            raise CheckpointError(f"{name}: row_off must be int32 [{r + 1}], got {row_off.dtype}{list(row_off.shape)}")
        if tuple(self.zeros.shape) != tuple(self.scales.shape):
            raise CheckpointError(f"{name}: zeros shape {list(self.zeros.shape)} != scales {list(self.scales.shape)}")
        if self.k <= 0:
            raise CheckpointError(f"{name}: invalid K={self.k}")
        if row_off[0] != 0 or row_off[-1] != stream.size:
            raise CheckpointError(f"{name}: row offsets span [{row_off[0]}, {row_off[-1]}] but the stream has "
                                  f"{stream.size} codewords (truncated or corrupt)")
        if np.any(np.diff(row_off) < 1):
            bad = int(np.argmax(np.diff(row_off) < 1))
            raise CheckpointError(f"{name}: row offsets are not strictly increasing at row {bad}")
        if crc32 is not None and _crc(stream, row_off) != int(crc32):
            raise CheckpointError(f"{name}: codeword stream checksum mismatch (corrupt data)")
        d = get_dictionary()
        per_row = np.add.reduceat(d.length[stream].astype(np.int64), row_off[:-1].astype(np.int64))
        bad = np.nonzero(per_row != self.pairs_per_row)[0]
        if bad.size:
            raise CheckpointError(f"{name}: row {int(bad[0])} decodes to {int(per_row[bad[0]])} pairs, expected "
                                  f"{self.pairs_per_row} (K={self.k}); corrupt stream")

    def flat_arrays(self) -> tuple[Any, Any, Any, Any]:
        """The kernel view (docs/FORMATS.md §2): ``(stream uint16 [T], row_off int32 [R+1], scales [*batch, N],
        zeros [*batch, N])`` with one stream for all rows, row-major over ``(*batch, N)``. Traceable."""
        return self.stream, self.row_off, self.scales, self.zeros

    # ---- decode ------------------------------------------------------------------------------
    def decode(self) -> QuantizedTensor:
        """Bit-exact ternary :class:`QuantizedTensor` (traceable; validated first when concrete)."""
        codes = self.codes()
        s = jnp.asarray(self.scales).astype(jnp.float32)[..., None, :]
        z = jnp.asarray(self.zeros).astype(jnp.float32)[..., None, :]
        return QuantizedTensor.from_codes(codes, s, z, self.spec, self.dtype)

    def codes(self) -> jax.Array:
        """Ternary codes uint8 ``[*batch, K, N]`` (validated first when concrete)."""
        self.validate()
        codes = decode_codes(self.stream, self.num_rows, self.k).reshape(*self.batch_shape, self.n, self.k)
        return jnp.swapaxes(codes, -1, -2)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Float weight ``[*batch, K, N]`` straight from the codes (XLA reference; no repacking)."""
        q = self.codes()
        s = jnp.asarray(self.scales).astype(jnp.float32)[..., None, :]
        z = jnp.asarray(self.zeros).astype(jnp.float32)[..., None, :]
        w = jnp.where(q == 2, s, jnp.where(q == 1, z, 0.0))
        return w.astype(dtype or self.dtype)

    def __getitem__(self, idx: Any) -> Sub1Tensor:
        """Eagerly select experts along the leading batch axis (int or unit-step slice)."""
        if not self.batch_shape:
            raise IndexError("Sub1Tensor has no batch (expert) axis")
        e = self.batch_shape[0]
        inner = math.prod(self.batch_shape[1:]) * self.n
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (e if idx < 0 else 0)
            if not 0 <= i < e:
                raise IndexError(f"expert {idx} out of range for {e} experts")
            lo, hi, sel = i, i + 1, i
        elif isinstance(idx, slice) and idx.step in (None, 1):
            lo, hi, _ = idx.indices(e)
            hi = max(hi, lo)
            sel = slice(lo, hi)
        else:
            raise IndexError("Sub1Tensor supports an int or a unit-step slice of the expert axis")
        row_off = np.asarray(self.row_off)
        a, b = int(row_off[lo * inner]), int(row_off[hi * inner])
        new_off = (row_off[lo * inner:hi * inner + 1] - a).astype(np.int32)
        return Sub1Tensor(np.asarray(self.stream)[a:b], new_off, np.asarray(self.scales)[sel],
                          np.asarray(self.zeros)[sel], self.spec, self.k, self.dtype)

    # ---- storage protocol --------------------------------------------------------------------
    def to_arrays(self) -> tuple[dict[str, Any], dict]:
        """Leaves + JSON metadata (``meta["type"] == "Sub1Tensor"``, CRC-32 of stream and offsets)."""
        stream, row_off = np.asarray(self.stream), np.asarray(self.row_off)
        arrays = {"stream": stream, "row_off": row_off, "scales": self.scales, "zeros": self.zeros}
        return arrays, {"type": "Sub1Tensor", "spec": self.spec.to_dict(), "k": self.k, "dtype": self.dtype.name,
                        "dictionary": "qmoe-p0.885-2^16", "dec_sha256": DEC_SHA256,
                        "crc32": _crc(stream, row_off), "num_codewords": int(stream.size)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], meta: Mapping[str, Any], name: str = "Sub1Tensor"
                    ) -> Sub1Tensor:
        """Inverse of :meth:`to_arrays`; validates structure and checksum (:class:`CheckpointError`)."""
        if meta.get("type") != "Sub1Tensor":
            raise CheckpointError(f"{name}: metadata type {meta.get('type')!r} is not 'Sub1Tensor'")
        if meta.get("dec_sha256", DEC_SHA256) != DEC_SHA256:
            raise CheckpointError(f"{name}: encoded with an unknown dictionary (sha256 {meta.get('dec_sha256')})")
        missing = [k for k in ("stream", "row_off", "scales", "zeros") if k not in arrays]
        if missing:
            raise CheckpointError(f"{name}: missing arrays {missing}")
        try:
            spec = QuantSpec.from_dict(meta["spec"]) if "spec" in meta else _TERNARY
            k = int(meta["k"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{name}: bad metadata ({e})") from None
        if not spec.is_ternary:
            raise CheckpointError(f"{name}: Sub1Tensor spec must be ternary, got {spec.describe()}")
        stream, row_off = np.asarray(arrays["stream"]), np.asarray(arrays["row_off"])
        obj = cls(stream, row_off, np.asarray(arrays["scales"]), np.asarray(arrays["zeros"]), spec, k,
                  meta.get("dtype", "float32"))
        if obj.scales.dtype not in (np.float32, _BF16):
            raise CheckpointError(f"{name}: scales must be float32 or bfloat16, got {obj.scales.dtype}")
        obj.validate(name, crc32=meta.get("crc32"))
        return obj

    # ---- accounting --------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes stored: stream (2 B/codeword) + row offsets (4 B/row) + scales + zeros."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.stream, self.row_off, self.scales, self.zeros))

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / max(1, self.size)

    @property
    def weights_per_codeword(self) -> float:
        return self.size / max(1, int(self.stream.shape[0]))

    def __repr__(self) -> str:
        return f"Sub1Tensor(shape={self.shape}, {int(self.stream.shape[0])} codewords, " \
               f"{self.bits_per_param:.3f} bits/param)"


def is_sub1(x: Any) -> bool:
    return isinstance(x, Sub1Tensor)
