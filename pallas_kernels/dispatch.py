"""Kernel dispatch for ``moqe_jax.ops`` (docs/ARCHITECTURE.md, "Kernels").

``matmul(x, w)`` / ``grouped_matmul(x, w)`` pick the Pallas kernel for a packed weight and return None
when no kernel handles the case, so that the caller falls back to the XLA reference:

* :class:`QuantizedTensor` (2-D, or expert-stacked ``[E, K, N]``) → :mod:`pallas_kernels.dequant_matmul`;
* ``Sub1Tensor`` (class name, any object with ``.decode()``) → ``pallas_kernels.sub1_matmul`` when that
  module exists (imported lazily), else None.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import jax

from moqe_jax.packed.qtensor import QuantizedTensor
from pallas_kernels import dequant_matmul as dq

__all__ = ["matmul", "grouped_matmul", "explain"]


def _sub1_module() -> Any:
    try:
        return importlib.import_module("pallas_kernels.sub1_matmul")
    except ImportError:
        return None


def _is_sub1(w: Any) -> bool:
    return type(w).__name__ == "Sub1Tensor" and hasattr(w, "decode")


def explain(x: Any, w: Any, grouped: bool = False) -> str | None:
    """Why no kernel handles ``x @ w`` (None when one does). Useful in logs and tests."""
    if _is_sub1(w):
        mod = _sub1_module()
        fn = getattr(mod, "grouped_sub1_matmul" if grouped else "sub1_matmul", None) if mod else None
        return None if fn is not None else "pallas_kernels.sub1_matmul is not available"
    if not isinstance(w, QuantizedTensor):
        return f"no kernel for weight type {type(w).__name__}"
    want = 3 if grouped else 2
    if w.ndim != want and not (not grouped and w.ndim == 3):
        return f"weight rank {w.ndim} (kernel needs {want}-D)"
    if x.shape[-1] != w.k:
        return f"x has K={x.shape[-1]}, weight has K={w.k}"
    if grouped and (x.ndim != 3 or x.shape[0] != w.shape[0]):
        return f"grouped matmul needs x [E, C, K] matching W {list(w.shape)}, got {list(x.shape)}"
    return dq.unsupported_reason(w.spec, w.k, x.dtype)


def matmul(x: jax.Array, w: Any, *, interpret: bool = False) -> jax.Array | None:
    """``x [..., K] @ W [K, N] -> [..., N]``; an expert-stacked ``W [E, K, N]`` with ``x [E, ..., K]`` runs
    grouped. None when no kernel handles the case."""
    if _is_sub1(w):
        mod = _sub1_module()
        fn = getattr(mod, "sub1_matmul", None) if mod else None
        return None if fn is None else fn(x, w, interpret=interpret)
    if explain(x, w) is not None:
        return None
    if w.ndim == 2:
        return dq.quant_matmul(x, w, interpret=interpret)
    # stacked weight: x [E, ..., K] -> [E, C, K]
    if x.ndim < 2 or x.shape[0] != w.shape[0]:
        return None
    lead = x.shape[1:-1]
    c = math.prod(lead) if lead else 1
    y = dq.grouped_quant_matmul(x.reshape(x.shape[0], c, x.shape[-1]), w, interpret=interpret)
    return y.reshape(x.shape[0], *lead, y.shape[-1])


def grouped_matmul(x: jax.Array, w: Any, *, interpret: bool = False) -> jax.Array | None:
    """Per-expert ``x [E, C, K] @ W [E, K, N] -> [E, C, N]`` in one launch; None when unsupported."""
    if _is_sub1(w):
        mod = _sub1_module()
        fn = getattr(mod, "grouped_sub1_matmul", None) if mod else None
        return None if fn is None else fn(x, w, interpret=interpret)
    if explain(x, w, grouped=True) is not None:
        return None
    return dq.grouped_quant_matmul(x, w, interpret=interpret)
