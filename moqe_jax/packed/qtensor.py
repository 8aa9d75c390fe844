"""`QuantizedTensor`: the one packed weight type (docs/ARCHITECTURE.md, "the one contract").

Used by the model (experts call ``moqe_jax.ops``), RTN/GPTQ (produce it), the sub-1-bit codec
(encodes its ternary codes), the Pallas kernels (``moqe_jax.ops`` hands them ``packed``/``scales``/``zeros``)
and checkpoint I/O.
The byte layout is specified once in docs/FORMATS.md; this module is its reference implementation.

Logical weight: ``[*batch, K, N]`` (Flax ``[in, out]``; batch is usually the expert axis E).
Stored leaves:
  * ``packed``  codes packed along K, in one of two layouts (the static ``layout``, docs/FORMATS.md §1):
    ``"bytes"`` (default) uint8 ``[*batch, R, N]`` (R = K_pad·code_bits/8, K_pad = K rounded up to a
    multiple of 8; padding codes are 0); ``"words"`` uint32 ``[*batch, ceil(R/4), N]``, 4 consecutive byte
    rows of a column as one little-endian word (the kernels' layout: one load brings 32/b codes; 2/4/8-bit
    codes whose scale groups span ≥ 16 words; :meth:`QuantizedTensor.with_layout`, :func:`convert_layout`).
  * ``scales``  float32 ``[*batch, G, N]`` (G = number of groups along K; 1 = channel-wise).
  * ``zeros``   float32 ``[*batch, G, N]`` or None (asymmetric linear: integer zero-point;
    ternary: the low level ``w_min``; symmetric linear and log: None).
Static aux data: the ``QuantSpec``, the logical K, the logical float dtype and the layout (a registered
dataclass pytree: a layout change retraces). The batch shape and N are read from the leaves, so the object stays
consistent under ``vmap``/``scan``/slicing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax.packed.base import PackedView, register_packed
from moqe_jax.packed.spec import QuantSpec
from pallas_kernels import codes as kernel_codes

__all__ = [
    "QuantizedTensor",
    "pack_codes",
    "unpack_codes",
    "packed_rows",
    "dequant_codes",
    "expand_groups",
    "LAYOUTS",
    "convert_layout",
]

#: Layouts of ``QuantizedTensor.packed`` (docs/FORMATS.md §1): the stored bytes, or the kernels' uint32 words.
LAYOUTS = ("bytes", "words")


def _pad8(k: int) -> int:
    return -(-k // 8) * 8


def packed_rows(k: int, code_bits: int) -> int:
    """Number of uint8 rows that hold K codes of ``code_bits`` bits (docs/FORMATS.md §1)."""
    return _pad8(k) * code_bits // 8


def pack_codes(codes: Any, code_bits: int) -> jax.Array:
    """Pack unsigned integer codes ``[..., K, N]`` (each < 2**code_bits) into uint8 along K.

    code_bits 8/4/2(/1): byte row ``i`` holds codes ``k = i·p + j`` (p = 8/code_bits codes per byte)
    at bits ``[j·b, (j+1)·b)`` (LSB first). code_bits 3: three bit-planes of ``K_pad/8`` rows each,
    plane-major: row ``c·K_pad/8 + i``, bit ``j`` = bit ``c`` of code ``k = 8i + j``.
    """
    codes = jnp.asarray(codes).astype(jnp.uint8)
    *lead, k, n = codes.shape
    kp = _pad8(k)
    if kp != k:
        codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, kp - k), (0, 0)])
    if code_bits == 8:
        return codes
    if code_bits in (4, 2, 1):
        per = 8 // code_bits
        c = codes.reshape(*lead, kp // per, per, n)
        shifts = (jnp.arange(per, dtype=jnp.uint8) * code_bits).reshape(per, 1)
        return _or_reduce(c << shifts, axis=-2)
    if code_bits == 3:
        c = codes.reshape(*lead, kp // 8, 8, n)
        shifts = jnp.arange(8, dtype=jnp.uint8).reshape(8, 1)
        planes = [_or_reduce(((c >> p) & 1) << shifts, axis=-2) for p in range(3)]
        return jnp.concatenate(planes, axis=-2)
    raise ValueError(f"cannot pack {code_bits}-bit codes")


def _or_reduce(x: jax.Array, axis: int) -> jax.Array:
    # Bits of the terms never overlap, so a sum in a wide type is an OR.
    return jnp.sum(x.astype(jnp.uint32), axis=axis).astype(jnp.uint8)


def unpack_codes(packed: Any, code_bits: int, k: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: uint8 ``[..., R, N]`` -> uint8 codes ``[..., k, N]``. Also takes the uint32
    word layout ``[..., ceil(R/4), N]`` of 2/4/8-bit codes (word row ``w``, code ``j`` at bits ``[j·b, (j+1)·b)``
    is K row ``w·32/b + j``)."""
    packed = jnp.asarray(packed)
    *lead, r, n = packed.shape
    if packed.dtype == jnp.uint32:
        if code_bits not in (8, 4, 2):
            raise ValueError(f"{code_bits}-bit codes have no word layout")
        per = 32 // code_bits
        shifts = (jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(code_bits)).reshape(per, 1)
        c = (packed[..., :, None, :] >> shifts) & jnp.uint32((1 << code_bits) - 1)
        return c.reshape(*lead, r * per, n)[..., :k, :].astype(jnp.uint8)
    if code_bits == 8:
        return packed[..., :k, :]
    if code_bits in (4, 2, 1):
        per = 8 // code_bits
        shifts = (jnp.arange(per, dtype=jnp.uint8) * code_bits).reshape(per, 1)
        mask = jnp.uint8((1 << code_bits) - 1)
        c = (packed[..., :, None, :] >> shifts) & mask
        return c.reshape(*lead, r * per, n)[..., :k, :]
    if code_bits == 3:
        k8 = r // 3
        shifts = jnp.arange(8, dtype=jnp.uint8).reshape(8, 1)
        out = jnp.zeros((*lead, k8, 8, n), jnp.uint8)
        for p in range(3):
            plane = packed[..., p * k8:(p + 1) * k8, None, :]
            out = out | (((plane >> shifts) & 1) << p)
        return out.reshape(*lead, k8 * 8, n)[..., :k, :]
    raise ValueError(f"cannot unpack {code_bits}-bit codes")


