"""Decode-fused matmul ``y = x @ dequant(decode(W))`` for QMoE's sub-1-bit :class:`Sub1Tensor`.

Pallas (Triton lowering on NVIDIA GPUs, interpret mode on CPU). Port of QMoE's ``Sub1MatVec``
(docs/QMOE.md §2) to the constraints of the Pallas Triton backend (docs/JAX_NOTES.md §4.5: no
scratch memory, no value gathers, power-of-two blocks):

* one program handles ``BR`` output channels ("rows") and all ``M ≤ 64`` tokens of the batch; rows are
  independent thanks to ``row_off``; the grouped variant maps row ``r`` to expert ``r // N``;
* a row is decoded in **chunks of CW codewords**: the chunk's codewords are one coalesced load; each
  codeword's entry is one ref-indexed gather from a global 256 KiB table (served by L1/L2, as the CUDA
  kernel's ``dec`` reads are). The table is a re-encoding of QMoE's ``dec`` (:func:`sparse_dec_table`):
  every dictionary entry has **at most 3 nonzero weights**, so one int32 holds the pair count and the
  position/sign of each nonzero — 4 slots per codeword instead of QMoE's 28 lanes;
* the start of every codeword in the chunk is an exclusive ``cumsum`` of ``2·pair_count`` (no serial
  dependence inside a chunk); each nonzero picks ``w_min``/``w_max`` of its row and multiplies the
  matching ``x`` entries, also a ref-indexed gather (``x`` laid out ``[E, K, M]``); the float weight
  matrix is never materialised.

Operands are raw arrays (the flat codeword stream, global row offsets, per-row ``w_max``/``w_min`` and the
sparse decode table) with the table's slot count ``nz_slots`` static; ``moqe_jax.ops`` adapts a
``Sub1Tensor`` to them and decides which cases run here (at most :data:`MAX_TOKENS` tokens per launch).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import backend

__all__ = ["sub1_matmul_rows", "MAX_TOKENS", "choose_blocks"]

MAX_TOKENS = 64      # larger batches: decode once + dense matmul (XLA) is the better plan
_TILE_ELEMS = 4096   # target elements of the [BR, CW, NZ_SLOTS, Mp] product tile


def _pow2_ceil(v: int) -> int:
    return 1 << max(0, int(v - 1).bit_length())


def choose_blocks(num_rows: int, mp: int, k: int, nz_slots: int) -> tuple[int, int, int]:
    """(rows per program BR, codewords per chunk CW, num_warps) for ``mp`` padded tokens, row length ``k``.

    M = 1 with short rows uses the best point of the H100 sweep in benchmarks/results/sub1_kernel.md;
    otherwise CW ≈ half the mean codewords of a row and BR fills a ~4096-element tile.
    """
    if mp == 1 and k <= 1024:
        return 8, 8, 2
    cw = max(2, min(32, _pow2_ceil(max(1, k // 48))))
    cw = max(2, min(cw, _TILE_ELEMS // (nz_slots * mp)))
    br = max(1, min(64, _TILE_ELEMS // (nz_slots * mp * cw)))
    while br > 1 and num_rows // br < 1024:  # keep several programs per SM on big GPUs
        br //= 2
    return br, cw, int(min(8, max(1, br * cw * nz_slots * mp // 512)))


def _kernel(ids_ref: Any, row_off_ref: Any, stream_ref: Any, sdec_ref: Any, smax_ref: Any, smin_ref: Any,
            x_ref: Any, o_ref: Any, *, br: int, cw: int, mp: int, n: int, k: int, a: int, total: int,
            nz_slots: int, prefetch: bool = False) -> None:
    i = backend.pl.program_id(0)
    rows = i * br + jnp.arange(br, dtype=jnp.int32)                 # launch rows (slot-major)
    in_range = rows < a * n
    slot = jnp.minimum(rows // n, a - 1)                             # which x block / active expert
    grow = ids_ref[slot] * n + rows % n                              # row of the Sub1Tensor
    lo = row_off_ref[grow]
    lens = jnp.where(in_range, row_off_ref[grow + 1] - lo, 0)        # padded launch rows are empty
    smax = smax_ref[grow].astype(jnp.float32)
    smin = smin_ref[grow].astype(jnp.float32)
    j = jnp.arange(cw, dtype=jnp.int32)
    shift = 4 + 7 * jnp.arange(nz_slots, dtype=jnp.int32)
    tok = jnp.arange(mp, dtype=jnp.int32)
    xrow = slot * k  # [BR]
    nchunks = (jnp.max(lens) + (cw - 1)) // cw

    def load(t):
        idx = t * cw + j[None, :]                                    # [BR, CW]
        code = stream_ref[jnp.minimum(lo[:, None] + idx, total - 1)].astype(jnp.int32)
        return jnp.where(idx < lens[:, None], sdec_ref[code], 0)    # invalid slots: 0 pairs, no nonzeros

    def chunk(word, acc, pos):
        step = 2 * (word & 15)
        start = pos[:, None] + jnp.cumsum(step, axis=1) - step      # exclusive prefix sum
        f = (word[:, :, None] >> shift[None, None, :]) & 127         # [BR, CW, NZ]
        present = f >= 64
        val = jnp.where((f & 32) != 0, smax[:, None, None], smin[:, None, None])
        kk = jnp.minimum(start[:, :, None] + (f & 31), k - 1)
        flat = (xrow[:, None, None] + kk) * mp
        xg = x_ref[flat[..., None] + tok[None, None, None, :]].astype(jnp.float32)  # [BR, CW, NZ, Mp]
        prod = jnp.where(present[..., None], val[..., None] * xg, 0.0)
        return acc + jnp.sum(jnp.sum(prod, axis=2), axis=1), pos + jnp.sum(step, axis=1)

    acc0 = jnp.zeros((br, mp), jnp.float32)
    pos0 = jnp.zeros((br,), jnp.int32)
    if prefetch:  # software pipelining: chunk t+1's stream/table loads are issued before chunk t's compute
        def body(t, carry):
            acc, pos, word = carry
            nxt = load(t + 1)
            acc, pos = chunk(word, acc, pos)
            return acc, pos, nxt

        acc, _, _ = jax.lax.fori_loop(0, nchunks, body, (acc0, pos0, load(0)))
    else:
        def body(t, carry):
            return chunk(load(t), *carry)

        acc, _ = jax.lax.fori_loop(0, nchunks, body, (acc0, pos0))
    o_ref[...] = acc


def sub1_matmul_rows(xt: jax.Array, stream: jax.Array, row_off: jax.Array, w_max: jax.Array, w_min: jax.Array,
                     dec_table: jax.Array, *, n: int, nz_slots: int, expert_ids: Any = None, interpret: bool = False,
                     blocks: tuple[int, int] | None = None, num_warps: int | None = None, prefetch: bool = False,
                     num_stages: int = 1) -> jax.Array:
    """Core launch: ``xt [A, K, M]`` -> ``y [A·N, M]`` float32.

    ``stream`` uint16 ``[T]`` holds the codewords of every row (row ``r`` = ``stream[row_off[r]:row_off[r+1]]``),
    ``w_max``/``w_min`` ``[R]`` the row's two nonzero levels, ``dec_table`` int32 the sparse decode table
    (pair count in bits 0–3, ``nz_slots`` 7-bit nonzero slots above). Launch row ``s·N + n`` is output
    channel ``n`` of expert ``expert_ids[s]`` (default ``arange(A)``; rows of expert ``e`` are
    ``e·N … e·N + N − 1``) dotted with ``xt[s]``: only the listed experts are decoded.
    ``blocks``/``num_warps``/``prefetch``/``num_stages`` override the tuned defaults (benchmark sweeps).
    """
    a, k, m = xt.shape
    ids = jnp.arange(a, dtype=jnp.int32) if expert_ids is None else jnp.asarray(expert_ids, jnp.int32).reshape(a)
    mp = _pow2_ceil(m)
    if mp != m:
        xt = jnp.pad(xt, ((0, 0), (0, 0), (0, mp - m)))
    r = a * n
    br, cw, warps = choose_blocks(r, mp, k, nz_slots)
    if blocks is not None:
        br, cw = blocks
        warps = int(min(8, max(1, br * cw * nz_slots * mp // 512)))
    warps = num_warps or warps
    rp = -(-r // br) * br
    stream = jnp.asarray(stream)
    kern = functools.partial(_kernel, br=br, cw=cw, mp=mp, n=n, k=k, a=a, total=int(stream.shape[0]),
                             nz_slots=nz_slots, prefetch=prefetch)
    out = backend.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((rp, mp), jnp.float32), grid=(rp // br,),
                              interpret=interpret, num_warps=warps, num_stages=num_stages, name="sub1_matmul",
                              out_specs=backend.pl.BlockSpec((br, mp), lambda i: (i, 0)))(
        ids, jnp.asarray(row_off, jnp.int32), stream, jnp.asarray(dec_table),
        jnp.asarray(w_max).reshape(-1), jnp.asarray(w_min).reshape(-1), xt.reshape(-1))
    return out[:r, :m]
