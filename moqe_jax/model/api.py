"""Model-level functions with no I/O: the jitted forward pass and parameter accounting.

``Model``/``load_model``/``save_model`` live in the facade ``moqe_jax.api`` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
import math

import jax

from moqe_jax.config import SwitchConfig
from moqe_jax.model.components import COMPONENTS, component_of
from moqe_jax.model.switch import SwitchTransformer, init_params, train_rngs

__all__ = ["forward", "param_counts", "param_shapes"]


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def forward(cfg: SwitchConfig, params: dict, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask,
            train: bool = False, kernels: str = "auto", rng=None):
    """``(logits, aux)`` of ``SwitchTransformer(cfg, kernels)`` (``cfg``, ``train``, ``kernels`` are static);
    ``rng``: a key for the training rng streams (dropout, router jitter; ``train_rngs``), used only with ``train``."""
    rngs = train_rngs(rng) if (train and rng is not None) else None
    return SwitchTransformer(cfg, kernels).apply({"params": params}, input_ids, decoder_input_ids, attention_mask,
                                        decoder_attention_mask, train, rngs=rngs)


def param_shapes(cfg: SwitchConfig) -> dict[str, tuple[int, ...]]:
    """``{"encoder/layers_1/mlp/expert/wi/kernel": shape, ...}`` via ``jax.eval_shape`` (no allocation)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, 0))
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        out["/".join(str(getattr(k, "key", k)) for k in path)] = tuple(leaf.shape)
    return out


@functools.lru_cache(maxsize=64)
def param_counts(cfg: SwitchConfig) -> dict[str, int]:
    """Parameter count per component (``moqe_jax.model.components.COMPONENTS``), computed abstractly."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for path, shape in param_shapes(cfg).items():
        counts[component_of(path)] += math.prod(shape)
    return counts
