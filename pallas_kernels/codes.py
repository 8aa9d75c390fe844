"""The value of a packed code (docs/FORMATS.md §1): the one definition, on raw values.

A code format is described by static Python values: ``scheme`` (``"linear"``, ``"log"`` or ``"ternary"``)
and ``code_bits`` (bits of one stored code; ternary codes take 2). :func:`dequant_codes` is the reference
rule (``moqe_jax.packed.qtensor`` evaluates it for the XLA path); :func:`code_values` is the kernels'
inner-loop form of the same values, checked against it code by code in tests/test_kernels_dequant.py.
Pure ``jax.numpy``: importable without Pallas.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["SCHEMES", "WORD_MIN_GROUP_WORDS", "check_format", "codes_per_row", "dequant_codes", "code_consts",
           "value_shift", "code_values", "words_supported", "words_unsupported_reason", "pack_words", "unpack_words"]

SCHEMES = ("linear", "log", "ternary")


def check_format(scheme: str, code_bits: int) -> None:
    """Raise ValueError for a (scheme, code_bits) pair that no packed layout uses."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if code_bits not in ((2,) if scheme == "ternary" else (8, 4, 3, 2)):
        raise ValueError(f"{scheme} codes cannot have {code_bits} bits")


def codes_per_row(code_bits: int) -> int:
    """K rows per packed row (and per plane row for 3-bit): the residue count ``p``."""
    return 8 if code_bits == 3 else 8 // code_bits


# ---------------------------------------------------------------------------------------------- word layout
#: A scale group must span at least this many 32-bit words along K (the kernels' K tile of 16 word rows must
#: lie inside one group).
WORD_MIN_GROUP_WORDS = 16


