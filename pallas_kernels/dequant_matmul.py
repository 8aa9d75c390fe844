"""Fused dequantize-matmul Pallas kernels: ``y = x @ dequant(W)`` reading the packed codes directly.

MoQE (Kim et al. 2023, §3/§5: weight-only int8/4/3/2 experts, decode is memory-bound) and QMoE
(Frantar & Alistarh 2023, §3.2: 2-bit / ternary experts). The float weight is never written to HBM.
Shaped like jax's own Pallas ops (``jax.experimental.pallas.ops.gpu.attention``; docs/KERNELS.md): the kernels
are module-level functions bound to a frozen, hashable :class:`Plan` with ``functools.partial``; they work on
raw arrays; :func:`qmm_reference` is the pure-``jax.numpy`` definition next to the op; nothing here reads the
environment or carries a test hook.

**Operands.** ``x [A, M, K]``; ``packed [E, R, N]`` of *words* holding codes along K; ``scales``/``zeros``
float32 ``[E, G, N]``. The word width is the operand's dtype:

* ``uint8`` — the stored layout of docs/FORMATS.md §1 (``p = 8/b`` codes per byte; 3-bit: bit planes);
* ``uint32`` — the kernel word layout of docs/FORMATS.md §1 ("kernel word layout"): 4 consecutive packed
  bytes of a column as one little-endian word, so ONE load brings ``p = 32/b`` codes of one column
  (8 int4, 16 int2/ternary, 4 int8), code ``j`` of the word at bits ``[j·b, (j+1)·b)`` (:func:`pack_words`;
  2/4/8-bit codes only). Marlin and GemLite pack int32 words along K the same way (docs/KERNELS.md).

**Residue split** (no in-kernel interleave): with ``p`` codes per word, word row ``i`` residue ``j`` holds
K-row ``k = i·p + j``, so ``x @ W = Σ_j x[:, j::p] @ W_j``; ``x[:, j::p]`` is read with strided loads
(interpret mode / ``xprep=True``: a residue-split copy made by XLA). Codes become floats with
:func:`pallas_kernels.codes.code_values` (magic-number floats, codes masked in place inside a 16-bit half of
the word, no int→float convert); the scale is applied after the K reduction.

**Modes** (:class:`Blocks`): ``fma`` — the batch-1..4 GEMV: per activation row a ``[bkr, bn]`` float32
multiply-accumulate in registers, reduced over K once at the end; ``dot`` — tensor-core dots (M ≥ 8, or any
M on byte operands beyond :data:`FMA_MAX_M`). Split-K: ``splits`` programs per output tile write float32
partials that one small XLA reduction sums (the second pass), the scale already applied per program.

Grid ``(N blocks, K splits × M blocks, A)``; an optional ``expert_ids [A]`` makes slot ``a`` read expert
``expert_ids[a]`` (the decode launch over active experts only). Triton-lowering constraints respected
(docs/JAX_NOTES.md §4.5): power-of-two blocks, every dot dim ≥ 16, same-dtype dot operands, no value gathers
(tiles never straddle a scale group), masked loads/stores for ragged K and N.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import backend
from pallas_kernels.codes import (
    check_format,
    code_consts,
    code_values,
    dequant_codes,
    pack_words,
    unpack_words,
    value_shift,
    words_supported,
    words_unsupported_reason,
)

__all__ = ["Blocks", "Plan", "KernelCall", "FMA_MAX_M", "GEMV_MAX_M", "plan_blocks", "unsupported_reason",
           "words_supported", "word_bits_of", "codes_per_word", "packed_height", "pack_words", "unpack_words",
           "unpack_codes",
           "qmm", "qmm_call", "qmm_reference", "quant_matmul"]

_SMS = 132                       # H100 SXM streaming multiprocessors: the scale of the program-count targets
_TARGET_PROGRAMS = 2 * _SMS      # byte operands (v3 rule)
_GEMV_TARGET_PROGRAMS = 4 * _SMS  # word GEMV: split K until ~4 programs per SM hide the load latency
_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
FMA_MAX_M = 2    # byte operands: GEMV form up to this many rows (v2.1 rule, KERNEL_NOTES.md)
GEMV_MAX_M = 4   # word operands: GEMV form for batch 1..4; more rows use the tensor-core dot
_FMA_ACC_BUDGET = 4096  # m·bkr·bn f32 accumulators per program (= 32 registers/thread at 4 warps)


def _pow2_ceil(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _pow2_divisor(v: int) -> int:
    return v & -v


# ---------------------------------------------------------------------------------------------- word layouts
def word_bits_of(packed: Any) -> int:
    """Bits of one packed word: 8 (stored uint8 layout) or 32 (kernel word layout)."""
    bits = 8 * jnp.dtype(packed.dtype).itemsize
    if jnp.dtype(packed.dtype) not in (jnp.dtype(jnp.uint8), jnp.dtype(jnp.uint32)):
        raise ValueError(f"packed codes must be uint8 (stored layout) or uint32 (word layout), got {packed.dtype}")
    return bits


def codes_per_word(code_bits: int, word_bits: int = 8) -> int:
    """K rows per word row (per plane row for 3-bit): the residue count ``p``."""
    return word_bits if code_bits == 3 else word_bits // code_bits


def packed_height(k: int, code_bits: int, word_bits: int = 8) -> int:
    """Word rows per plane along K (``R`` of FORMATS §1 for bytes; ``ceil(R/4)`` for words)."""
    return -(-(-(-k // 8) * 8) // codes_per_word(code_bits, word_bits))


def unpack_codes(packed: jax.Array, *, code_bits: int, k: int) -> jax.Array:
    """uint32 codes ``[..., K, N]`` of either layout (reference form: one gather per code)."""
    wb = word_bits_of(packed)
    ks = jnp.arange(k)
    w = jnp.asarray(packed).astype(jnp.uint32)
    if code_bits == 3:
        h = packed.shape[-2] // 3
        q = jnp.zeros((*packed.shape[:-2], k, packed.shape[-1]), jnp.uint32)
        for c in range(3):
            bit = (w[..., c * h + ks // wb, :] >> (ks % wb)[:, None].astype(jnp.uint32)) & jnp.uint32(1)
            q = q | (bit << jnp.uint32(c))
        return q
    p = codes_per_word(code_bits, wb)
    sh = ((ks % p) * code_bits)[:, None].astype(jnp.uint32)
    return (w[..., ks // p, :] >> sh) & jnp.uint32((1 << code_bits) - 1)


# ---------------------------------------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True, slots=True)
class Blocks:
    """Tiling of one launch. ``bkr`` counts word (plane) rows, i.e. ``bkr·p`` K rows.

    ``mode="dot"``: ``[bm, bkr] @ [bkr, bn]`` tensor-core dots (bm, bn, bkr powers of two ≥ 16).
    ``mode="fma"`` (GEMV): per activation row a ``[bkr, bn]`` float32 multiply-accumulate in registers,
    reduced over K once at the end — no dot, no operand layout conversion; ``bm`` is then M itself.
    """

    bm: int
    bn: int
    bkr: int
    splits: int
    num_warps: int = 4
    num_stages: int = 3
    mode: str = "dot"


def _max_bkr(code_bits: int, group_size: int | None, word_bits: int = 8) -> int:
    """Largest tile height (word rows) that keeps a tile inside one scale group."""
    if group_size is None:
        return 1 << 30
    return _pow2_divisor(group_size) // codes_per_word(code_bits, word_bits)


def unsupported_reason(code_bits: int, group_size: int | None, x_dtype: Any, word_bits: int = 8) -> str | None:
    """Why the kernel cannot run this case (None = supported). The caller falls back to XLA."""
    if jnp.dtype(x_dtype) not in _FLOAT_DTYPES:
        return f"activation dtype {jnp.dtype(x_dtype)} (needs bf16/f16/f32)"
    if word_bits == 32:
        return words_unsupported_reason(code_bits, group_size)
    if _max_bkr(code_bits, group_size, word_bits) < 16:
        return (f"group size {group_size} too small for {code_bits}-bit codes in {word_bits}-bit words "
                f"(a tile of ≥16 word rows must lie in one group)")
    return None


def _splits(n_prog: int, n_kt: int, below: int, target: int) -> int:
    """Split-K count: only when the grid has fewer than ``below`` programs, up to ~``target`` programs."""
    if n_prog >= below:
        return 1
    splits = max(1, min(n_kt, -(-target // n_prog)))
    per = -(-n_kt // splits)
    return -(-n_kt // per)


def _dot_blocks(m: int, n: int, bkr: int) -> tuple[int, int, int, int]:
    """(bm, bn, bkr, warps) of the tensor-core mode (shared by both word widths)."""
    bm = min(64, max(16, _pow2_ceil(m)))
    bn = max(32, min(128, _pow2_ceil(n)))
    if m > 16 and bn > 64:
        bn = 64
    return bm, bn, bkr, 8 if bm * bn >= 64 * 128 else 4


def _plan_bytes(m: int, k: int, n: int, e: int, code_bits: int, group_size: int | None) -> Blocks:
    rv = packed_height(k, code_bits)
    bkr = {8: 64, 3: 64}.get(code_bits, 128)
    bkr = max(16, min(bkr, _pow2_ceil(rv), _max_bkr(code_bits, group_size)))
    if m <= FMA_MAX_M:
        # register budget: the m accumulators [bkr, bn] f32 hold ≤ 32 values per thread (4 warps); more spills
        bn = max(32, min(128, _pow2_ceil(n)))
        while bn > 32 and -(-n // bn) * e < _TARGET_PROGRAMS:
            bn //= 2
        while m * bkr * bn > _FMA_ACC_BUDGET and bn > 32:
            bn //= 2
        while m * bkr * bn > _FMA_ACC_BUDGET and bkr > 16:
            bkr //= 2
        bm, warps, stages, mode = m, 4, 4, "fma"
    else:
        bm, bn, bkr, warps = _dot_blocks(m, n, bkr)
        stages, mode = 3, "dot"
    n_prog = -(-n // bn) * -(-m // bm) * e
    splits = _splits(n_prog, -(-rv // bkr), _SMS, _TARGET_PROGRAMS)
    return Blocks(bm=bm, bn=bn, bkr=bkr, splits=splits, num_warps=warps, num_stages=stages, mode=mode)


def _plan_words(m: int, k: int, n: int, e: int, code_bits: int, group_size: int | None) -> Blocks:
    rw = packed_height(k, code_bits, 32)
    bkr = max(16, min(16, _pow2_ceil(rw), _max_bkr(code_bits, group_size, 32)))
    if m <= GEMV_MAX_M:
        # [16 words, 64 columns] per tile: 256 contiguous bytes per word row (coalesced), 8 (int4) / 16 (int2)
        # codes per load; M·bkr·bn ≤ 4096 accumulators (M = 4: exactly the budget)
        bn = max(16, min(64, _pow2_ceil(n)))
        while m * bkr * bn > _FMA_ACC_BUDGET and bkr > 4:
            bkr //= 2
        bm, warps, stages, mode = m, 4, 3, "fma"
        below = target = _GEMV_TARGET_PROGRAMS
    else:
        bm, bn, bkr, warps = _dot_blocks(m, n, bkr)
        stages, mode = 3, "dot"
        below, target = _SMS, _TARGET_PROGRAMS
    n_prog = -(-n // bn) * -(-m // bm) * e
    splits = _splits(n_prog, -(-rw // bkr), below, target)
    return Blocks(bm=bm, bn=bn, bkr=bkr, splits=splits, num_warps=warps, num_stages=stages, mode=mode)


def plan_blocks(m: int, k: int, n: int, e: int, *, code_bits: int, group_size: int | None,
                word_bits: int = 8) -> Blocks:
    """Block-size heuristic (H100 measurements and predictions in benchmarks/results/KERNEL_NOTES.md).

    ==================  ===========================================  ======================================
    rule                byte operands (uint8)                        word operands (uint32)
    ==================  ===========================================  ======================================
    mode                ``fma`` for M ≤ 2, else ``dot``              ``fma`` for M ≤ 4, else ``dot``
    BM                  fma: M; dot: next pow2 ≥ M, 16 … 64          same
    BN                  fma: largest of 128/64/32 giving ≥ 264       fma: 64 (≤ next pow2 ≥ N);
                        programs, and M·BKr·BN ≤ 4096; dot: 128,     dot: as bytes
                        64 when M > 16
    BKr (word rows)     128 (int8, 3-bit planes: 64), ≥ 16, ≤ the    16 (= 128 int4 / 256 int2 K rows),
                        group's power-of-two part / p                fma: halved while M·BKr·BN > 4096
    splits (split-K)    when the grid has < 132 programs, up to      fma: up to ~528 programs;
                        ~264 programs                                dot: as bytes
    warps / stages      fma 4 / 4; dot 4 / 3, 8 warps when           fma 4 / 3; dot as bytes
                        BM·BN ≥ 64·128
    ==================  ===========================================  ======================================
    """
    if word_bits == 32:
        return _plan_words(m, k, n, e, code_bits, group_size)
    return _plan_bytes(m, k, n, e, code_bits, group_size)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one launch; the kernels are bound to it with ``functools.partial``."""

    scheme: str
    code_bits: int
    group_size: int | None
    word_bits: int
    m: int
    k: int
    n: int
    blocks: Blocks
    has_zeros: bool
    has_ids: bool
    cdt: Any
    interpret: bool
    xprep: bool

    @property
    def p(self) -> int:
        return codes_per_word(self.code_bits, self.word_bits)

    @property
    def rv(self) -> int:
        return packed_height(self.k, self.code_bits, self.word_bits)

    @property
    def n_kt(self) -> int:
        return -(-self.rv // self.blocks.bkr)

    @property
    def per_split(self) -> int:
        return -(-self.n_kt // self.blocks.splits)

    @property
    def n_mb(self) -> int:
        return -(-self.m // self.blocks.bm)

    @property
    def tiled(self) -> bool:
        """Full K tiles: ``packed`` arrives as ``[E, (3,) n_kt, bkr, N]`` (a free reshape) and the tile is a scalar
        index, so the per-element pointer offsets are loop-invariant."""
        return self.n_kt * self.blocks.bkr == self.rv

    @property
    def ragged_k(self) -> bool:
        return self.n_kt * self.blocks.bkr * self.p != self.k

    @property
    def ragged_n(self) -> bool:
        return self.n % self.blocks.bn != 0

    @property
    def ragged_m(self) -> bool:
        return self.m % self.blocks.bm != 0

    @property
    def fmt(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "code_bits": self.code_bits}

    @property
    def post_scale(self) -> bool:
        """linear / log: ``y = s · Σ x·v``; ternary values carry their scales."""
        return self.scheme != "ternary"

    def residue(self, j: int) -> tuple[bool, int, int]:
        """``(from high half, in-place shift, extraction shift)`` of code ``j`` of a word.

        In place (linear/ternary 2/4/8-bit): the code is masked where it lies, worth ``2^shift·c``; a 32-bit
        word's codes above bit 16 are taken from ``word >> 16`` (one shift per word) so that ``Q < 2^16``
        stays exact in the magic-number float. Otherwise (log, 3-bit): shifted down, value unshifted.
        """
        o = j * self.code_bits
        if self.code_bits == 3 or not value_shift(self.scheme, self.code_bits):
            return False, 0, o
        if self.word_bits == 8 or o + self.code_bits <= 16:
            return False, o, 0
        return True, o - 16, 0

    def xscale(self, j: int) -> float | None:
        """Power of two that undoes the in-place shift of residue ``j`` (on x in fma mode, on the dot in dot
        mode; never per weight)."""
        sh = self.residue(j)[1]
        return 2.0 ** -sh if (sh and self.scheme != "ternary") else None


# ---------------------------------------------------------------------------------------------- kernel bodies
def _and(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    """Conjunction of optional (broadcastable) masks; None = no mask."""
    return b if a is None else a if b is None else a & b


def _load(ref: Any, mask: jax.Array | None = None, other: Any = None) -> jax.Array:
    # plgpu.load/store also run in interpret mode, where out-of-bounds slices are padded, not shifted
    return backend.plgpu.load(ref, mask=mask, other=other)


def _x_row(plan: Plan, x_ref: Any, a: Any, j: int, row: int, r0: Any) -> jax.Array:
    """Residue-j activation vector of one row: ``x[a, row, (r0 + i)·p + j]`` for i < bkr (0 past K)."""
    pl, bkr, p = backend.pl, plan.blocks.bkr, plan.p
    if plan.xprep:
        return _load(x_ref.at[a, jnp.int32(j), jnp.int32(row), pl.ds(r0, bkr)])
    src = x_ref.at[a, jnp.int32(row), pl.ds(r0 * p + j, bkr, stride=p)]
    if not plan.ragged_k:
        return _load(src)
    return _load(src, (r0 + jnp.arange(bkr)) * p + j < plan.k, 0.0)


def _x_block(plan: Plan, x_ref: Any, a: Any, j: int, m0: Any, r0: Any) -> jax.Array:
    """Residue-j activation tile ``[bm, bkr]`` of rows ``m0 …`` (zero outside M and K)."""
    pl, bm, bkr, p = backend.pl, plan.blocks.bm, plan.blocks.bkr, plan.p
    if plan.xprep:
        return _load(x_ref.at[a, jnp.int32(j), pl.ds(m0, bm), pl.ds(r0, bkr)])
    mask = _and(((m0 + jnp.arange(bm)) < plan.m)[:, None] if plan.ragged_m else None,
                ((r0 + jnp.arange(bkr)) * p + j < plan.k)[None, :] if plan.ragged_k else None)
    src = x_ref.at[a, pl.ds(m0, bm), pl.ds(r0 * p + j, bkr, stride=p)]
    return _load(src) if mask is None else _load(src, mask, 0.0)


def _group_params(plan: Plan, s_ref: Any, z_ref: Any, e: Any, g: Any, nsl: Any,
                  cmask: jax.Array | None) -> tuple[jax.Array, list[tuple[Any, ...]]]:
    """``([1, BN] scale, [code_consts per residue])`` of scale group ``g``."""
    other = None if cmask is None else 0.0
    s = _load(s_ref.at[e, g, nsl], cmask, other)[None, :]
    z = _load(z_ref.at[e, g, nsl], cmask, other)[None, :] if z_ref is not None else None
    return s, [code_consts(s, z, **plan.fmt, shift=plan.residue(j)[1]) for j in range(plan.p)]


def _word_tiles(plan: Plan, p_ref: Any, e: Any, t: Any, nsl: Any, cmask: jax.Array | None) -> list[jax.Array]:
    """uint32 word tiles ``[bkr, bn]`` of K tile ``t``: one (2/4/8-bit) or three bit planes (3-bit)."""
    pl, bkr, rv = backend.pl, plan.blocks.bkr, plan.rv
    r0 = t * bkr
    mask = _and(((r0 + jnp.arange(bkr)) < rv)[:, None] if not plan.tiled else None,
                None if cmask is None else cmask[None, :])
    zero = None if mask is None else jnp.zeros((), p_ref.dtype)
    planes = range(3) if plan.code_bits == 3 else [None]
    out = []
    for c in planes:
        lead = (e,) if c is None else (e, jnp.int32(c))
        if plan.tiled:
            ref = p_ref.at[(*lead, t, pl.ds(0, bkr), nsl)]
        else:
            ref = p_ref.at[e, pl.ds((c or 0) * rv + r0, bkr), nsl]
        out.append(_load(ref, mask, zero).astype(jnp.uint32))  # widened once per word, not once per code
    return out


def _residue_codes(plan: Plan, words: list[jax.Array], hi: jax.Array | None, j: int) -> jax.Array:
    """Code ``j`` of every word of the tile, as :func:`code_values` takes it (in place or shifted down)."""
    one, b = jnp.uint32(1), plan.code_bits
    if b == 3:
        sh = jnp.uint32(j)
        return ((words[0] >> sh) & one) | (((words[1] >> sh) & one) << one) | \
            (((words[2] >> sh) & one) << jnp.uint32(2))
    if b == plan.word_bits:
        return words[0]
    from_hi, sh, down = plan.residue(j)
    src = hi if from_hi else words[0]
    if down:
        return (src >> jnp.uint32(down)) & jnp.uint32((1 << b) - 1)
    return src & jnp.uint32(((1 << b) - 1) << sh)  # in place: one LOP3 with the OR of code_values


def _tile_values(plan: Plan, refs: tuple[Any, ...], e: Any, t: Any, nsl: Any, cmask: jax.Array | None,
                 channel_params: Any) -> tuple[list[tuple[int, jax.Array]], jax.Array | None]:
    """``([(residue, [bkr, bn] float32 code values)], tile scale)`` of K tile ``t``; the scale is None when it is
    applied once after the loop (channel-wise) or carried by the values (ternary)."""
    p_ref, s_ref, z_ref = refs
    if plan.group_size is None:
        s, consts = channel_params
    else:
        s, consts = _group_params(plan, s_ref, z_ref, e, (t * plan.blocks.bkr * plan.p) // plan.group_size,
                                  nsl, cmask)
    words = _word_tiles(plan, p_ref, e, t, nsl, cmask)
    needs_hi = plan.word_bits == 32 and any(plan.residue(j)[0] for j in range(plan.p))
    hi = (words[0] >> jnp.uint32(16)) if needs_hi else None
    vals = [(j, code_values(_residue_codes(plan, words, hi, j), consts[j], **plan.fmt, shift=plan.residue(j)[1]))
            for j in range(plan.p)]
    return vals, (s if plan.post_scale and plan.group_size is not None else None)


def _program(plan: Plan, ids_ref: Any) -> dict[str, Any]:
    """Program coordinates: expert, slot, split, first row, column slice and mask, K-tile range."""
    pl, b = backend.pl, plan.blocks
    nb, sm, a = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    split = sm // plan.n_mb
    n0 = nb * b.bn
    t0 = split * plan.per_split
    return {"a": a, "e": ids_ref[a] if ids_ref is not None else a, "split": split, "m0": (sm % plan.n_mb) * b.bm,
            "nsl": pl.ds(n0, b.bn), "cmask": (n0 + jnp.arange(b.bn)) < plan.n if plan.ragged_n else None,
            "t0": t0, "t1": jnp.minimum(t0 + plan.per_split, plan.n_kt)}


def _unpack_refs(plan: Plan, refs: tuple[Any, ...]) -> tuple[Any, Any, tuple[Any, Any, Any], Any]:
    """``(ids_ref | None, x_ref, (p_ref, s_ref, z_ref | None), o_ref)``."""
    ids_ref = refs[0] if plan.has_ids else None
    rest = refs[1:] if plan.has_ids else refs
    x_ref, p_ref, s_ref = rest[:3]
    z_ref = rest[3] if plan.has_zeros else None
    return ids_ref, x_ref, (p_ref, s_ref, z_ref), rest[-1]


def _channel_params(plan: Plan, wrefs: tuple[Any, ...], pr: dict[str, Any]) -> Any:
    if plan.group_size is not None:
        return None
    return _group_params(plan, wrefs[1], wrefs[2], pr["e"], jnp.int32(0), pr["nsl"], pr["cmask"])


def _fma_kernel(*refs: Any, plan: Plan) -> None:
    """GEMV: ``bm = M`` rows, per row a ``[bkr, bn]`` f32 register accumulator, one K reduction at the end."""
    ids_ref, x_ref, wrefs, o_ref = _unpack_refs(plan, refs)
    pr = _program(plan, ids_ref)
    ch = _channel_params(plan, wrefs, pr)
    bm, bkr, bn = plan.blocks.bm, plan.blocks.bkr, plan.blocks.bn

    def body(t: Any, accs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        vals, s_t = _tile_values(plan, wrefs, pr["e"], t, pr["nsl"], pr["cmask"], ch)
        new = []
        for i in range(bm):
            part: Any = accs[i] if s_t is None else None
            for j, v in vals:
                xv = _x_row(plan, x_ref, pr["a"], j, i, t * bkr).astype(jnp.float32)
                xs = plan.xscale(j)
                xv = (xv if xs is None else xv * xs)[:, None]
                part = xv * v if part is None else part + xv * v
            new.append(part if s_t is None else accs[i] + part * s_t)
        return tuple(new)

    accs = jax.lax.fori_loop(pr["t0"], pr["t1"], body, tuple(jnp.zeros((bkr, bn), jnp.float32) for _ in range(bm)))
    for i in range(bm):
        row = jnp.sum(accs[i], axis=0)
        if plan.post_scale and ch is not None:
            row = row * ch[0][0]
        idx = (pr["split"], pr["a"], jnp.int32(i)) if plan.blocks.splits > 1 else (pr["a"], jnp.int32(i))
        backend.plgpu.store(o_ref.at[(*idx, pr["nsl"])], row.astype(o_ref.dtype), mask=pr["cmask"])


def _dot(plan: Plan, a: jax.Array, w: jax.Array) -> jax.Array:
    if plan.interpret:
        return jnp.dot(a, w, preferred_element_type=jnp.float32)
    return backend.plgpu.dot(a, w, allow_tf32=False if plan.cdt == jnp.float32 else None)


def _dot_kernel(*refs: Any, plan: Plan) -> None:
    """Tensor-core form: per K tile and residue a ``[bm, bkr] @ [bkr, bn]`` dot on the code values."""
    ids_ref, x_ref, wrefs, o_ref = _unpack_refs(plan, refs)
    pr = _program(plan, ids_ref)
    ch = _channel_params(plan, wrefs, pr)
    bm, bkr, bn = plan.blocks.bm, plan.blocks.bkr, plan.blocks.bn

    def body(t: Any, acc: jax.Array) -> jax.Array:
        vals, s_t = _tile_values(plan, wrefs, pr["e"], t, pr["nsl"], pr["cmask"], ch)
        part: Any = acc if s_t is None else None
        for j, v in vals:
            d = _dot(plan, _x_block(plan, x_ref, pr["a"], j, pr["m0"], t * bkr), v.astype(plan.cdt))
            xs = plan.xscale(j)
            d = d if xs is None else d * xs
            part = d if part is None else part + d
        return part if s_t is None else acc + part * s_t

    acc = jax.lax.fori_loop(pr["t0"], pr["t1"], body, jnp.zeros((bm, bn), jnp.float32))
    if plan.post_scale and ch is not None:
        acc = acc * ch[0]
    rows = backend.pl.ds(pr["m0"], bm)
    out = o_ref.at[pr["split"], pr["a"], rows, pr["nsl"]] if plan.blocks.splits > 1 else \
        o_ref.at[pr["a"], rows, pr["nsl"]]
    omask = _and(((pr["m0"] + jnp.arange(bm)) < plan.m)[:, None] if plan.ragged_m else None,
                 None if pr["cmask"] is None else pr["cmask"][None, :])
    backend.plgpu.store(out, acc.astype(o_ref.dtype), mask=omask)


# ---------------------------------------------------------------------------------------------- launch
@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One prepared launch: ``backend.pallas_call(kernel, …)(*args)``, then :meth:`finish` (split-K sum)."""

    kernel: Callable[..., None]
    args: tuple[Any, ...]
    out_shape: jax.ShapeDtypeStruct
    grid: tuple[int, int, int]
    name: str
    plan: Plan

    def launch(self, *, interpret: bool) -> jax.Array:
        call = backend.pallas_call(self.kernel, out_shape=self.out_shape, grid=self.grid, interpret=interpret,
                                   num_warps=self.plan.blocks.num_warps, num_stages=self.plan.blocks.num_stages,
                                   name=self.name)
        return self.finish(call(*self.args))

    def finish(self, y: jax.Array) -> jax.Array:
        """The second pass of split-K: sum the float32 partials (scales already applied per program)."""
        return y if self.plan.blocks.splits == 1 else jnp.sum(y, axis=0).astype(self.plan.cdt)


def _fit_blocks(blocks: Blocks, m: int, n_kt_of: Callable[[int], int]) -> Blocks:
    """Normalise explicit blocks: fma ``bm = M``; ``splits`` = the number of non-empty K ranges."""
    if blocks.mode == "fma" and blocks.bm != m:
        blocks = dataclasses.replace(blocks, bm=m)
    n_kt = n_kt_of(blocks.bkr)
    per = -(-n_kt // blocks.splits)
    return dataclasses.replace(blocks, splits=-(-n_kt // per))


def _residue_split(x: jax.Array, plan: Plan) -> jax.Array:
    """``xr[a, j, m, i] = x[a, m, i·p + j]`` (zero padded): the activation of ``xprep`` / interpret mode."""
    e, m, k = x.shape
    rt, p, bm = plan.n_kt * plan.blocks.bkr, plan.p, plan.blocks.bm
    xp = jnp.pad(x, ((0, 0), (0, plan.n_mb * bm - m), (0, rt * p - k)))
    return xp.reshape(e, plan.n_mb * bm, rt, p).transpose(0, 3, 1, 2)


def qmm_call(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array | None,
             expert_ids: jax.Array | None = None, *, k: int, code_bits: int, scheme: str, group_size: int | None,
             blocks: Blocks | None = None, interpret: bool = False, xprep: bool = False) -> KernelCall:
    """Prepare :func:`qmm`'s launch (plan, bound kernel, operands) without running it."""
    check_format(scheme, code_bits)
    a, m, kx = x.shape
    if kx != k:
        raise ValueError(f"x has K={kx}, weight has K={k}")
    wb = word_bits_of(packed)
    if wb == 32 and not words_supported(code_bits, group_size):
        raise ValueError(f"{code_bits}-bit codes with group size {group_size} have no word layout; pass uint8 codes")
    n = packed.shape[-1]
    if packed.shape[-2] != (3 if code_bits == 3 else 1) * packed_height(k, code_bits, wb):
        raise ValueError(f"packed {list(packed.shape)} does not hold K={k} {code_bits}-bit codes in {wb}-bit words")
    if expert_ids is None and packed.shape[0] != a:
        raise ValueError(f"x has {a} expert slots, weight has {packed.shape[0]} experts")
    blocks = _fit_blocks(blocks or plan_blocks(m, k, n, a, code_bits=code_bits, group_size=group_size, word_bits=wb),
                         m, lambda bkr: -(-packed_height(k, code_bits, wb) // bkr))
    plan = Plan(scheme=scheme, code_bits=code_bits, group_size=group_size, word_bits=wb, m=m, k=k, n=n,
                blocks=blocks, has_zeros=zeros is not None, has_ids=expert_ids is not None,
                cdt=jnp.dtype(x.dtype), interpret=interpret, xprep=interpret or xprep)
    if plan.tiled:
        packed = packed.reshape(packed.shape[0], *((3,) if code_bits == 3 else ()), plan.n_kt, blocks.bkr, n)
    args = ((expert_ids.astype(jnp.int32),) if expert_ids is not None else ()) + \
        (_residue_split(x, plan) if plan.xprep else x, packed, scales) + ((zeros,) if zeros is not None else ())
    out_dt = plan.cdt if blocks.splits == 1 else jnp.float32
    out_shape = jax.ShapeDtypeStruct(((blocks.splits,) if blocks.splits > 1 else ()) + (a, m, n), out_dt)
    kernel = functools.partial(_fma_kernel if blocks.mode == "fma" else _dot_kernel, plan=plan)
    name = f"qmm_{blocks.mode}_{scheme}{code_bits}_{'channel' if group_size is None else f'g{group_size}'}_w{wb}"
    return KernelCall(kernel, args, out_shape, (-(-n // blocks.bn), blocks.splits * plan.n_mb, a), name, plan)


@functools.partial(jax.jit, static_argnames=("k", "code_bits", "scheme", "group_size", "blocks", "interpret",
                                             "xprep"))
def qmm(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array | None, *, k: int, code_bits: int,
        scheme: str, group_size: int | None, expert_ids: jax.Array | None = None, blocks: Blocks | None = None,
        interpret: bool = False, xprep: bool = False) -> jax.Array:
    """``x [A, M, K] @ dequant(packed [E, R, N]) -> [A, M, N]`` in ``x.dtype`` (jitted).

    ``packed`` uint8 (stored layout) or uint32 (word layout, :func:`pack_words`). Without ``expert_ids`` slot
    ``a`` uses expert ``a`` (A = E); with ``expert_ids [A]`` (int32 in ``[0, E)``) slot ``a`` uses expert
    ``expert_ids[a]``. ONE launch on the GPU (plus a small XLA sum when split-K is planned). ``xprep=True``
    makes XLA build the residue-split activation instead of strided in-kernel loads (always so in interpret
    mode). ``blocks`` overrides :func:`plan_blocks` (benchmark sweeps).
    """
    return qmm_call(x, packed, scales, zeros, expert_ids, k=k, code_bits=code_bits, scheme=scheme,
                    group_size=group_size, blocks=blocks, interpret=interpret, xprep=xprep).launch(interpret=interpret)


def qmm_reference(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array | None, *, k: int,
                  code_bits: int, scheme: str, group_size: int | None,
                  expert_ids: jax.Array | None = None) -> jax.Array:
    """:func:`qmm` in plain ``jax.numpy`` (unpack every code, dequantize with
    :func:`pallas_kernels.codes.dequant_codes`, float32 einsum at HIGHEST precision)."""
    q = unpack_codes(packed, code_bits=code_bits, k=k)
    rep = k // scales.shape[-2]
    s = jnp.repeat(scales, rep, axis=-2)
    z = None if zeros is None else jnp.repeat(zeros, rep, axis=-2)
    w = dequant_codes(q, s, z, scheme=scheme, code_bits=code_bits)
    if expert_ids is not None:
        w = w[expert_ids]
    y = jnp.einsum("amk,akn->amn", x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def quant_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array | None, *, k: int,
                 code_bits: int, scheme: str, group_size: int | None, blocks: Blocks | None = None,
                 interpret: bool = False, xprep: bool = False) -> jax.Array:
    """``x [..., K] @ W [K, N] -> [..., N]`` for one 2-D weight (``packed [R, N]``; leading dims of x flattened)."""
    lead = x.shape[:-1]
    m = math.prod(lead) if lead else 1
    y = qmm(x.reshape(1, m, x.shape[-1]), packed[None], scales[None], None if zeros is None else zeros[None], k=k,
            code_bits=code_bits, scheme=scheme, group_size=group_size, blocks=blocks, interpret=interpret,
            xprep=xprep)
    return y.reshape(*lead, y.shape[-1])
