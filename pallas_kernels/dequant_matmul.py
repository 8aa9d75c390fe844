"""Fused dequantize-matmul Pallas kernel: ``y = x @ dequant(W)`` reading the packed codes directly.

MoQE (Kim et al. 2023, §3/§5: weight-only int8/4/3/2 experts, decode is memory-bound) and QMoE
(Frantar & Alistarh 2023, §3.2: 2-bit / ternary experts). The float weight is never written to HBM: each
program loads a ``[BKr, BN]`` tile of ``packed`` (docs/FORMATS.md §1), widens each byte once to uint32 and
turns the codes of one residue ``j`` at a time into floats with :func:`pallas_kernels.codes.code_values`
(magic-number floats, codes masked in place, no int→float convert; checked code by code against
``dequant_codes``, the one definition of a code's value), accumulates ``x_j · v_j`` in float32 and applies
the scale after the K reduction (channel-wise: once per output; per group: once per K tile).

Operands are raw arrays (``packed`` uint8 ``[E, R, N]``, ``scales``/``zeros`` float32 ``[E, G, N]``) and the
layout is static Python values: ``k``, ``code_bits``, ``scheme`` (``"linear"``/``"log"``/``"ternary"``) and
``group_size`` (None = one scale row per output channel). ``moqe_jax.ops`` adapts packed weight types to them.
The design history (v1 → v3) is in benchmarks/results/KERNEL_NOTES.md.

Residue split (no in-kernel interleave): with ``p`` codes per packed row (p = 8/b; 3-bit: p = 8, one bit
per plane), packed row ``i`` residue ``j`` holds K-row ``k = i·p + j``, so ``x @ W = Σ_j x[:, j::p] @ W_j``
where ``W_j`` are the residue-``j`` codes of all packed rows. ``x[:, j::p]`` is read in-kernel with strided
loads (interpret mode: a residue-split copy made by XLA).

One kernel serves dense and grouped (per-expert) matmuls: operands carry a leading expert axis ``E``
(``E = 1`` for a 2-D weight) and the grid is ``(N blocks, K splits × M blocks, E)``. Split-K programs write
float32 partials that are summed by XLA; with one split the output is written directly.

Triton-lowering constraints respected (docs/JAX_NOTES.md §4.5): power-of-two blocks, every dot dim ≥ 16
(M is padded to ≥ 16), same-dtype dot operands, no value gathers (tiles never straddle a scale group, so
one ``[BN]`` scale row per tile), masked loads/stores for ragged K (packed rows) and N.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import backend
from pallas_kernels.codes import check_format, code_consts, code_values, codes_per_row, value_shift

__all__ = ["Blocks", "plan_blocks", "unsupported_reason", "qmm", "quant_matmul"]

# Programs we aim to launch so that every SM has ~2 resident (H100: 132 SMs). Split-K supplies the rest.
_TARGET_PROGRAMS = 264
_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _pow2_ceil(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _pow2_divisor(v: int) -> int:
    return v & -v


@dataclass(frozen=True)
class Blocks:
    """Tiling of one launch. ``bkr`` counts packed (plane) rows, i.e. ``bkr·p`` K rows.

    ``mode="dot"``: ``[bm, bkr] @ [bkr, bn]`` tensor-core dots (bm, bn, bkr powers of two ≥ 16).
    ``mode="fma"`` (GEMV, M ≤ 2): per activation row a ``[bkr, bn]`` float32 multiply-accumulate in registers,
    reduced over K once at the end — no dot, no operand layout conversion; ``bm`` is then M itself.
    """

    bm: int
    bn: int
    bkr: int
    splits: int
    num_warps: int = 4
    num_stages: int = 3
    mode: str = "dot"


def _max_bkr(code_bits: int, group_size: int | None) -> int:
    """Largest tile height (packed rows) that keeps a tile inside one scale group."""
    if group_size is None:
        return 1 << 30
    return _pow2_divisor(group_size) // codes_per_row(code_bits)


def unsupported_reason(code_bits: int, group_size: int | None, x_dtype: Any) -> str | None:
    """Why the kernel cannot run this case (None = supported). The caller falls back to XLA."""
    if jnp.dtype(x_dtype) not in _FLOAT_DTYPES:
        return f"activation dtype {jnp.dtype(x_dtype)} (needs bf16/f16/f32)"
    if _max_bkr(code_bits, group_size) < 16:
        return (f"group size {group_size} too small for {code_bits}-bit codes "
                f"(a tile of ≥16 packed rows must lie in one group)")
    return None


FMA_MAX_M = 2  # GEMV form up to this many rows; more rows use the tensor-core dot (M padded to 16 by masks)
_FMA_ACC_BUDGET = 4096  # m·bkr·bn f32 accumulators per program (= 32 registers/thread at 4 warps)


def plan_blocks(m: int, k: int, n: int, e: int, *, code_bits: int, group_size: int | None) -> Blocks:
    """Block-size heuristic (documented table; H100 measurements in benchmarks/results/KERNEL_NOTES.md).

    ====================  =========================================================
    mode                  ``fma`` (GEMV) for M ≤ 2, else ``dot``
    BM                    fma: M; dot: next pow2 ≥ M, at least 16 (Triton dot), ≤ 64
    BN                    fma: largest of 128/64/32 giving ≥ 264 programs, else 32, and
                          M·BKr·BN ≤ 4096 accumulators (BN shrinks first, then BKr);
                          dot: 128, 64 when M > 16, ≥ 32 and ≤ next pow2 ≥ N (split-K
                          rather than a smaller BN)
    BKr (packed rows)     128 (int8 and 3-bit planes: 64), ≤ next pow2 of the packed
                          height, ≥ 16, ≤ the group's power-of-two part / p
    splits (split-K)      only when the N×M×E grid has < 132 programs (one extra XLA
                          reduction launch), up to ~264 programs
    warps / stages        fma 4 / 4; dot 4 / 3, 8 warps when BM·BN ≥ 64·128
    ====================  =========================================================
    """
    p = codes_per_row(code_bits)
    rv = -(-k // 8) * 8 // p
    bkr = {8: 64, 3: 64}.get(code_bits, 128)
    bkr = max(16, min(bkr, _pow2_ceil(rv), _max_bkr(code_bits, group_size)))
    n_kt = -(-rv // bkr)
    if m <= FMA_MAX_M:
        # register budget: the m accumulators [bkr, bn] f32 hold ≤ 32 values per thread (4 warps); more spills
        # (measured in benchmarks/results/KERNEL_NOTES.md, v2)
        bn = max(32, min(128, _pow2_ceil(n)))
        while bn > 32 and -(-n // bn) * e < _TARGET_PROGRAMS:
            bn //= 2
        while m * bkr * bn > _FMA_ACC_BUDGET and bn > 32:
            bn //= 2
        while m * bkr * bn > _FMA_ACC_BUDGET and bkr > 16:
            bkr //= 2
        n_kt = -(-rv // bkr)
        bm, warps, stages, mode = m, 4, 4, "fma"
    else:
        bm = min(64, max(16, _pow2_ceil(m)))
        bn = max(32, min(128, _pow2_ceil(n)))
        if m > 16 and bn > 64:
            bn = 64
        warps = 8 if bm * bn >= 64 * 128 else 4
        stages, mode = 3, "dot"
    n_prog = -(-n // bn) * -(-m // bm) * e
    splits = 1
    if n_prog < 132:
        splits = max(1, min(n_kt, -(-_TARGET_PROGRAMS // n_prog)))
        per = -(-n_kt // splits)
        splits = -(-n_kt // per)
    return Blocks(bm=bm, bn=bn, bkr=bkr, splits=splits, num_warps=warps, num_stages=stages, mode=mode)


def _and(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    """Conjunction of optional (broadcastable) masks; None = no mask."""
    return b if a is None else a if b is None else a & b


def _make_kernel(*, scheme: str, code_bits: int, group_size: int | None, p: int, rv: int, m: int, k: int, n: int,
                 blocks: Blocks, n_kt: int, per_split: int, n_mblocks: int, has_zeros: bool, has_ids: bool,
                 cdt: jnp.dtype, interpret: bool, xprep: bool) -> Callable[..., None]:
    b = code_bits
    fmt = {"scheme": scheme, "code_bits": code_bits}
    code_mask = (1 << b) - 1
    channel = group_size is None
    gs = group_size or k
    post_scale = scheme != "ternary"  # linear / log: y = s · Σ x·v (ternary values carry their scales)
    in_place = value_shift(scheme, code_bits)
    shifts = [j * b if in_place else 0 for j in range(p)]
    # linear in-place codes are worth 2^shift·(c − z): the residue's activation (fma) or dot (dot mode) is
    # scaled back by the exact power of two 2^−shift (per K element or per output, never per weight)
    xscale = [2.0 ** -sh if (in_place and scheme != "ternary" and sh) else None for sh in shifts]
    bm, bn, bkr, fma = blocks.bm, blocks.bn, blocks.bkr, blocks.mode == "fma"
    split_out = blocks.splits > 1
    # static raggedness: full tiles need no masks (a mask costs a compare/and per loaded element)
    ragged_r = n_kt * bkr != rv  # last K tile runs past the packed rows
    # full K tiles: packed arrives as [E, (3,) n_kt, bkr, N] (a free XLA reshape) and tile t is a scalar index, so the
    # per-element pointer offsets are loop-invariant (the lowering multiplies every index by its stride per element)
    tiled = not ragged_r
    ragged_k = n_kt * bkr * p != k  # ... or past K in the activation
    ragged_n = n % bn != 0
    ragged_m = m % bm != 0
    pl = backend.pl
    plgpu = backend.plgpu

    def dot(a, w):
        if interpret:
            return jnp.dot(a, w, preferred_element_type=jnp.float32)
        return plgpu.dot(a, w, allow_tf32=False if cdt == jnp.float32 else None)

    def load(ref, mask=None, other=None):
        # plgpu.load/store also run in interpret mode, where out-of-bounds slices are padded, not shifted
        return plgpu.load(ref, mask=mask, other=other)

    def load_x(x_ref, a, j, rows, r0):
        """Residue-j activation tile: ``x[a, rows, (r0 + i)·p + j]`` for i < bkr (zero outside M, K).

        GPU: a strided load straight from ``x [A, M, K]``. Interpret mode has no strided loads, so there
        (and with ``xprep=True``) ``x_ref`` is the residue-split copy ``[A, p, M_pad, R_pad]`` made
        by XLA (same values)."""
        kidx = (r0 + jnp.arange(bkr)) * p + j
        if isinstance(rows, int):  # one row (fma)
            if xprep:
                return load(x_ref.at[a, jnp.int32(j), jnp.int32(rows), pl.ds(r0, bkr)])
            src = x_ref.at[a, jnp.int32(rows), pl.ds(r0 * p + j, bkr, stride=p)]
            return load(src, kidx < k, 0.0) if ragged_k else load(src)
        m0 = rows
        if xprep:
            return load(x_ref.at[a, jnp.int32(j), pl.ds(m0, bm), pl.ds(r0, bkr)])
        mask = _and(((m0 + jnp.arange(bm)) < m)[:, None] if ragged_m else None,
                    (kidx < k)[None, :] if ragged_k else None)
        src = x_ref.at[a, pl.ds(m0, bm), pl.ds(r0 * p + j, bkr, stride=p)]
        return load(src) if mask is None else load(src, mask, 0.0)

    def kernel(*refs):
        if has_ids:
            ids_ref, *refs = refs
        x_ref, p_ref, s_ref, *rest = refs
        z_ref = rest[0] if has_zeros else None
        o_ref = rest[-1]
        nb = pl.program_id(0)
        sm = pl.program_id(1)
        a = pl.program_id(2)  # slot of x / out
        e = ids_ref[a] if has_ids else a  # expert of the weight (indexed launch: a scalar load, no gather)
        split = sm // n_mblocks
        m0 = (sm % n_mblocks) * bm
        n0 = nb * bn
        cmask = (n0 + jnp.arange(bn)) < n if ragged_n else None
        t0 = split * per_split
        t1 = jnp.minimum(t0 + per_split, n_kt)
        nsl = pl.ds(n0, bn)

        def group_params(g):
            """``([1, BN] scale, [code_consts per residue])`` of scale group ``g``."""
            s = load(s_ref.at[e, g, nsl], cmask, None if cmask is None else 0.0)[None, :]
            z = load(z_ref.at[e, g, nsl], cmask, None if cmask is None else 0.0)[None, :] if has_zeros else None
            return s, [code_consts(s, z, **fmt, shift=shifts[j]) for j in range(p)]

        s_ch, consts_ch = group_params(jnp.int32(0)) if channel else (None, None)

        def tile_values(t):
            """``(residue, [bkr, bn] float32 code values)`` of K tile ``t`` (packed rows ``r0 … r0+bkr``) and
            the tile's scale (None when it is applied once after the loop or carried by the values)."""
            r0 = t * bkr
            mask2 = _and(((r0 + jnp.arange(bkr)) < rv)[:, None] if ragged_r else None,
                         None if cmask is None else cmask[None, :])
            zero8 = None if mask2 is None else jnp.uint8(0)
            if channel:
                s, consts = s_ch, consts_ch
            else:
                s, consts = group_params((r0 * p) // gs)
            if b == 3:
                planes = [load(p_ref.at[e, jnp.int32(c), t, pl.ds(0, bkr), nsl] if tiled else
                               p_ref.at[e, pl.ds(c * rv + r0, bkr), nsl], mask2, zero8).astype(jnp.uint32)
                          for c in range(3)]
            else:  # widened once per byte, not once per code
                pk = load(p_ref.at[e, t, pl.ds(0, bkr), nsl] if tiled else p_ref.at[e, pl.ds(r0, bkr), nsl],
                          mask2, zero8).astype(jnp.uint32)
            one = jnp.uint32(1)
            vals = []
            for j in range(p):
                if b == 3:
                    sh = jnp.uint32(j)
                    q = ((planes[0] >> sh) & one) | (((planes[1] >> sh) & one) << one) | \
                        (((planes[2] >> sh) & one) << jnp.uint32(2))
                elif b == 8:
                    q = pk
                elif in_place:  # code j masked in place: 2^(j·b)·c, one LOP3 with the OR of code_values
                    q = pk & jnp.uint32(code_mask << (j * b))
                else:
                    q = (pk >> jnp.uint32(j * b)) & jnp.uint32(code_mask)
                vals.append((j, code_values(q, consts[j], **fmt, shift=shifts[j])))
            return vals, (s if post_scale and not channel else None)

        if fma:
            def body(t, accs):
                r0 = t * bkr
                vals, s_t = tile_values(t)
                new = []
                for i in range(bm):
                    part = accs[i] if s_t is None else None
                    for j, v in vals:
                        xv = load_x(x_ref, a, j, i, r0).astype(jnp.float32)
                        xv = (xv if xscale[j] is None else xv * xscale[j])[:, None]
                        part = xv * v if part is None else part + xv * v
                    new.append(part if s_t is None else accs[i] + part * s_t)
                return tuple(new)

            accs = jax.lax.fori_loop(t0, t1, body, tuple(jnp.zeros((bkr, bn), jnp.float32) for _ in range(bm)))
            for i in range(bm):
                row = jnp.sum(accs[i], axis=0)
                if post_scale and channel:
                    row = row * s_ch[0]
                idx = (split, a, i) if split_out else (a, i)
                plgpu.store(o_ref.at[(*[jnp.int32(v) if isinstance(v, int) else v for v in idx], nsl)],
                            row.astype(o_ref.dtype), mask=cmask)
            return

        def body(t, acc):
            r0 = t * bkr
            vals, s_t = tile_values(t)
            part = acc if s_t is None else None
            for j, v in vals:
                d = dot(load_x(x_ref, a, j, m0, r0), v.astype(cdt))
                d = d if xscale[j] is None else d * xscale[j]
                part = d if part is None else part + d
            return part if s_t is None else acc + part * s_t

        acc = jax.lax.fori_loop(t0, t1, body, jnp.zeros((bm, bn), jnp.float32))
        if post_scale and channel:
            acc = acc * s_ch
        rows = pl.ds(m0, bm)
        out = o_ref.at[split, a, rows, nsl] if split_out else o_ref.at[a, rows, nsl]
        omask = _and(((m0 + jnp.arange(bm)) < m)[:, None] if ragged_m else None,
                     None if cmask is None else cmask[None, :])
        plgpu.store(out, acc.astype(o_ref.dtype), mask=omask)

    return kernel


@functools.partial(jax.jit, static_argnames=("k", "code_bits", "scheme", "group_size", "blocks", "interpret",
                                             "xprep", "poison"))
def _qmm(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array | None,
         expert_ids: jax.Array | None, *, k: int, code_bits: int, scheme: str, group_size: int | None,
         blocks: Blocks | None, interpret: bool, xprep: bool, poison: bool) -> jax.Array:
    """:func:`qmm`; ``poison=True`` (kernel tests on the GPU) pre-fills the output with NaN and aliases it into
    the kernel, so any element the kernel fails to write shows up as NaN (interpret mode does this itself)."""
    check_format(scheme, code_bits)
    e, m, kx = x.shape
    if kx != k:
        raise ValueError(f"x has K={kx}, weight has K={k}")
    n = packed.shape[-1]
    p = codes_per_row(code_bits)
    rv = -(-k // 8) * 8 // p
    blocks = blocks or plan_blocks(m, k, n, e, code_bits=code_bits, group_size=group_size)
    if blocks.mode == "fma" and blocks.bm != m:
        blocks = Blocks(m, blocks.bn, blocks.bkr, blocks.splits, blocks.num_warps, blocks.num_stages, "fma")
    bm, bn, bkr = blocks.bm, blocks.bn, blocks.bkr
    n_kt = -(-rv // bkr)
    per = -(-n_kt // blocks.splits)
    splits = -(-n_kt // per)
    if splits != blocks.splits:
        blocks = Blocks(bm, bn, bkr, splits, blocks.num_warps, blocks.num_stages, blocks.mode)
    n_mb = -(-m // bm)
    cdt = x.dtype
    xprep = interpret or xprep
    if xprep:  # residue split of the activation: xr[a, j, m, i] = x[a, m, i·p + j] (zero padded)
        rt = n_kt * bkr
        xp = jnp.pad(x, ((0, 0), (0, n_mb * bm - m), (0, rt * p - k)))
        xin = xp.reshape(e, n_mb * bm, rt, p).transpose(0, 3, 1, 2)
    else:
        xin = x
    has_zeros = zeros is not None
    has_ids = expert_ids is not None
    if not has_ids and packed.shape[0] != e:
        raise ValueError(f"x has {e} expert slots, weight has {packed.shape[0]} experts")
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((e, m, n), cdt)
    else:
        out_shape = jax.ShapeDtypeStruct((splits, e, m, n), jnp.float32)
    kernel = _make_kernel(scheme=scheme, code_bits=code_bits, group_size=group_size, p=p, rv=rv, m=m, k=k, n=n,
                          blocks=blocks, n_kt=n_kt, per_split=per, n_mblocks=n_mb, has_zeros=has_zeros,
                          has_ids=has_ids, cdt=jnp.dtype(cdt), interpret=interpret, xprep=xprep)
    if n_kt * bkr == rv:  # see _make_kernel: tiled packed operand
        pshape = (packed.shape[0], *((3,) if code_bits == 3 else ()), n_kt, bkr, n)
        packed = packed.reshape(pshape)
    args = ([expert_ids.astype(jnp.int32)] if expert_ids is not None else []) + [xin, packed, scales] + \
        ([zeros] if zeros is not None else [])
    kwargs = {}
    if poison:
        args.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        kwargs["input_output_aliases"] = {len(args) - 1: 0}

        inner = kernel

        def kernel(*refs: Any) -> None:  # the aliased poison input is the same buffer as the output
            inner(*refs[:-2], refs[-1])

    grid = (-(-n // bn), splits * n_mb, e)
    gname = "channel" if group_size is None else f"g{group_size}"
    call = backend.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret,
                               num_warps=blocks.num_warps, num_stages=blocks.num_stages,
                               name=f"qmm_{blocks.mode}_{scheme}{code_bits}_{gname}", **kwargs)
    y = call(*args)
    return y if splits == 1 else jnp.sum(y, axis=0).astype(cdt)


def qmm(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array | None, *, k: int, code_bits: int,
        scheme: str, group_size: int | None, expert_ids: jax.Array | None = None, blocks: Blocks | None = None,
        interpret: bool = False, xprep: bool = False) -> jax.Array:
    """Core launch: ``x [A, M, K] @ dequant(packed [E, R, N]) -> [A, M, N]`` in ``x.dtype`` (jitted).

    Without ``expert_ids`` slot ``a`` uses expert ``a`` (A = E). With ``expert_ids [A]`` (int32, values in
    ``[0, E)``) slot ``a`` uses expert ``expert_ids[a]``: the decode-time launch over active experts only.
    On the GPU this is ONE launch (plus an XLA sum when split-K is planned). ``xprep=True`` makes XLA build
    the residue-split activation instead of strided in-kernel loads (always so in interpret mode).
    """
    return _qmm(x, packed, scales, zeros, expert_ids, k=k, code_bits=code_bits, scheme=scheme,
                group_size=group_size, blocks=blocks, interpret=interpret, xprep=xprep, poison=False)


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