def dequant_codes(q: Any, scale: Any, zero: Any, spec: QuantSpec) -> jax.Array:
    """Elementwise value of codes ``q`` with broadcastable float32 ``scale``/``zero`` under ``spec``: the rule
    of :func:`pallas_kernels.codes.dequant_codes` (the one definition, shared with the kernels)."""
    return kernel_codes.dequant_codes(q, scale, zero, scheme=spec.code_scheme, code_bits=spec.code_bits)


def expand_groups(a: jax.Array, k: int) -> jax.Array:
    """``[..., G, N]`` per-group values -> ``[..., k, N]`` (group g covers rows ``[g·k/G, (g+1)·k/G)``)."""
    g = a.shape[-2]
    return jnp.repeat(a, k // g, axis=-2)


@register_packed("QuantizedTensor")
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, slots=True)
class QuantizedTensor(PackedView):
    """Packed low-bit weight ``[*batch, K, N]`` (see module docstring and docs/FORMATS.md).

    Leaves ``packed``/``scales``/``zeros`` (None when the spec stores no zeros); static ``spec``, ``k``, ``dtype``
    and ``layout`` (``"bytes"``: uint8 ``packed``; ``"words"``: the kernels' uint32 words, :meth:`with_layout`).
    """

    packed: Any
    scales: Any
    zeros: Any
    spec: QuantSpec = dataclasses.field(metadata={"static": True})
    k: int = dataclasses.field(metadata={"static": True})
    dtype: Any = dataclasses.field(default=jnp.float32, metadata={"static": True})
    layout: str = dataclasses.field(default="bytes", metadata={"static": True})

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        if self.layout not in LAYOUTS:
            raise ValueError(f"QuantizedTensor layout must be one of {LAYOUTS}, got {self.layout!r}")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: Any, scales: Any, zeros: Any, spec: QuantSpec,
                   dtype: Any = jnp.float32, layout: str = "bytes") -> QuantizedTensor:
        """Build from unpacked codes ``[*batch, K, N]`` and ``[*batch, G, N]`` scales/zeros (in ``layout``)."""
        codes = jnp.asarray(codes)
        k, n = codes.shape[-2:]
        g = spec.num_groups(k)
        scales = jnp.asarray(scales, jnp.float32)
        if scales.shape != (*codes.shape[:-2], g, n):
            raise ValueError(f"scales shape {scales.shape} != {(*codes.shape[:-2], g, n)} for {spec.describe()}")
        if spec.has_zeros:
            if zeros is None:
                raise ValueError(f"{spec.describe()} needs zeros")
            zeros = jnp.asarray(zeros, jnp.float32)
            if zeros.shape != scales.shape:
                raise ValueError(f"zeros shape {zeros.shape} != scales shape {scales.shape}")
        else:
            zeros = None
        return cls(pack_codes(codes, spec.code_bits), scales, zeros, spec, k, dtype).with_layout(layout)

    # ---- layouts (docs/FORMATS.md §1) ------------------------------------------------------------
    def words_unsupported_reason(self) -> str | None:
        """Why this format has no word layout (None = it has one)."""
        return kernel_codes.words_unsupported_reason(self.spec.code_bits, self._group_size())

    def _group_size(self) -> int | None:
        return None if self.spec.granularity == "channel" else self.spec.group_size(self.k)

    def with_layout(self, layout: str) -> QuantizedTensor:
        """The same weight with ``packed`` in ``layout`` (``"bytes"`` or ``"words"``); ``self`` when it already is.

        An exact repack (codes, scales and zeros unchanged; ``dequantize`` gives the same array). ``"words"``
        raises ValueError for 3-bit codes and for scale groups shorter than 16 words (see
        :meth:`words_unsupported_reason`). Run it outside ``jit`` once (e.g. ``Model.with_weight_layout``): inside
        a traced loop it would repack every call. An unknown ``layout`` is refused by the constructor."""
        if layout == self.layout:
            return self
        packed = self.packed
        if layout == "words":
            why = self.words_unsupported_reason()
            if why is not None:
                raise ValueError(f"{self.spec.describe()}: {why}; keep layout='bytes'")
            packed = kernel_codes.pack_words(self.packed)
        elif layout == "bytes":
            packed = kernel_codes.unpack_words(self.packed, packed_rows(self.k, self.spec.code_bits))
        return QuantizedTensor(packed, self.scales, self.zeros, self.spec, self.k, self.dtype, layout)

    def to_words(self) -> QuantizedTensor:
        """``with_layout("words")``."""
        return self.with_layout("words")

    def to_bytes(self) -> QuantizedTensor:
        """``with_layout("bytes")``: the stored byte layout every byte-level consumer (sub-1-bit encode) reads."""
        return self.with_layout("bytes")

    # ---- logical view ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-2], self.k, self.packed.shape[-1])

    def codes(self) -> jax.Array:
        """Unpacked uint8 codes ``[*batch, K, N]``."""
        return unpack_codes(self.packed, self.spec.code_bits, self.k)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Float weight ``[*batch, K, N]`` (XLA reference; kernels never materialise this)."""
        q = self.codes()
        s = expand_groups(self.scales, self.k)
        z = None if self.zeros is None else expand_groups(self.zeros, self.k)
        return dequant_codes(q, s, z, self.spec).astype(dtype or self.dtype)

    def __getitem__(self, idx: Any) -> QuantizedTensor:
        """Index the leading batch (expert) axes, e.g. ``qt[e]`` or ``qt[2:5]``."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        if len(idx) > self.ndim - 2:
            raise IndexError("only the leading batch (expert) axes of a QuantizedTensor can be indexed")
        z = None if self.zeros is None else self.zeros[idx]
        return QuantizedTensor(self.packed[idx], self.scales[idx], z, self.spec, self.k, self.dtype, self.layout)

    # ---- storage protocol (checkpoint store; every packed-weight class implements it) ---------
    def to_arrays(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Leaves by name + JSON-serialisable metadata (``meta["type"]`` names the class).

        ``packed`` is saved as it is held: the byte layout writes exactly the metadata it always did (no
        ``layout`` key); the word layout adds ``"layout": "words"`` and a uint32 ``packed`` (docs/FORMATS.md §1)."""
        arrays = {"packed": self.packed, "scales": self.scales}
        if self.zeros is not None:
            arrays["zeros"] = self.zeros
        meta = {"type": "QuantizedTensor", "spec": self.spec.to_dict(), "k": self.k, "dtype": self.dtype.name}
        if self.layout != "bytes":
            meta["layout"] = self.layout
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], meta: dict[str, Any]) -> QuantizedTensor:
        spec = QuantSpec.from_dict(meta["spec"])
        k = int(meta["k"])
        packed, scales = arrays["packed"], arrays["scales"]
        zeros = arrays.get("zeros")
        n = packed.shape[-1]
        layout = str(meta.get("layout", "bytes"))
        if layout not in LAYOUTS:
            raise ValueError(f"unknown QuantizedTensor layout {layout!r} (known: {', '.join(LAYOUTS)})")
        rows = packed_rows(k, spec.code_bits)
        want_dt, want_rows = (np.uint8, rows) if layout == "bytes" else (np.uint32, -(-rows // 4))
        if packed.dtype != want_dt or packed.shape[-2] != want_rows:
            raise ValueError(f"packed codes {packed.dtype}{list(packed.shape)} do not fit {spec.describe()} with K={k} "
                             f"in layout {layout!r}")
        if layout == "words":
            why = kernel_codes.words_unsupported_reason(spec.code_bits, None if spec.granularity == "channel"
                                                        else spec.group_size(k))
            if why is not None:
                raise ValueError(f"{spec.describe()}: {why}")
        want = (*packed.shape[:-2], spec.num_groups(k), n)
        if tuple(scales.shape) != want or (spec.has_zeros and (zeros is None or tuple(zeros.shape) != want)):
            raise ValueError(f"scales/zeros shapes do not fit {spec.describe()} {list(want)}")
        return cls(packed, scales, zeros if spec.has_zeros else None, spec, k, meta.get("dtype", "float32"), layout)

    # ---- storage accounting ------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes really stored (packed codes + scales + zeros; the word layout pads each column's codes to a
        multiple of 4 bytes)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.packed, self.scales, self.zeros) if a is not None)

    def __repr__(self) -> str:
        words = ", words" if self.layout == "words" else ""
        return (f"QuantizedTensor({self.spec.describe()}, shape={self.shape}, "
                f"{self.bits_per_param:.3f} bits/param{words})")


def convert_layout(tree: Any, layout: str = "words") -> Any:
    """``tree`` (a param tree, a ``Model``'s params, one weight) with every :class:`QuantizedTensor` that has
    ``layout`` converted to it (:meth:`QuantizedTensor.with_layout`); formats without a word layout (3-bit,
    short groups) and all other leaves are returned unchanged. Run once, outside ``jit``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")

    def one(w: Any) -> Any:
        if not isinstance(w, QuantizedTensor):
            return w
        if layout == "words" and w.words_unsupported_reason() is not None:
            return w
        return w.with_layout(layout)

    return jax.tree_util.tree_map(one, tree, is_leaf=lambda x: isinstance(x, QuantizedTensor))
