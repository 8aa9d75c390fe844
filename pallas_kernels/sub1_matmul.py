"""Decode-fused matmul ``y = x @ dequant(decode(W))`` for QMoE's sub-1-bit :class:`Sub1Tensor`.

Pallas (Triton lowering on NVIDIA GPUs, interpret mode on CPU). Port of QMoE's ``Sub1MatVec``
(docs/QMOE.md §2) to the constraints of the Pallas Triton backend (docs/JAX_NOTES.md §4.5: no
scratch memory, no value gathers, power-of-two blocks). Shaped like jax's Pallas ops (docs/KERNELS.md):
module-level kernels bound to a frozen :class:`Sub1Plan`, raw-array operands, :func:`sub1_matmul_rows_reference`
next to the op.

* one program handles ``BR`` output channels ("rows") and all tokens of the batch; rows are independent
  thanks to ``row_off``; launch row ``s·N + n`` is channel ``n`` of expert ``expert_ids[s]``;
* a row is decoded in **chunks of CW codewords**: the chunk's codewords are one coalesced load; each
  codeword's entry is one ref-indexed gather from a global 256 KiB table (served by L1/L2; the Triton lowering
  has no shared-memory scratch). The table is a re-encoding of QMoE's ``dec`` (docs/FORMATS.md §2, "kernel-side
  table"): every dictionary entry has **at most 3 nonzero weights**, so one int32 holds the pair count and the
  position/sign of each nonzero;
* the start of every codeword in the chunk is an exclusive ``cumsum`` of ``2·pair_count`` (no serial
  dependence inside a chunk); each nonzero picks ``w_min``/``w_max`` of its row and multiplies the matching
  ``x`` entries (ref-indexed gathers, ``x`` laid out ``[A, K, M]``); the float weight is never materialised.

Two forms (:func:`plan_sub1`):

* ``"gemv"`` (M ≤ :data:`GEMV_MAX_TOKENS`): 2-D ``[BR, CW]`` tiles only — the three nonzero slots and the M
  tokens are unrolled in Python, no padding of M, the table's always-empty 4th slot is never read; wider row
  blocks (up to 64 rows per program);
* ``"tile"`` (M ≤ :data:`MAX_TOKENS`): one ``[BR, CW, NZ_SLOTS, Mp]`` product tile per chunk (M padded to a
  power of two).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import backend

__all__ = ["sub1_matmul_rows", "sub1_matmul_rows_reference", "MAX_TOKENS", "GEMV_TOKENS", "Sub1Plan", "plan_sub1",
           "choose_blocks"]

MAX_TOKENS = 64      # larger batches: decode once + dense matmul (XLA) is the better plan
GEMV_TOKENS = 4      # the "gemv" form up to this many tokens
_USED_SLOTS = 3      # nonzeros per dictionary entry (docs/FORMATS.md §2): table slot 3 is always empty
_TILE_ELEMS = 4096   # target elements of the [BR, CW, NZ_SLOTS, Mp] product tile
_GEMV_ELEMS = 1024   # target elements of a [BR, CW] gemv tile
_MIN_PROGRAMS = 1024  # keep several programs per SM on big GPUs


def _pow2_ceil(v: int) -> int:
    return 1 << max(0, int(v - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Sub1Plan:
    """Static description of one launch (bound into the kernel with ``functools.partial``)."""

    form: str        # "gemv" | "tile"
    br: int          # rows per program
    cw: int          # codewords per chunk
    m: int           # tokens (gemv: unpadded; tile: padded to mp)
    mp: int          # tokens as laid out in x / the output block
    n: int           # channels per expert
    k: int           # row length (K)
    a: int           # expert slots
    total: int       # codewords in the stream
    nz_slots: int    # 7-bit slots per table word
    prefetch: bool = False
    num_warps: int = 4
    num_stages: int = 1


def choose_blocks(num_rows: int, mp: int, k: int, nz_slots: int) -> tuple[int, int, int]:
    """(rows per program BR, codewords per chunk CW, num_warps) of the ``"tile"`` form for ``mp`` padded tokens.

    M = 1 with short rows uses the best point of the H100 sweep in benchmarks/results/sub1_kernel.md;
    otherwise CW ≈ half the mean codewords of a row and BR fills a ~4096-element tile.
    """
    if mp == 1 and k <= 1024:
        return 8, 8, 2
    cw = max(2, min(32, _pow2_ceil(max(1, k // 48))))
    cw = max(2, min(cw, _TILE_ELEMS // (nz_slots * mp)))
    br = max(1, min(64, _TILE_ELEMS // (nz_slots * mp * cw)))
    while br > 1 and num_rows // br < _MIN_PROGRAMS:
        br //= 2
    return br, cw, int(min(8, max(1, br * cw * nz_slots * mp // 512)))


def _gemv_blocks(num_rows: int, m: int, k: int) -> tuple[int, int, int]:
    """(BR, CW, num_warps) of the ``"gemv"`` form: CW ≈ a quarter of a row's mean codewords (4 … 16), BR up to
    64 rows with ``BR·CW`` ≤ 1024 and ``M·BR·CW`` ≤ 2048 products per slot, while the launch keeps ≥ 1024
    programs (BR ≥ 4)."""
    cw = max(4, min(16, _pow2_ceil(max(1, k // 96))))
    br = 64
    while br > 4 and (br * cw > _GEMV_ELEMS or m * br * cw > 2 * _GEMV_ELEMS):
        br //= 2
    while br > 4 and num_rows // br < _MIN_PROGRAMS:
        br //= 2
    return br, cw, int(min(8, max(1, br * cw // 256)))


def plan_sub1(num_rows: int, m: int, k: int, a: int, n: int, total: int, nz_slots: int, *,
              blocks: tuple[int, int] | None = None, num_warps: int | None = None, prefetch: bool = False,
              num_stages: int = 1, form: str | None = None) -> Sub1Plan:
    """The launch plan; ``blocks``/``num_warps``/``prefetch``/``num_stages``/``form`` override the defaults."""
    form = form or ("gemv" if m <= GEMV_TOKENS else "tile")
    if form == "gemv":
        br, cw, warps = _gemv_blocks(num_rows, m, k)
        mp = m
    else:
        mp = _pow2_ceil(m)
        br, cw, warps = choose_blocks(num_rows, mp, k, nz_slots)
    if blocks is not None:
        br, cw = blocks
        warps = int(min(8, max(1, br * cw * (1 if form == "gemv" else nz_slots * mp) // 512)))
    return Sub1Plan(form=form, br=br, cw=cw, m=m, mp=mp, n=n, k=k, a=a, total=total, nz_slots=nz_slots,
                    prefetch=prefetch, num_warps=num_warps or warps, num_stages=num_stages)


# ---------------------------------------------------------------------------------------------- kernels
def _rows(plan: Sub1Plan, ids_ref: Any, row_off_ref: Any, smax_ref: Any, smin_ref: Any) -> dict[str, Any]:
    """Per-row values of this program: offsets, lengths (0 for padded launch rows), levels, x row base."""
    i = backend.pl.program_id(0)
    rows = i * plan.br + jnp.arange(plan.br, dtype=jnp.int32)       # launch rows (slot-major)
    in_range = rows < plan.a * plan.n
    slot = jnp.minimum(rows // plan.n, plan.a - 1)                   # which x block / active expert
    grow = ids_ref[slot] * plan.n + rows % plan.n                    # row of the Sub1Tensor
    lo = row_off_ref[grow]
    lens = jnp.where(in_range, row_off_ref[grow + 1] - lo, 0)
    return {"lo": lo, "lens": lens, "smax": smax_ref[grow].astype(jnp.float32),
            "smin": smin_ref[grow].astype(jnp.float32), "xrow": slot * plan.k,
            "nchunks": (jnp.max(lens) + (plan.cw - 1)) // plan.cw}


def _chunk_words(plan: Sub1Plan, stream_ref: Any, sdec_ref: Any, r: dict[str, Any], t: Any) -> jax.Array:
    """Table words ``[BR, CW]`` of chunk ``t`` (0 = no pairs, no nonzeros, past a row's end)."""
    idx = t * plan.cw + jnp.arange(plan.cw, dtype=jnp.int32)[None, :]
    code = stream_ref[jnp.minimum(r["lo"][:, None] + idx, plan.total - 1)].astype(jnp.int32)
    return jnp.where(idx < r["lens"][:, None], sdec_ref[code], 0)


def _starts(word: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exclusive prefix sum of the chunk's weight counts: each codeword's first K position, and the new pos."""
    step = 2 * (word & 15)
    return pos[:, None] + jnp.cumsum(step, axis=1) - step, pos + jnp.sum(step, axis=1)


def _gemv_chunk(plan: Sub1Plan, x_ref: Any, r: dict[str, Any], word: jax.Array, accs: tuple[jax.Array, ...],
                pos: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    start, pos = _starts(word, pos)
    parts: list[Any] = [0.0] * plan.m
    for s in range(_USED_SLOTS):
        f = (word >> (4 + 7 * s)) & 127
        val = jnp.where(f >= 64, jnp.where((f & 32) != 0, r["smax"][:, None], r["smin"][:, None]), 0.0)
        base = (r["xrow"][:, None] + jnp.minimum(start + (f & 31), plan.k - 1)) * plan.m
        for tok in range(plan.m):
            parts[tok] = parts[tok] + val * x_ref[base + tok].astype(jnp.float32)
    return tuple(acc + jnp.sum(part, axis=1) for acc, part in zip(accs, parts, strict=True)), pos


def _tile_chunk(plan: Sub1Plan, x_ref: Any, r: dict[str, Any], word: jax.Array, accs: tuple[jax.Array, ...],
                pos: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    start, pos = _starts(word, pos)
    shift = 4 + 7 * jnp.arange(plan.nz_slots, dtype=jnp.int32)
    f = (word[:, :, None] >> shift[None, None, :]) & 127              # [BR, CW, NZ]
    val = jnp.where((f & 32) != 0, r["smax"][:, None, None], r["smin"][:, None, None])
    flat = (r["xrow"][:, None, None] + jnp.minimum(start[:, :, None] + (f & 31), plan.k - 1)) * plan.mp
    xg = x_ref[flat[..., None] + jnp.arange(plan.mp, dtype=jnp.int32)[None, None, None, :]].astype(jnp.float32)
    prod = jnp.where((f >= 64)[..., None], val[..., None] * xg, 0.0)   # [BR, CW, NZ, Mp]
    return (accs[0] + jnp.sum(jnp.sum(prod, axis=2), axis=1),), pos


def _sub1_kernel(ids_ref: Any, row_off_ref: Any, stream_ref: Any, sdec_ref: Any, smax_ref: Any, smin_ref: Any,
                 x_ref: Any, o_ref: Any, *, plan: Sub1Plan) -> None:
    r = _rows(plan, ids_ref, row_off_ref, smax_ref, smin_ref)
    chunk = functools.partial(_gemv_chunk if plan.form == "gemv" else _tile_chunk, plan, x_ref, r)
    accs0 = tuple(jnp.zeros((plan.br,), jnp.float32) for _ in range(plan.m)) if plan.form == "gemv" else \
        (jnp.zeros((plan.br, plan.mp), jnp.float32),)
    pos0 = jnp.zeros((plan.br,), jnp.int32)
    load = functools.partial(_chunk_words, plan, stream_ref, sdec_ref, r)
    if plan.prefetch:  # software pipelining: chunk t+1's stream/table loads are issued before chunk t's compute
        def body(t: Any, carry: Any) -> Any:
            accs, pos, word = carry
            nxt = load(t + 1)
            return (*chunk(word, accs, pos), nxt)

        accs, _, _ = jax.lax.fori_loop(0, r["nchunks"], body, (accs0, pos0, load(0)))
    else:
        def body(t: Any, carry: Any) -> Any:
            return chunk(load(t), *carry)

        accs, _ = jax.lax.fori_loop(0, r["nchunks"], body, (accs0, pos0))
    if plan.form == "gemv":
        for tok in range(plan.m):
            o_ref[:, tok] = accs[tok]
    else:
        o_ref[...] = accs[0]


# ---------------------------------------------------------------------------------------------- ops
def sub1_matmul_rows(xt: jax.Array, stream: jax.Array, row_off: jax.Array, w_max: jax.Array, w_min: jax.Array,
                     dec_table: jax.Array, *, n: int, nz_slots: int, expert_ids: Any = None, interpret: bool = False,
                     blocks: tuple[int, int] | None = None, num_warps: int | None = None, prefetch: bool = False,
                     num_stages: int = 1, form: str | None = None) -> jax.Array:
    """Core launch: ``xt [A, K, M]`` -> ``y [A·N, M]`` float32.

    ``stream`` uint16 ``[T]`` holds the codewords of every row (row ``r`` = ``stream[row_off[r]:row_off[r+1]]``),
    ``w_max``/``w_min`` ``[R]`` the row's two nonzero levels, ``dec_table`` int32 the sparse decode table
    (pair count in bits 0–3, ``nz_slots`` 7-bit nonzero slots above). Launch row ``s·N + n`` is output
    channel ``n`` of expert ``expert_ids[s]`` (default ``arange(A)``) dotted with ``xt[s]``: only the listed
    experts are decoded. ``blocks``/``num_warps``/``prefetch``/``num_stages``/``form`` override
    :func:`plan_sub1` (benchmark sweeps).
    """
    a, k, m = xt.shape
    ids = jnp.arange(a, dtype=jnp.int32) if expert_ids is None else jnp.asarray(expert_ids, jnp.int32).reshape(a)
    stream = jnp.asarray(stream)
    plan = plan_sub1(a * n, m, k, a, n, int(stream.shape[0]), nz_slots, blocks=blocks, num_warps=num_warps,
                     prefetch=prefetch, num_stages=num_stages, form=form)
    if plan.mp != m:
        xt = jnp.pad(xt, ((0, 0), (0, 0), (0, plan.mp - m)))
    r = a * n
    rp = -(-r // plan.br) * plan.br
    out_cols = _pow2_ceil(plan.mp)  # the output block is a power of two wide (gemv: M = 3 stores 3 of 4 columns)
    out = backend.pallas_call(functools.partial(_sub1_kernel, plan=plan),
                              out_shape=jax.ShapeDtypeStruct((rp, out_cols), jnp.float32), grid=(rp // plan.br,),
                              interpret=interpret, num_warps=plan.num_warps, num_stages=plan.num_stages,
                              name=f"sub1_matmul_{plan.form}",
                              out_specs=backend.pl.BlockSpec((plan.br, out_cols), lambda i: (i, 0)))(
        ids, jnp.asarray(row_off, jnp.int32), stream, jnp.asarray(dec_table),
        jnp.asarray(w_max).reshape(-1), jnp.asarray(w_min).reshape(-1), xt.reshape(-1))
    return out[:r, :m]


def sub1_matmul_rows_reference(xt: jax.Array, stream: jax.Array, row_off: jax.Array, w_max: jax.Array,
                               w_min: jax.Array, dec_table: jax.Array, *, n: int, nz_slots: int,
                               expert_ids: Any = None) -> jax.Array:
    """:func:`sub1_matmul_rows` in plain ``jax.numpy``: every codeword's nonzeros are scattered into the dense
    ``[R, K]`` rows (global exclusive cumsum of ``2·pair_count`` minus the row's start), then one dot."""
    a, k, m = xt.shape
    stream = jnp.asarray(stream).astype(jnp.int32)
    row_off = jnp.asarray(row_off, jnp.int32)
    nrows = row_off.shape[0] - 1
    word = jnp.asarray(dec_table)[stream]
    step = 2 * (word & 15)
    cum = jnp.cumsum(step) - step                                       # global exclusive prefix sum
    row = jnp.searchsorted(row_off, jnp.arange(stream.shape[0], dtype=jnp.int32), side="right") - 1
    start = cum - cum[row_off[row]] if stream.shape[0] else cum
    dense = jnp.zeros((nrows, k + 32), jnp.float32)
    wmax = jnp.asarray(w_max, jnp.float32).reshape(-1)
    wmin = jnp.asarray(w_min, jnp.float32).reshape(-1)
    for s in range(nz_slots):
        f = (word >> (4 + 7 * s)) & 127
        val = jnp.where(f >= 64, jnp.where((f & 32) != 0, wmax[row], wmin[row]), 0.0)
        dense = dense.at[row, start + (f & 31)].add(val)
    ids = jnp.arange(a, dtype=jnp.int32) if expert_ids is None else jnp.asarray(expert_ids, jnp.int32).reshape(a)
    w = dense[:, :k].reshape(-1, n, k)[ids]                             # [A, N, K]
    y = jnp.einsum("ank,akm->anm", w, xt.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y.reshape(a * n, m)
