"""`qmatmul`: the one matmul entry point for (possibly quantized) weights (docs/ARCHITECTURE.md, "ops").

``y = x @ W`` where ``W`` is a float array, a :class:`~moqe_jax.packed.qtensor.QuantizedTensor` or a
codec (``Sub1Tensor``, anything with ``decode()``). Dispatch:

* ``mode="xla"``: reference — dequantize with XLA, then ``jnp.dot`` (float W is cast to ``x.dtype``
  exactly like Flaxformer's ``DenseGeneral``).
* ``mode="pallas"``: the Pallas kernels of ``pallas_kernels`` (Triton on NVIDIA GPUs).
* ``mode="interpret"``: the same kernels in Pallas interpret mode (CPU tests).
* ``mode="auto"`` (default): Pallas on a GPU when the kernel supports the case, XLA otherwise.

The process-wide default can be changed with :func:`kernel_mode` (a context manager) or the
environment variable ``MOQE_KERNELS`` (auto|xla|pallas|interpret). Backend selection itself lives
only in ``pallas_kernels/backend.py``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from moqe_jax.packed.qtensor import QuantizedTensor

_MODES = ("auto", "xla", "pallas", "interpret")
_mode: str = os.environ.get("MOQE_KERNELS", "auto")


def get_kernel_mode() -> str:
    return _mode


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Temporarily select how quantized matmuls run (``auto``/``xla``/``pallas``/``interpret``).

    The mode is read at trace time: functions already jitted keep the mode they were traced with.
    """
    global _mode
    if mode not in _MODES:
        raise ValueError(f"kernel mode must be one of {_MODES}, got {mode!r}")
    old, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = old


def _is_codec(w: Any) -> bool:
    return not isinstance(w, QuantizedTensor) and hasattr(w, "decode")


def dequantize_weight(w: Any, dtype: Any) -> jax.Array:
    """Float view of any weight type (XLA reference path)."""
    if isinstance(w, QuantizedTensor):
        return w.dequantize(dtype)
    if _is_codec(w):
        return w.dequantize(dtype) if hasattr(w, "dequantize") else w.decode().dequantize(dtype)
    return jnp.asarray(w).astype(dtype)


def _resolve(mode: str | None) -> str:
    mode = mode or _mode
    if mode not in _MODES:
        raise ValueError(f"kernel mode must be one of {_MODES}, got {mode!r}")
    if mode == "auto":
        from pallas_kernels import backend

        return "pallas" if backend.gpu_kernels_available() else "xla"
    return mode


def _kernel(kind: str, x: jax.Array, w: Any, mode: str | None, preferred_element_type: Any) -> jax.Array | None:
    """Run the Pallas kernel ``dispatch.<kind>`` when the mode asks for one and it handles the case."""
    if not _quantized(w):
        return None
    m = _resolve(mode)
    if m == "xla":
        return None
    from pallas_kernels import dispatch

    y = getattr(dispatch, kind)(x, w, interpret=(m == "interpret"))
    if y is None or preferred_element_type is None:
        return y
    return y.astype(preferred_element_type)


def qmatmul(x: jax.Array, w: Any, *, mode: str | None = None,
            preferred_element_type: Any = None) -> jax.Array:
    """``x [..., K] @ W [K, N] -> [..., N]`` for float or quantized ``W``."""
    y = _kernel("matmul", x, w, mode, preferred_element_type)
    if y is not None:
        return y
    return jnp.dot(x, dequantize_weight(w, x.dtype), preferred_element_type=preferred_element_type)


def grouped_qmatmul(x: jax.Array, w: Any, *, mode: str | None = None,
                    preferred_element_type: Any = None) -> jax.Array:
    """Per-expert matmul ``x [E, C, K] @ W [E, K, N] -> [E, C, N]`` (capacity-dispatched layout)."""
    y = _kernel("grouped_matmul", x, w, mode, preferred_element_type)
    if y is not None:
        return y
    return jnp.einsum("eck,ekn->ecn", x, dequantize_weight(w, x.dtype), preferred_element_type=preferred_element_type)


def _quantized(w: Any) -> bool:
    return isinstance(w, QuantizedTensor) or _is_codec(w)
