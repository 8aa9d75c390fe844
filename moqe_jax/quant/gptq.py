"""Batched, jitted, expert-sharded GPTQ (Frantar et al. 2022; QMoE §3, docs/QMOE.md §3.3–3.4, §5).

A faithful port of IST-DASLab/gptq ``GPTQ.fasterquant`` in the batched form of QMoE's
``batch_gptq``, as a pure function of ``(W, H, spec)``:

1. grid from the *original* weights per output channel, via ``moqe_jax.quant.rtn.find_params``;
2. dead inputs (``diag H == 0``), ``dead_inputs``: ``"zero"`` (gptq ``fasterquant``, the default of these
   single-matrix solvers): ``H_ii = 1`` and that input row of W is zeroed; ``"keep"`` (QMoE ``batch_gptq``, the
   default of the model-level QMoE path ``GPTQOptions`` / ``gptq_quantize_model`` / ``moqe compress``): H and W
   untouched, the damping alone makes H invertible and the dead inputs are quantized like the others;
   with a group-wise spec the static per-group grids (``static_groups=True``) are built here, after this step;
   ``static_groups=False``: gptq's default, each group's grid is recomputed from the current (error-updated)
   weights when the column loop reaches the group's first input (as the reference, from W as of the start of
   the 128-input block; no act-order, whose permuted groups a contiguous-group tensor cannot store);
3. optional act-order: permute inputs by descending ``diag H`` (stable), un-permute at the end;
4. relative damping ``H += max(percdamp·mean(diag H), 1e-6)·I`` (QMoE: percdamp 0.1, floor 1e-6);
5. ``H⁻¹ = cholesky_inverse(cholesky(H))`` and ``U = cholesky(H⁻¹, upper=True)``;
6. blocks of 128 inputs: per input quantize, ``err = (w − q)/U_ii``, intra-block update
   ``W[i:] −= U_i,i: ⊗ err``; lazy inter-block update ``W[end:] −= U_block,end:ᵀ · Err``.

Layout: our weights are ``[K, N] = [in, out]``; GPTQ's "rows" (one grid each) are our N output
channels and its column loop runs over our K inputs. The Hessian is ``H = 2·XᵀX`` ``[K, K]``.

Robustness (QMoE §3.3): a NaN/inf Hessian or a failed Cholesky (NaN factor) makes that expert fall
back to ``H = I`` (round-to-nearest on the same grid); both are flagged in :class:`GPTQStats`.
NaN/inf *weights* raise :class:`~moqe_jax.errors.QuantizationError`.

Batching: :func:`gptq_quantize` ``vmap``s the single-expert solver over a group of experts inside
one ``jax.jit``; with a ``mesh`` that has an ``expert`` axis the group is split over devices with
``jax.shard_map`` (E padded to a multiple of the device count with dummy experts H = I, W = 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from moqe_jax.errors import QuantizationError
from moqe_jax.packed.qtensor import QuantizedTensor, dequant_codes, expand_groups
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.rtn import find_params, quantize_codes  # the grid and rounding GPTQ shares with RTN
from moqe_jax.tree import to_host

__all__ = ["GPTQStats", "gptq_quantize", "gptq_solve_one", "layer_error", "rtn_codes", "DAMP_FLOOR"]

DAMP_FLOOR = 1e-6
_HIGHEST = lax.Precision.HIGHEST


def _channel_spec(spec: QuantSpec) -> QuantSpec:
    return spec if spec.granularity == "channel" else dataclasses.replace(spec, granularity="channel")


def _quantize_row(w: jax.Array, s: jax.Array, z: jax.Array | None, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Codes and dequantized values of one GPTQ "column" (one input row ``[N]`` of our W)."""
    cspec = _channel_spec(spec)
    codes = quantize_codes(w[None, :], s[None, :], None if z is None else z[None, :], cspec)[0]
    q = dequant_codes(codes, s, z, spec)
    return codes.astype(jnp.uint8), q


