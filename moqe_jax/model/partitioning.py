"""Logical axis names of the Switch params (Flaxformer ``param_with_axes``, spec §2) and mesh rules.

``logical_axes(path)`` names each dimension of a parameter; ``DEFAULT_RULES`` maps logical names to
mesh axes (``data``, ``expert``, ``model``); ``partition_specs`` / ``shard_params`` apply them. A mesh
axis is used only when it exists in the mesh and divides the dimension (else that dim is replicated).
Packed leaves (``QuantizedTensor``, codecs) are sharded along their leading expert axis only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from moqe_jax.model.components import _parts

__all__ = ["logical_axes", "DEFAULT_RULES", "partition_specs", "shard_params"]

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("expert", "expert"), ("vocab", "model"), ("mlp", "model"), ("expert_mlp", "model"), ("joined_kv", "model"),
    ("embed", None), ("mlp_embed", None), ("heads", None), ("relpos_buckets", None), ("unmodeled", None),
)


def logical_axes(path: str | Sequence[Any]) -> tuple[str, ...]:
    """Logical axis names of the parameter at ``path`` (e.g. ``("expert", "mlp_embed", "expert_mlp")``)."""
    p = _parts(path)
    last = p[-1] if p else ""
    owner = p[-2] if len(p) >= 2 else ""
    if last == "embedding":
        return ("vocab", "embed")
    if last == "rel_embedding":
        return ("heads", "relpos_buckets")
    if last == "scale":
        return ("embed",)
    if "expert" in p:
        return ("expert", "expert_mlp", "mlp_embed") if owner == "wo" else ("expert", "mlp_embed", "expert_mlp")
    if "router" in p:
        return ("embed", "unmodeled")
    if owner == "logits_dense":
        return ("embed", "vocab")
    if owner in ("query", "key", "value"):
        return ("embed", "joined_kv")
    if owner == "out":
        return ("joined_kv", "embed")
    if owner in ("wi", "wi_0", "wi_1"):
        return ("embed", "mlp")
    if owner == "wo":
        return ("mlp", "embed")
    raise KeyError(f"no logical axes for parameter {'/'.join(p)!r}")


def _is_packed(x: Any) -> bool:
    return type(x).__name__ in ("QuantizedTensor", "Sub1Tensor") or (hasattr(x, "decode") and not hasattr(x, "shape"))


def partition_specs(params: dict, mesh: Any = None, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> Any:
    """PartitionSpec tree matching ``params`` (packed leaves get a spec per array leaf)."""
    rule = dict(rules)
    sizes = dict(mesh.shape) if mesh is not None else None

    def spec_for(names: Sequence[str], shape: Sequence[int]) -> PartitionSpec:
        out, used = [], set()
        for n, dim in zip(names, shape, strict=False):
            ax = rule.get(n)
            ok = ax is not None and ax not in used and (sizes is None or (ax in sizes and dim % sizes[ax] == 0))
            out.append(ax if ok else None)
            if ok:
                used.add(ax)
        return PartitionSpec(*out)

    def one(path: Any, leaf: Any) -> Any:
        names = logical_axes(path)
        if _is_packed(leaf):
            # QuantizedTensor leaves keep the expert axis leading on every array; codec streams
            # (Sub1Tensor's flat codeword stream) have no expert axis and stay replicated.
            stacked = type(leaf).__name__ == "QuantizedTensor"
            lead = names[:1] if names[0] == "expert" and stacked else ()
            return jax.tree_util.tree_map(lambda a: spec_for(lead, a.shape[:len(lead)]), leaf)
        return spec_for(names, leaf.shape)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_packed)


def shard_params(params: dict, mesh: Any, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> dict:
    """``device_put`` every leaf with its ``NamedSharding`` on ``mesh``."""
    specs = partition_specs(params, mesh, rules)
    return jax.tree_util.tree_map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))
