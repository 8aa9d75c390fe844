"""Kernel dispatch for ``moqe_jax.ops`` (placeholder until the kernels issue lands).

Each function returns None when no kernel handles the case, and the caller falls back to XLA.
"""

from __future__ import annotations

from typing import Any


def matmul(x: Any, w: Any, *, interpret: bool = False) -> Any:
    return None


def grouped_matmul(x: Any, w: Any, *, interpret: bool = False) -> Any:
    return None