# ---- single expert -------------------------------------------------------------------------------
def _hinv_upper(h: jax.Array, percdamp: float) -> jax.Array:
    """Damped ``U = cholesky(cholesky_inverse(cholesky(H)), upper=True)`` (reference step 5–6)."""
    k = h.shape[-1]
    eye = jnp.eye(k, dtype=jnp.float32)
    damp = jnp.maximum(percdamp * jnp.mean(jnp.diagonal(h)), DAMP_FLOOR)
    h = h + damp * eye
    low = lax.linalg.cholesky(h)
    linv = lax.linalg.triangular_solve(low, eye, left_side=True, lower=True)
    hinv = jnp.matmul(linv.T, linv, precision=_HIGHEST)  # cholesky_inverse: (L Lᵀ)⁻¹ = L⁻ᵀ L⁻¹
    return jnp.triu(lax.linalg.cholesky(hinv).T)


def actorder_perm(h: Any, dead_inputs: str = "zero") -> np.ndarray:
    """Act-order permutation(s) of Hessian(s) ``h [..., K, K]`` on the host: stable argsort of ``−diag H``
    after the non-finite (H → I) and dead-input (``H_ii = 1`` unless ``dead_inputs="keep"``) fixes
    (reference steps 2–4)."""
    h = np.asarray(h, np.float32)
    d = np.diagonal(h, axis1=-2, axis2=-1).copy()
    bad = ~np.isfinite(h).reshape(*h.shape[:-2], -1).all(axis=-1)
    d[bad] = 1.0
    if dead_inputs == "zero":
        d[d == 0] = 1.0
    return np.argsort(-d, axis=-1, kind="stable").astype(np.int32)


DEAD_INPUTS = ("zero", "keep")


def check_options(dead_inputs: str, static_groups: bool, actorder: bool, spec: QuantSpec, name: str) -> None:
    """One clear error for an unknown ``dead_inputs`` or recomputed groups with act-order."""
    if dead_inputs not in DEAD_INPUTS:
        raise QuantizationError(f"{name}: dead_inputs (--dead-inputs) must be 'zero' or 'keep', got {dead_inputs!r}")
    if not static_groups and actorder and spec.granularity != "channel":
        raise QuantizationError(f"{name}: recomputed group grids (static_groups=False) with act-order give groups of "
                                "permuted inputs that a group-wise tensor cannot store; use static groups or no "
                                "act-order")


