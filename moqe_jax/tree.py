"""Path-keyed views of parameter trees (T5X paths, docs/T5X_SWITCH.md §2) and host transfer.

The one ``flatten_params``/``unflatten_params`` pair (packed weights are leaves) and the one
``to_host``: every module that needs ``{"encoder/layers_1/mlp/expert/wi/kernel": leaf}`` uses these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from moqe_jax.errors import CheckpointError

__all__ = ["flatten_params", "unflatten_params", "to_host"]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{'a/b/kernel': leaf}``; leaves are arrays or packed weights (never descended)."""
    if isinstance(params, Mapping):
        out: dict[str, Any] = {}
        for k, v in params.items():
            k = str(k)
            if "/" in k or "::" in k:
                raise CheckpointError(f"parameter key {k!r} under {prefix or '/'} contains '/' or '::'")
            out.update(flatten_params(v, f"{prefix}/{k}" if prefix else k))
        return out
    return {prefix: params}


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a/b/c': leaf}`` -> nested dict (inverse of :func:`flatten_params`)."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return tree


def to_host(tree: Any) -> Any:
    """Every array leaf (packed weights' leaves too) fetched to host NumPy, one transfer for the tree.
    A leaf sharded over other processes' devices (multi-host) is all-gathered first: a collective, so every
    process must call ``to_host`` on the same tree."""
    def gather(x: Any) -> Any:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(np.asarray, jax.device_get(jax.tree.map(gather, tree)))