def words_unsupported_reason(code_bits: int, group_size: int | None) -> str | None:
    """Why the uint32 word layout (docs/FORMATS.md §1) does not serve this format (None = it does): 2/4/8-bit
    codes only (3-bit bit planes stay bytes), and a scale group of ≥ 16 words (power-of-two part of the group
    size ≥ 16·32/b K rows: int4 ≥ 128, int2/ternary ≥ 256, int8 ≥ 64; channel-wise always)."""
    if code_bits not in (2, 4, 8):
        return f"{code_bits}-bit codes have no word layout (bit planes stay bytes)"
    if group_size is not None and (group_size & -group_size) < WORD_MIN_GROUP_WORDS * (32 // code_bits):
        return (f"group size {group_size} too small for the word layout of {code_bits}-bit codes (needs a "
                f"power-of-two part ≥ {WORD_MIN_GROUP_WORDS * (32 // code_bits)})")
    return None


def words_supported(code_bits: int, group_size: int | None) -> bool:
    """Whether the uint32 word layout serves this format (see :func:`words_unsupported_reason`)."""
    return words_unsupported_reason(code_bits, group_size) is None


def pack_words(packed: Any) -> jax.Array:
    """Stored uint8 layout ``[..., R, N]`` (2/4/8-bit codes) -> word layout uint32 ``[..., ceil(R/4), N]``:
    word ``w`` of a column = bytes ``4w … 4w+3`` little-endian (missing bytes are 0 = padding codes)."""
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"pack_words takes the uint8 byte layout, got {packed.dtype}")
    *lead, r, n = packed.shape
    rw = -(-r // 4)
    b = jnp.pad(packed, [(0, 0)] * len(lead) + [(0, 4 * rw - r), (0, 0)]).astype(jnp.uint32)
    b = b.reshape(*lead, rw, 4, n)
    return b[..., 0, :] | (b[..., 1, :] << 8) | (b[..., 2, :] << 16) | (b[..., 3, :] << 24)


def unpack_words(words: Any, rows: int) -> jax.Array:
    """Inverse of :func:`pack_words`: uint32 ``[..., ceil(rows/4), N]`` -> the uint8 byte layout ``[..., rows, N]``."""
    words = jnp.asarray(words)
    if words.dtype != jnp.uint32:
        raise ValueError(f"unpack_words takes the uint32 word layout, got {words.dtype}")
    *lead, rw, n = words.shape
    if rw != -(-rows // 4):
        raise ValueError(f"{rw} word rows cannot hold {rows} byte rows")
    sh = (jnp.arange(4, dtype=jnp.uint32) * jnp.uint32(8)).reshape(4, 1)
    b = ((words[..., :, None, :] >> sh) & jnp.uint32(0xFF)).astype(jnp.uint8)
    return b.reshape(*lead, 4 * rw, n)[..., :rows, :]


def dequant_codes(q: Any, scale: Any, zero: Any, *, scheme: str, code_bits: int) -> jax.Array:
    """Elementwise value of codes ``q`` with broadcastable float32 ``scale``/``zero``:

    * linear:  ``scale · (q − zero)``; symmetric (``zero`` None) uses the fixed mid-point ``2^(b−1)``;
    * log:     ``(−1)^sign · scale · 2^(−e)`` with ``sign = q >> (b−1)``, ``e = q & (2^(b−1)−1)``;
    * ternary: ``0 → 0, 1 → zero (= w_min), 2 → scale (= w_max)`` (QMoE symbols).
    """
    qf = q.astype(jnp.float32)
    if scheme == "ternary":
        return jnp.where(qf == 2.0, scale, jnp.where(qf == 1.0, zero, 0.0)).astype(jnp.float32)
    if scheme == "log":
        half = float(1 << (code_bits - 1))
        neg = qf >= half
        e = jnp.where(neg, qf - half, qf)
        mag = scale * jnp.exp2(-e)
        return jnp.where(neg, -mag, mag)
    if zero is None:
        zero = float(1 << (code_bits - 1))
    return scale * (qf - zero)


_MAGIC_BITS = 0x4B000000  # f32 bits of 2^23: OR-ing an integer c < 2^23 into the mantissa gives 2^23 + c exactly
_MAGIC = 8388608.0


def code_consts(scale: jax.Array, zero: jax.Array | None, *, scheme: str, code_bits: int,
                shift: int = 0) -> tuple[Any, ...]:
    """Per-column constants of :func:`code_values` for codes stored ``shift`` bits up (computed once per K tile
    or once per launch, never per weight)."""
    if scheme == "ternary":  # value(q) = q·(A + B·q): 0 → 0, 1 → A + B = w_min, 2 → 2A + 4B = w_max
        assert zero is not None
        return ((2.0 * zero - 0.5 * scale) * 2.0 ** -shift, (0.5 * scale - zero) * 2.0 ** (-2 * shift))
    if scheme == "log":
        return ()
    z = float(1 << (code_bits - 1)) if zero is None else zero
    return (_MAGIC + z * float(1 << shift),)


def value_shift(scheme: str, code_bits: int) -> bool:
    """Whether :func:`code_values` takes codes in place (``Q = q·2^shift``, no shift per weight): linear and
    ternary 2/4/8-bit codes; log and 3-bit (bit planes) take ``q`` itself."""
    return scheme != "log" and code_bits != 3


def code_values(q: jax.Array, consts: tuple[Any, ...], *, scheme: str, code_bits: int, shift: int = 0) -> jax.Array:
    """Float32 values of uint32 codes using only full-rate ALU ops (no int→float convert, no ``exp2``, no
    selects), so that the scale can be applied after the K reduction. ``q`` holds the code ``shift`` bits up
    (``Q = c·2^shift``, i.e. masked in place inside the packed byte, which saves the per-weight shift);
    ``consts = code_consts(s, z, ..., shift=shift)``. With code ``c``:

    * linear: ``bitcast(Q | 0x4B000000) − (2^23 + z·2^shift)`` = ``2^shift·(c − z)`` exactly (``z``
      integer-valued, FORMATS §1); ``dequant_codes = s·2^−shift·v``;
    * log (``shift = 0``): the f32 bits of ``(−1)^sign · 2^(−e)`` built directly, ``(127 − e) << 23 | sign << 31``
      (exact; ``e = 127`` of 8-bit log gives ±0 instead of the subnormal 2^−127); ``dequant_codes = s·v``;
    * ternary: ``Q·(A' + B'·Q)`` = ``dequant_codes(c, s, z)`` itself (up to an ulp at c = 1, 2).
    """
    if scheme == "log":
        if shift:
            raise ValueError("log codes are decoded unshifted")
        b = code_bits
        e = q & jnp.uint32((1 << (b - 1)) - 1)
        bits = (jnp.uint32(127 << 23) - (e << jnp.uint32(23))) | ((q >> jnp.uint32(b - 1)) << jnp.uint32(31))
        return jax.lax.bitcast_convert_type(bits, jnp.float32)
    f = jax.lax.bitcast_convert_type(q | jnp.uint32(_MAGIC_BITS), jnp.float32)
    if scheme == "ternary":
        qf = f - _MAGIC
        return qf * (consts[0] + consts[1] * qf)
    return f - consts[0]
