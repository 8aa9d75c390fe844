"""Which paper "component" a parameter path belongs to (MoQE §4 ablations; QMoE §3.6).

Paths are the T5X/Flaxformer parameter paths (docs/T5X_SWITCH.md §2), as tuples of keys or
'/'-joined strings, e.g. ``encoder/layers_1/mlp/expert/wi/kernel``.
"""

from __future__ import annotations

from collections.abc import Sequence

COMPONENTS = ("experts", "router", "dense", "self_attn", "cross_attn", "embeddings", "norms", "relpos", "logits")


def _parts(path: str | Sequence[str]) -> list[str]:
    if isinstance(path, str):
        return [p for p in path.split("/") if p]
    return [str(getattr(p, "key", p)) for p in path]


def component_of(path: str | Sequence[str]) -> str:
    """Component name of a parameter path (one of ``COMPONENTS``)."""
    p = _parts(path)
    if "expert" in p:
        return "experts"
    if "router" in p:
        return "router"
    if "mlp" in p:
        return "dense"
    if "encoder_decoder_attention" in p:
        return "cross_attn"
    if "attention" in p or "self_attention" in p:
        return "self_attn"
    if "token_embedder" in p:
        return "embeddings"
    if "logits_dense" in p:
        return "logits"
    if "relpos_bias" in p:
        return "relpos"
    if p and p[-1] == "scale":
        return "norms"
    raise KeyError(f"cannot classify parameter path {'/'.join(p)!r}")
