"""`QuantizedTensor`: the one packed weight type (docs/ARCHITECTURE.md, "the one contract").

Used by the model (experts call ``moqe_jax.ops``), RTN/GPTQ (produce it), the sub-1-bit codec
(encodes its ternary codes), the Pallas kernels (``moqe_jax.ops`` hands them ``packed``/``scales``/``zeros``)
and checkpoint I/O.
The byte layout is specified once in docs/FORMATS.md; this module is its reference implementation.

Logical weight: ``[*batch, K, N]`` (Flax ``[in, out]``; batch is usually the expert axis E).
Stored leaves:
  * ``packed``  uint8 ``[*batch, R, N]``: codes packed along K (R = K_pad·code_bits/8,
    K_pad = K rounded up to a multiple of 8; padding codes are 0).
  * ``scales``  float32 ``[*batch, G, N]`` (G = number of groups along K; 1 = channel-wise).
  * ``zeros``   float32 ``[*batch, G, N]`` or None (asymmetric linear: integer zero-point;
    ternary: the low level ``w_min``; symmetric linear and log: None).
Static aux data: the ``QuantSpec``, the logical K and the logical float dtype (a registered dataclass
pytree). The batch shape and N are read from the leaves, so the object stays consistent under
``vmap``/``scan``/slicing.
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
]


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
    """Inverse of :func:`pack_codes`: uint8 ``[..., R, N]`` -> uint8 codes ``[..., k, N]``."""
    packed = jnp.asarray(packed)
    *lead, r, n = packed.shape
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

    Leaves ``packed``/``scales``/``zeros`` (None when the spec stores no zeros); static ``spec``, ``k``, ``dtype``.
    """

    packed: Any
    scales: Any
    zeros: Any
    spec: QuantSpec = dataclasses.field(metadata={"static": True})
    k: int = dataclasses.field(metadata={"static": True})
    dtype: Any = dataclasses.field(default=jnp.float32, metadata={"static": True})

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: Any, scales: Any, zeros: Any, spec: QuantSpec,
                   dtype: Any = jnp.float32) -> QuantizedTensor:
        """Build from unpacked codes ``[*batch, K, N]`` and ``[*batch, G, N]`` scales/zeros."""
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
        return cls(pack_codes(codes, spec.code_bits), scales, zeros, spec, k, dtype)

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
        return QuantizedTensor(self.packed[idx], self.scales[idx], z, self.spec, self.k, self.dtype)

    # ---- storage protocol (checkpoint store; every packed-weight class implements it) ---------
    def to_arrays(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Leaves by name + JSON-serialisable metadata (``meta["type"]`` names the class)."""
        arrays = {"packed": self.packed, "scales": self.scales}
        if self.zeros is not None:
            arrays["zeros"] = self.zeros
        return arrays, {"type": "QuantizedTensor", "spec": self.spec.to_dict(), "k": self.k,
                        "dtype": self.dtype.name}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], meta: dict[str, Any]) -> QuantizedTensor:
        spec = QuantSpec.from_dict(meta["spec"])
        k = int(meta["k"])
        packed, scales = arrays["packed"], arrays["scales"]
        zeros = arrays.get("zeros")
        n = packed.shape[-1]
        if packed.dtype != np.uint8 or packed.shape[-2] != packed_rows(k, spec.code_bits):
            raise ValueError(f"packed codes {packed.dtype}{list(packed.shape)} do not fit {spec.describe()} with K={k}")
        want = (*packed.shape[:-2], spec.num_groups(k), n)
        if tuple(scales.shape) != want or (spec.has_zeros and (zeros is None or tuple(zeros.shape) != want)):
            raise ValueError(f"scales/zeros shapes do not fit {spec.describe()} {list(want)}")
        return cls(packed, scales, zeros if spec.has_zeros else None, spec, k, meta.get("dtype", "float32"))

    # ---- storage accounting ------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes really stored (packed codes + scales + zeros)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.packed, self.scales, self.zeros) if a is not None)

    def __repr__(self) -> str:
        return (f"QuantizedTensor({self.spec.describe()}, shape={self.shape}, "
                f"{self.bits_per_param:.3f} bits/param)")
