"""`Sub1Tensor`: QMoE's sub-1-bit dictionary-coded ternary weight (Frantar & Alistarh 2023, §4) and its
exact, traceable decoder. Byte layout on disk: docs/FORMATS.md §2. The encoder, entropy and whole-model
compression live above this layer (``moqe_jax.quant``), QMoE's ``.pt`` I/O in ``moqe_jax.checkpoint.qmoe``.

In memory the codewords are held **per expert** (every batch element), padded to a common length, so
every leaf is aligned on the batch axes: ``vmap``/``scan`` over experts, ``st[i]`` under ``jit`` and expert
sharding treat it like any other pytree. The stored format (one stream for all rows, global offsets)
is a view: :meth:`Sub1Tensor.flat_arrays` (kernels) and :meth:`Sub1Tensor.to_arrays` (checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moqe_jax.errors import CheckpointError
from moqe_jax.packed.base import PackedView, register_packed
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


def decode_codes(stream: Any, num_rows: int, k: int, length: Any = None) -> jax.Array:
    """uint16 stream -> ternary codes uint8 ``[R, k]`` (rows of exactly ``ceil(k/2)`` pairs; traceable).

    Only nonzero weights are scattered (≤ 3 per codeword, from :func:`sparse_dec_table`) into zeros;
    a codeword's first weight index is the exclusive cumsum of ``2·pair_count``. Codewords at positions
    ``≥ length`` (padding; default: none) are ignored.
    """
    stream = jnp.asarray(stream).astype(jnp.int32)
    word = jnp.asarray(sparse_dec_table())[stream]
    if length is not None:
        word = jnp.where(jnp.arange(stream.shape[0]) < length, word, 0)  # 0 pairs, no nonzeros
    step = 2 * (word & 15)
    start = jnp.cumsum(step) - step                               # weight index (rows are 2·P long)
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


def _check_flat(stream: np.ndarray, row_off: np.ndarray, num_rows: int, pairs_per_row: int, name: str,
                crc32: int | None = None) -> None:
    """Structural checks of the stored layout (and its CRC when given); raises :class:`CheckpointError`."""
    if stream.dtype != np.uint16 or stream.ndim != 1:
        raise CheckpointError(f"{name}: stream must be a 1-D uint16 array, got {stream.dtype}{list(stream.shape)}")
    if row_off.dtype != np.int32 or row_off.shape != (num_rows + 1,):
        raise CheckpointError(f"{name}: row_off must be int32 [{num_rows + 1}], got {row_off.dtype}"
                              f"{list(row_off.shape)}")
    if row_off[0] != 0 or row_off[-1] != stream.size:
        raise CheckpointError(f"{name}: row offsets span [{row_off[0]}, {row_off[-1]}] but the stream has "
                              f"{stream.size} codewords (truncated or corrupt)")
    if np.any(np.diff(row_off) < 1):
        bad = int(np.argmax(np.diff(row_off) < 1))
        raise CheckpointError(f"{name}: row offsets are not strictly increasing at row {bad}")
    if crc32 is not None and _crc(stream, row_off) != int(crc32):
        raise CheckpointError(f"{name}: codeword stream checksum mismatch (corrupt data)")
    per_row = np.add.reduceat(get_dictionary().length[stream].astype(np.int64), row_off[:-1].astype(np.int64))
    bad_rows = np.nonzero(per_row != pairs_per_row)[0]
    if bad_rows.size:
        r = int(bad_rows[0])
        raise CheckpointError(f"{name}: row {r} decodes to {int(per_row[r])} pairs, expected {pairs_per_row} "
                              f"(K={2 * pairs_per_row} or {2 * pairs_per_row - 1}); corrupt stream")


@register_packed("Sub1Tensor")
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Sub1Tensor(PackedView):
    """QMoE-compressed ternary weight ``[*batch, K, N]`` (docs/FORMATS.md §2).

    Leaves, all aligned on the batch (expert) axes:
      * ``codewords`` uint16 ``[*batch, T_max]``: each expert's codewords, rows ``n = 0..N-1`` in order,
        zero-padded to the longest expert (padding is never decoded);
      * ``offsets`` int32 ``[*batch, N+1]``: row n of an expert = ``codewords[offsets[n]:offsets[n+1]]``
        (relative to that expert; ``offsets[N]`` = its codeword count);
      * ``scales`` (= ``w_max``) and ``zeros`` (= ``w_min``) ``[*batch, N]`` float32 (bf16 after a QMoE
        import).
    Static: the source ``QuantSpec``, logical K and float dtype. Build from the stored layout with
    :meth:`from_flat`; :attr:`stream`/:attr:`row_off` are that layout again.
    """

    codewords: Any
    offsets: Any
    scales: Any
    zeros: Any
    spec: QuantSpec = dataclasses.field(default=_TERNARY, metadata={"static": True})
    k: int = dataclasses.field(default=0, metadata={"static": True})
    dtype: Any = dataclasses.field(default=jnp.dtype(jnp.float32), metadata={"static": True})

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    # ---- construction from / view as the stored layout ---------------------------------------
    @classmethod
    def from_flat(cls, stream: Any, row_off: Any, scales: Any, zeros: Any, spec: QuantSpec = _TERNARY,
                  k: int = 0, dtype: Any = jnp.float32) -> Sub1Tensor:
        """From the stored layout: one uint16 stream ``[T]`` for all rows (row-major over ``(*batch, N)``)
        and global int32 offsets ``[R+1]`` (a valid offset table; see :meth:`validate`)."""
        stream, row_off = np.asarray(stream), np.asarray(row_off)
        scales = np.asarray(scales)
        *batch, n = scales.shape
        b = math.prod(batch)
        bounds = row_off[::n].astype(np.int64)                        # expert e spans [bounds[e], bounds[e+1])
        counts = np.diff(bounds)
        t_max = int(counts.max()) if b else 0
        codewords = np.zeros((b, t_max), np.uint16)
        codewords[np.arange(t_max)[None, :] < counts[:, None]] = stream[bounds[0]:bounds[-1]]
        offsets = (row_off[:-1].reshape(b, n) - bounds[:-1, None]).astype(np.int32)
        offsets = np.concatenate([offsets, counts[:, None].astype(np.int32)], axis=1)
        return cls(codewords.reshape(*batch, t_max), offsets.reshape(*batch, n + 1), scales, np.asarray(zeros),
                   spec, k, dtype)

    def flat_arrays(self) -> tuple[Any, Any, Any, Any]:
        """The stored/kernel layout (docs/FORMATS.md §2): ``(stream uint16 [T], row_off int32 [R+1],
        scales [*batch, N], zeros [*batch, N])``, one stream for all rows, row-major over ``(*batch, N)``.

        Traceable: under a trace ``T`` is not known statically, so ``stream`` has the padded size
        ``prod(batch)·T_max`` with the codewords compacted to the front (``row_off[-1] = T``; the tail is
        never referenced by an offset). Concrete leaves give exactly ``[T]`` (NumPy).
        """
        b, n = math.prod(self.batch_shape), self.n
        t_max = int(self.codewords.shape[-1])
        if _is_concrete(self.codewords, self.offsets):
            cw = np.asarray(self.codewords).reshape(b, t_max)
            off = np.asarray(self.offsets).reshape(b, n + 1).astype(np.int64)
            counts = off[:, -1]
            base = np.cumsum(counts) - counts
            stream = cw[np.arange(t_max)[None, :] < counts[:, None]]
            row_off = np.append((off[:, :-1] + base[:, None]).reshape(-1), counts.sum()).astype(np.int32)
            return stream, row_off, self.scales, self.zeros
        cwj = jnp.asarray(self.codewords).reshape(b, t_max)
        offj = jnp.asarray(self.offsets).reshape(b, n + 1).astype(jnp.int32)
        cnt = offj[:, -1]
        start = jnp.cumsum(cnt) - cnt
        j = jnp.arange(t_max, dtype=jnp.int32)[None, :]
        dest = jnp.where(j < cnt[:, None], start[:, None] + j, b * t_max)   # padding -> dropped
        stream_j = jnp.zeros((b * t_max,), jnp.uint16).at[dest.reshape(-1)].set(cwj.reshape(-1), mode="drop")
        row_off_j = jnp.concatenate([(offj[:, :-1] + start[:, None]).reshape(-1), jnp.sum(cnt)[None]])
        return stream_j, row_off_j, self.scales, self.zeros

    @property
    def stream(self) -> Any:
        """Stored layout: all codewords, row-major over ``(*batch, N)`` (see :meth:`flat_arrays`)."""
        return self.flat_arrays()[0]

    @property
    def row_off(self) -> Any:
        """Stored layout: global row offsets ``[R+1]`` into :attr:`stream`."""
        return self.flat_arrays()[1]

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
    def num_codewords(self) -> int:
        """Codewords stored (padding excluded); needs concrete offsets."""
        return int(np.asarray(self.offsets)[..., -1].astype(np.int64).sum())

    # ---- validation --------------------------------------------------------------------------
    def validate(self, name: str = "Sub1Tensor", crc32: int | None = None) -> None:
        """Structural checks of the leaves and of the stored layout they stand for (and its CRC when
        given); raises :class:`CheckpointError`. A no-op on traced leaves."""
        if not _is_concrete(self.codewords, self.offsets):
            return
        cw, off = np.asarray(self.codewords), np.asarray(self.offsets)
        if cw.dtype != np.uint16 or cw.shape[:-1] != self.batch_shape:
            raise CheckpointError(f"{name}: codewords must be uint16 [{', '.join(map(str, self.batch_shape))}, T], "
                                  f"got {cw.dtype}{list(cw.shape)}")
        if off.dtype != np.int32 or off.shape != (*self.batch_shape, self.n + 1):
            raise CheckpointError(f"{name}: offsets must be int32 {[*self.batch_shape, self.n + 1]}, got "
                                  f"{off.dtype}{list(off.shape)}")
        if tuple(self.zeros.shape) != tuple(self.scales.shape):
            raise CheckpointError(f"{name}: zeros shape {list(self.zeros.shape)} != scales {list(self.scales.shape)}")
        if self.k <= 0:
            raise CheckpointError(f"{name}: invalid K={self.k}")
        if off.size and (np.any(off[..., 0] != 0) or np.any(off[..., -1] > cw.shape[-1])):
            raise CheckpointError(f"{name}: per-expert offsets must start at 0 and end within the "
                                  f"{cw.shape[-1]} padded codewords")
        stream, row_off, _, _ = self.flat_arrays()
        _check_flat(stream, row_off, self.num_rows, self.pairs_per_row, name, crc32)

    # ---- decode ------------------------------------------------------------------------------
    def decode(self) -> QuantizedTensor:
        """Bit-exact ternary :class:`QuantizedTensor` (traceable; validated first when concrete)."""
        codes = self.codes()
        s = jnp.asarray(self.scales).astype(jnp.float32)[..., None, :]
        z = jnp.asarray(self.zeros).astype(jnp.float32)[..., None, :]
        return QuantizedTensor.from_codes(codes, s, z, self.spec, self.dtype)

    def codes(self) -> jax.Array:
        """Ternary codes uint8 ``[*batch, K, N]`` (validated first when concrete); one decode per expert."""
        self.validate()
        t_max = self.codewords.shape[-1]
        cw = jnp.asarray(self.codewords).reshape(-1, t_max)
        length = jnp.asarray(self.offsets).reshape(-1, self.n + 1)[:, -1]
        codes = jax.vmap(lambda c, t: decode_codes(c, self.n, self.k, t))(cw, length)   # [B, N, K]
        return jnp.swapaxes(codes.reshape(*self.batch_shape, self.n, self.k), -1, -2)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Float weight ``[*batch, K, N]`` straight from the codes (XLA reference; no repacking)."""
        q = self.codes()
        s = jnp.asarray(self.scales).astype(jnp.float32)[..., None, :]
        z = jnp.asarray(self.zeros).astype(jnp.float32)[..., None, :]
        w = jnp.where(q == 2, s, jnp.where(q == 1, z, 0.0))
        return w.astype(dtype or self.dtype)

    def __getitem__(self, idx: Any) -> Sub1Tensor:
        """Index the leading batch (expert) axes, e.g. ``st[e]`` or ``st[2:5]`` (traced indices work)."""
        if not self.batch_shape:
            raise IndexError("Sub1Tensor has no batch (expert) axis")
        if len(idx if isinstance(idx, tuple) else (idx,)) > len(self.batch_shape):
            raise IndexError("only the leading batch (expert) axes of a Sub1Tensor can be indexed")
        return jax.tree_util.tree_map(lambda a: a[idx], self)

    # ---- storage protocol --------------------------------------------------------------------
    def to_arrays(self) -> tuple[dict[str, Any], dict]:
        """Stored layout + JSON metadata (``meta["type"] == "Sub1Tensor"``, CRC-32 of stream and offsets)."""
        stream, row_off, scales, zeros = self.flat_arrays()
        arrays = {"stream": stream, "row_off": row_off, "scales": scales, "zeros": zeros}
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
        if k <= 0:
            raise CheckpointError(f"{name}: invalid K={k}")
        stream, row_off = np.asarray(arrays["stream"]), np.asarray(arrays["row_off"])
        scales, zeros = np.asarray(arrays["scales"]), np.asarray(arrays["zeros"])
        if scales.dtype not in (np.float32, _BF16):
            raise CheckpointError(f"{name}: scales must be float32 or bfloat16, got {scales.dtype}")
        if zeros.shape != scales.shape or scales.ndim < 1:
            raise CheckpointError(f"{name}: zeros shape {list(zeros.shape)} != scales {list(scales.shape)}")
        _check_flat(stream, row_off, scales.size, (k + 1) // 2, name, meta.get("crc32"))
        return cls.from_flat(stream, row_off, scales, zeros, spec, k, meta.get("dtype", "float32"))

    # ---- accounting --------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the stored layout: stream (2 B/codeword, no padding) + row offsets (4 B/row) + scales +
        zeros (what checkpoints hold and the size report counts)."""
        return (2 * self.num_codewords + 4 * (self.num_rows + 1)
                + sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in (self.scales, self.zeros)))

    @property
    def weights_per_codeword(self) -> float:
        return self.size / max(1, self.num_codewords)

    def __repr__(self) -> str:
        if not _is_concrete(self.offsets):
            return f"Sub1Tensor(shape={self.shape}, traced)"
        return f"Sub1Tensor(shape={self.shape}, {self.num_codewords} codewords, " \
               f"{self.bits_per_param:.3f} bits/param)"


def is_sub1(x: Any) -> bool:
    return isinstance(x, Sub1Tensor)