def _fix_hessian(h: jax.Array, dead_inputs: str = "zero") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Non-finite H → I; dead inputs (``diag H == 0``) → ``H_ii = 1`` unless ``dead_inputs="keep"``
    (QMoE: no dead-input step, the damping makes H invertible) (reference step 2)."""
    eye = jnp.eye(h.shape[-1], dtype=jnp.float32)
    nan_h = ~jnp.all(jnp.isfinite(h))
    h = jnp.where(nan_h, eye, h)
    dead = jnp.diagonal(h) == 0
    if dead_inputs == "keep":
        return h, nan_h, dead
    return h + jnp.diag(dead.astype(jnp.float32)), nan_h, dead


def _factor(h: jax.Array, perm: jax.Array, percdamp: float, actorder: bool, dead_inputs: str = "zero") -> jax.Array:
    """``U`` of the fixed, permuted, damped Hessian (steps 2–6, before the Cholesky-failure fallback)."""
    h, _, _ = _fix_hessian(jnp.asarray(h, jnp.float32), dead_inputs)
    return _hinv_upper(h[perm][:, perm] if actorder else h, percdamp)


def gptq_solve_one(w: jax.Array, h: jax.Array, spec: QuantSpec, *, percdamp: float = 0.1, blocksize: int = 128,
                   actorder: bool = False, unroll: int = 1, perm: jax.Array | None = None,
                   u: jax.Array | None = None, dead_inputs: str = "zero",
                   static_groups: bool = True) -> dict[str, jax.Array]:
    """GPTQ for one weight ``w [K, N]`` with Hessian ``h [K, K]`` (traceable; vmap it over experts).

    Returns a dict: ``codes`` uint8 ``[K, N]``, ``scales``/``zeros`` ``[G, N]`` (zeros absent for specs
    without them), ``loss`` ``[N]`` (Σ_k (w−q)²/U_kk²/2 per output channel, the reference's ``Losses``),
    ``fallback`` (Cholesky failed → RTN), ``nan_hessian`` (non-finite H → RTN), ``dead`` (number of dead inputs).
    ``perm``/``u``: the act-order permutation and the factor ``_factor(h, perm)`` when precomputed by a batched
    caller (the factorizations then run one expert at a time: XLA:CPU's batched LAPACK kernels share one
    thread pool between the devices of a host mesh and can deadlock).
    ``dead_inputs``: ``"zero"`` (gptq) or ``"keep"`` (QMoE); ``static_groups=False``: per-group grids recomputed
    in the column loop (group-wise specs only; see the module docstring).
    """
    check_options(dead_inputs, static_groups, actorder, spec, "gptq")
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    k, n = w.shape
    eye = jnp.eye(k, dtype=jnp.float32)

    h, nan_h, dead = _fix_hessian(h, dead_inputs)  # (2) dead inputs
    w_live = jnp.where(dead[:, None], 0.0, w) if dead_inputs == "zero" else w
    grouped = spec.num_groups(k) > 1
    dynamic = grouped and not static_groups
    ar = jnp.arange(k)
    if actorder and perm is None:  # (3) act-order
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
    perm = jnp.asarray(perm, jnp.int32) if actorder else ar
    if u is None:
        u = _hinv_upper(h[perm][:, perm] if actorder else h, percdamp)  # (4, 5)
    ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diagonal(u) > 0)
    # Cholesky failure -> H = I (QMoE "skip due to singularity"): no dead inputs, identity order,
    # U = I/sqrt(1 + damp) diagonal, i.e. plain RTN on the same grid.
    u_rtn = eye / jnp.sqrt(jnp.float32(1.0) + jnp.maximum(jnp.float32(percdamp), DAMP_FLOOR))
    u = jnp.where(ok, u, u_rtn)
    perm = jnp.where(ok, perm, ar)
    w_src = jnp.where(ok, w_live, w)
    wp = w_src[perm]
    # (1) the grid: per channel from the original weights; static groups after the dead-input step
    # (recomputed groups: replaced in the loop, every group's first input refits its grid)
    scales, zeros = _grid(w_src if grouped else w, spec)

    bs = min(int(blocksize), k)  # blocking is exact; no padding beyond K for small K
    nb = -(-k // bs)
    kp = nb * bs
    g = scales.shape[-2]
    gs = k // g
    if kp != k:  # pad inputs: W = 0, U block-diagonal identity -> no effect on real inputs
        wp = jnp.pad(wp, ((0, kp - k), (0, 0)))
        u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag((jnp.arange(kp) >= k).astype(jnp.float32))
    def per_input(sc: jax.Array, zc: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """The grid of every (permuted, padded) input from the group grids."""
        s_cols = jnp.pad(expand_groups(sc, k)[perm], ((0, kp - k), (0, 0)), mode="edge")
        z_cols = None if zc is None else jnp.pad(expand_groups(zc, k)[perm], ((0, kp - k), (0, 0)), mode="edge")
        return s_cols, z_cols

    s_static: jax.Array | None = None
    z_static: jax.Array | None = None
    if g > 1 and not dynamic:  # static groups: the grid of input k is its group's, in the original order
        s_static, z_static = per_input(scales, zeros)
    cols = jnp.arange(kp)
    gstart = jnp.arange(g) * gs

    def block(bi, carry):
        wcur, codes_all, loss, sc, zc = carry
        i1 = bi * bs
        w1 = lax.dynamic_slice_in_dim(wcur, i1, bs, axis=0)
        urows = lax.dynamic_slice_in_dim(u, i1, bs, axis=0)  # [bs, kp]
        u1 = lax.dynamic_slice_in_dim(urows, i1, bs, axis=1)  # [bs, bs]
        if dynamic:  # groups starting in this block: grid of the current W (as of the block's start)
            new_s, new_z = _grid(wcur[:k], spec)
            upd = ((gstart >= i1) & (gstart < i1 + bs))[:, None]
            sc = jnp.where(upd, new_s, sc)
            zc = None if zc is None or new_z is None else jnp.where(upd, new_z, zc)
            s_cols, z_cols = per_input(sc, zc)
        else:
            s_cols, z_cols = s_static, z_static
        if g > 1:
            s1 = lax.dynamic_slice_in_dim(s_cols, i1, bs, axis=0)
            z1 = None if z_cols is None else lax.dynamic_slice_in_dim(z_cols, i1, bs, axis=0)

        def column(i, c):
            w1, q1, e1, ls = c
            wi = lax.dynamic_index_in_dim(w1, i, axis=0, keepdims=False)
            if g > 1:
                s = lax.dynamic_index_in_dim(s1, i, axis=0, keepdims=False)
                z = None if z1 is None else lax.dynamic_index_in_dim(z1, i, axis=0, keepdims=False)
            else:
                s, z = scales[0], None if zeros is None else zeros[0]
            code, q = _quantize_row(wi, s, z, spec)
            urow = lax.dynamic_index_in_dim(u1, i, axis=0, keepdims=False)
            d = urow[i]
            err = (wi - q) / d
            ls = ls + 0.5 * (err * err)  # (w − q)² / U_ii² / 2
            w1 = w1 - urow[:, None] * err[None, :]  # U is upper triangular: rows < i unchanged
            q1 = lax.dynamic_update_index_in_dim(q1, code, i, axis=0)
            e1 = lax.dynamic_update_index_in_dim(e1, err, i, axis=0)
            return w1, q1, e1, ls

        init = (w1, jnp.zeros((bs, n), jnp.uint8), jnp.zeros((bs, n), jnp.float32), loss)
        _, q1, e1, loss = lax.fori_loop(0, bs, column, init, unroll=unroll)
        codes_all = lax.dynamic_update_slice_in_dim(codes_all, q1, i1, axis=0)
        rest = jnp.where(cols[None, :] >= i1 + bs, urows, 0.0)  # lazy update of the later inputs
        wcur = wcur - jnp.matmul(rest.T, e1, precision=_HIGHEST)
        return wcur, codes_all, loss, sc, zc

    init = (wp, jnp.zeros((kp, n), jnp.uint8), jnp.zeros((n,), jnp.float32), scales, zeros)
    _, codes_p, loss, scales, zeros = lax.fori_loop(0, nb, block, init)
    codes = jnp.zeros((k, n), jnp.uint8).at[perm].set(codes_p[:k]) if actorder else codes_p[:k]
    out = {"codes": codes, "scales": scales, "loss": loss, "fallback": ~ok, "nan_hessian": nan_h,
           "dead": jnp.sum(dead & ok).astype(jnp.int32)}
    if zeros is not None:
        out["zeros"] = zeros
    return out


def _grid(w: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    scales, zeros = find_params(w, spec)
    return scales.astype(jnp.float32), None if (zeros is None or not spec.has_zeros) else zeros.astype(jnp.float32)


# ---- batched / sharded -----------------------------------------------------------------------------
@dataclass
class GPTQStats:
    """Per-expert results of one :func:`gptq_quantize` call (NumPy arrays of length E)."""

    loss: np.ndarray
    fallback: np.ndarray
    nan_hessian: np.ndarray
    dead: np.ndarray

    @property
    def num_fallback(self) -> int:
        return int(np.sum(self.fallback | self.nan_hessian))


@functools.lru_cache(maxsize=64)
def _batched_fn(spec: QuantSpec, percdamp: float, blocksize: int, actorder: bool, unroll: int,
                mesh: Mesh | None, axis: str, dead_inputs: str = "zero", static_groups: bool = True) -> Callable:
    one = functools.partial(gptq_solve_one, spec=spec, percdamp=percdamp, blocksize=blocksize, actorder=actorder,
                            unroll=unroll, dead_inputs=dead_inputs, static_groups=static_groups)
    def solve(w: jax.Array, h: jax.Array, perm: jax.Array) -> dict[str, jax.Array]:
        u = lax.map(lambda a: _factor(a[0], a[1], percdamp, actorder, dead_inputs), (h, perm))  # one at a time
        return jax.vmap(lambda a, b, c, d: one(a, b, perm=c, u=d))(w, h, perm, u)

    fn = solve
    if mesh is not None:
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec(axis),) * 3,
                           out_specs=PartitionSpec(axis), check_vma=False)  # no collectives: per-expert
    return jax.jit(fn)


@functools.lru_cache(maxsize=64)
def _single_fn(spec: QuantSpec, percdamp: float, blocksize: int, actorder: bool, unroll: int,
               dead_inputs: str = "zero", static_groups: bool = True) -> Callable:
    return jax.jit(functools.partial(gptq_solve_one, spec=spec, percdamp=percdamp, blocksize=blocksize,
                                     actorder=actorder, unroll=unroll, dead_inputs=dead_inputs,
                                     static_groups=static_groups))


def solve_one_jit(w: Any, h: Any, spec: QuantSpec, *, percdamp: float = 0.1, blocksize: int = 128,
                  actorder: bool = False, unroll: int = 1, dead_inputs: str = "zero",
                  static_groups: bool = True) -> dict[str, jax.Array]:
    """The jitted single-expert solver (the per-expert-loop baseline of the benchmark and tests)."""
    check_options(dead_inputs, static_groups, actorder, spec, "gptq")
    return _single_fn(spec, float(percdamp), int(blocksize), bool(actorder), int(unroll), str(dead_inputs),
                      bool(static_groups))(w, h)


def _check_finite_weights(w: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(w).reshape(w.shape[0], -1).all(axis=1)
    if bad.any():
        idx = np.nonzero(bad)[0]
        raise QuantizationError(f"{name}: NaN/inf weights in expert(s) {idx[:8].tolist()}"
                                f"{' …' if len(idx) > 8 else ''}; cannot quantize")


def gptq_quantize(w: Any, h: Any, spec: QuantSpec, *, percdamp: float = 0.1, blocksize: int = 128,
                  actorder: bool = False, group: int | None = 16, mesh: Mesh | None = None, axis: str = "expert",
                  unroll: int = 1, name: str = "weight", dtype: Any = None, dead_inputs: str = "zero",
                  static_groups: bool = True) -> tuple[QuantizedTensor, GPTQStats]:
    """GPTQ-quantize a stack of experts ``w [E, K, N]`` with Hessians ``h [E, K, K]`` (QMoE ``batch_gptq``).

    A 2-D ``w [K, N]`` / ``h [K, K]`` is treated as one expert (the result keeps no batch axis).
    Experts are solved ``group`` at a time (QMoE ``par_exp = 16``; ``None`` = all at once) in one jitted
    ``vmap``; with ``mesh`` the group is sharded over its ``axis`` via ``jax.shard_map`` and padded with
    dummy experts (H = I, W = 0). Returns the ``QuantizedTensor`` and per-expert :class:`GPTQStats`.
    ``dead_inputs``: ``"zero"`` (gptq ``fasterquant``, default) or ``"keep"`` (QMoE ``batch_gptq``);
    ``static_groups=False`` recomputes group-wise grids in the column loop (gptq's default with a group size).
    """
    check_options(dead_inputs, static_groups, actorder, spec, name)
    if not math.isfinite(float(percdamp)) or float(percdamp) <= 0:
        raise QuantizationError(f"{name}: percdamp must be a finite number > 0, got {percdamp!r}")
    if int(blocksize) < 1:
        raise QuantizationError(f"{name}: blocksize must be >= 1, got {blocksize!r}")
    dtype = jnp.dtype(dtype or getattr(w, "dtype", np.float32))  # logical dtype of the QuantizedTensor
    w_np = np.asarray(w, np.float32)
    h_np = np.asarray(h, np.float32)
    squeeze = w_np.ndim == 2
    if squeeze:
        w_np, h_np = w_np[None], h_np[None]
    if w_np.ndim != 3 or h_np.shape != (w_np.shape[0], w_np.shape[1], w_np.shape[1]):
        raise QuantizationError(f"{name}: weights {list(w_np.shape)} and Hessians {list(h_np.shape)} do not fit "
                                "([E, K, N] and [E, K, K])")
    _check_finite_weights(w_np, name)
    spec.num_groups(w_np.shape[1])  # validates the group size
    e, k, n = w_np.shape
    ndev = 1 if mesh is None else int(mesh.shape[axis])
    grp = e if not group else min(int(group), e)
    grp = -(-grp // ndev) * ndev
    fn = _batched_fn(spec, float(percdamp), int(blocksize), bool(actorder), int(unroll), mesh, axis,
                     str(dead_inputs), bool(static_groups))
    outs: list[dict[str, np.ndarray]] = []
    eye = np.eye(k, dtype=np.float32)
    for s in range(0, e, grp):
        wg, hg = w_np[s:s + grp], h_np[s:s + grp]
        m = wg.shape[0]
        if m < grp:  # dummy experts (H = I, W = 0) keep one compiled shape and fill every device
            wg = np.concatenate([wg, np.zeros((grp - m, k, n), np.float32)])
            hg = np.concatenate([hg, np.broadcast_to(eye, (grp - m, k, k))])
        pg = actorder_perm(hg, dead_inputs) if actorder else np.zeros((grp, k), np.int32)
        if mesh is not None:
            sh = jax.sharding.NamedSharding(mesh, PartitionSpec(axis))
            wg, hg, pg = jax.device_put(wg, sh), jax.device_put(hg, sh), jax.device_put(pg, sh)
        with jax.default_matmul_precision("highest"):
            res = fn(wg, hg, pg)
        outs.append({key: v[:m] for key, v in to_host(res).items()})  # gathered across processes
    cat = {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}
    if squeeze:
        cat = {key: v[0] for key, v in cat.items()}
    qt = QuantizedTensor.from_codes(cat["codes"], cat["scales"], cat.get("zeros"), spec, dtype=dtype)
    loss = np.sum(cat["loss"].astype(np.float64), axis=-1)  # host sum: independent of the batching
    stats = GPTQStats(loss=np.atleast_1d(loss), fallback=np.atleast_1d(cat["fallback"]),
                      nan_hessian=np.atleast_1d(cat["nan_hessian"]), dead=np.atleast_1d(cat["dead"]))
    return qt, stats


# ---- diagnostics -------------------------------------------------------------------------------------
def rtn_codes(w: Any, spec: QuantSpec) -> QuantizedTensor:
    """Round-to-nearest on the same grid as GPTQ (the H = I baseline)."""
    w = jnp.asarray(w, jnp.float32)
    scales, zeros = find_params(w, spec)
    codes = quantize_codes(w, scales, zeros if spec.has_zeros else None, spec)
    return QuantizedTensor.from_codes(codes, scales, zeros if spec.has_zeros else None, spec)


def layer_error(w: Any, q: Any, h: Any) -> np.ndarray:
    """Relative layer error ``‖XW − XQ‖_F / ‖XW‖_F`` per expert, from ``H = 2·XᵀX`` (no X needed).

    ``w, q [E, K, N]`` (or ``[K, N]``), ``h [E, K, K]``. Experts with ``‖XW‖ = 0`` give 0.
    """
    w = np.asarray(w, np.float64)
    q = np.asarray(q, np.float64)
    h = np.asarray(h, np.float64)
    if w.ndim == 2:
        w, q, h = w[None], q[None], h[None]
    d = w - q
    num = np.einsum("ekn,ekj,ejn->e", d, h, d)
    den = np.einsum("ekn,ekj,ejn->e", w, h, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.sqrt(np.maximum(num, 0) / den)
    return np.where(den > 0, r, 0.0)
