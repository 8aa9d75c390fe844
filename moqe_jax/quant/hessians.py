"""Routing-aware Hessians for GPTQ of MoE experts (QMoE §3.3, docs/QMOE.md §3.1–3.3).

Which tokens count (:func:`token_mask`: valid, not special), which expert gets which tokens with the
per-expert cap (:func:`cap_and_sort`), and per-expert ``H = 2·XᵀX`` built one expert group at a time
(:func:`expert_hessians`, never an ``[E, T, D]`` blow-up); ``wo``'s Hessian comes from the FFN hidden
activations of the expert's own tokens (:func:`hidden_activations`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax.packed import is_packed

__all__ = ["default_special_min_id", "token_mask", "cap_and_sort", "gram", "pad_pow2", "expert_hessians",
           "hidden_activations"]

_HI = jax.lax.Precision.HIGHEST


def default_special_min_id(vocab: int) -> int | None:
    """T5 sentinels: ids ≥ 32000 for the 32k SentencePiece vocab (QMoE), else the top 100 ids of a vocab
    ≥ 1000 (``moqe_jax.data.span_corruption``); tiny vocabularies have none."""
    if vocab >= 32100:
        return 32000
    if vocab >= 1000:
        return vocab - 100
    return None


def token_mask(ids: np.ndarray, valid: np.ndarray, special_min_id: int | None, decoder: bool) -> np.ndarray:
    """Tokens that enter the Hessians (QMoE §3.3 "special-token premasking"): valid and not special.

    Encoder: ids ≥ ``special_min_id`` are dropped; decoder: the position *before* a sentinel and the
    last position are dropped."""
    m = np.asarray(valid, bool).copy()
    if special_min_id is None:
        return m
    special = ids >= special_min_id
    if decoder:  # the position predicting a sentinel, and the last position
        nxt = np.zeros_like(special)
        nxt[:, :-1] = special[:, 1:]
        m &= ~nxt
        m[:, -1] = False
    else:
        m &= ~special
    return m


def cap_and_sort(expert: np.ndarray, num_experts: int, factor: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Stable sort of token indices by expert, keeping each expert's first ``cap`` tokens
    (``cap = factor ×`` the mean load).

    Returns ``(order, counts [E], cap)``: ``order`` lists token indices expert by expert."""
    n = len(expert)
    cap = max(1, int(factor * n / num_experts)) if n else 0
    order = np.argsort(expert, kind="stable")
    counts = np.bincount(expert, minlength=num_experts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n) - starts[expert[order]]
    keep = order[rank < cap]
    return keep, np.minimum(counts, cap), cap


@jax.jit
def gram(x: jax.Array) -> jax.Array:
    """``2·XᵀX`` in float32 at the highest matmul precision."""
    x = x.astype(jnp.float32)
    return 2.0 * jnp.matmul(x.T, x, precision=_HI)


def pad_pow2(x: np.ndarray) -> np.ndarray:
    """Zero rows up to a power of two (≥ 16): zero tokens add nothing to XᵀX (nor to the FFN hidden state,
    act(0) = 0), and the jitted Gram sees O(log T) distinct shapes instead of one per expert."""
    n = len(x)
    m = max(16, 1 << max(0, (n - 1).bit_length()))
    return x if m == n else np.concatenate([x, np.zeros((m - n, x.shape[1]), x.dtype)])


def expert_hessians(x_sorted: np.ndarray, counts: np.ndarray, experts: Sequence[int]) -> np.ndarray:
    """``H[e] = 2·X_eᵀX_e`` for the given experts from tokens sorted by expert (segments ``counts``).

    Zero-token experts get the identity (QMoE: ``hessian()`` = I, i.e. RTN). ``[len(experts), D, D]``."""
    d = x_sorted.shape[-1]
    offs = np.concatenate([[0], np.cumsum(counts)])
    out = np.empty((len(experts), d, d), np.float32)
    for j, e in enumerate(experts):
        seg = x_sorted[offs[e]:offs[e + 1]]
        out[j] = np.asarray(gram(pad_pow2(seg))) if len(seg) else np.eye(d, dtype=np.float32)
    return out


def hidden_activations(x: np.ndarray, wi: Any, wi_1: Any | None) -> jax.Array:
    """FFN hidden activations of tokens ``x [T, D]`` (ReLU, or gated GELU × linear), f32; ``wi``/``wi_1``
    float or packed."""
    def f32(w: Any) -> jax.Array:
        return w.dequantize(jnp.float32) if is_packed(w) else jnp.asarray(w, jnp.float32)

    return _hidden_jit(jnp.asarray(x, jnp.float32), f32(wi), None if wi_1 is None else f32(wi_1))


@jax.jit
def _hidden_jit(x: jax.Array, wi: jax.Array, wi_1: jax.Array | None) -> jax.Array:
    h = jnp.matmul(x, wi, precision=_HI)
    if wi_1 is None:
        return jax.nn.relu(h)
    return jax.nn.gelu(h, approximate=True) * jnp.matmul(x, wi_1, precision=_HI)
