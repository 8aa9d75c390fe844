"""Run one Switch layer on its own params and expose what GPTQ calibration needs (QMoE §3).

A sparse layer reports its post-norm MoE input, chosen expert and kept mask
(``moqe_jax.model.layerwise``); a dense FFN's input is captured with ``flax.linen.intercept_methods``
(the FFN module is called, not re-implemented, so the captured input is exactly what the model feeds it).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax

from moqe_jax.model import layerwise
from moqe_jax.model.layers import MlpBlock

__all__ = ["run_layer", "ffn_kernels", "set_kernel"]


@partial(jax.jit, static_argnums=(0, 1, 2))
def run_layer(cfg: Any, stack: str, i: int, layer_params: dict, x: jax.Array, ctx: dict
              ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array | None]:
    """Layer ``stack/layers_i`` on ``x``; returns ``(x_out, moe_info_or_{}, dense_ffn_input_or_None)``."""
    captured: dict[str, Any] = {}

    def grab(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, MlpBlock) and context.method_name == "__call__":
            captured["dense_in"] = args[0]
        return next_fun(*args, **kwargs)

    p = {stack: {f"layers_{i}": layer_params}}
    with nn.intercept_methods(grab):
        if stack == "encoder":
            y, info = layerwise.encoder_layer(cfg, p, i, x, ctx)
        else:
            y, info = layerwise.decoder_layer(cfg, p, i, x, ctx)
    info = {k: info[k] for k in ("inputs", "expert", "kept", "dispatch") if k in info}
    return y, info, captured.get("dense_in")


def ffn_kernels(mlp: dict, sparse: bool) -> list[str]:
    """Names of the FFN kernels in order of computation (``wi``/``wi_0``, ``wi_1``, ``wo``)."""
    sub = mlp["expert"] if sparse else mlp
    return [n for n in ("wi", "wi_0", "wi_1", "wo") if n in sub]


def set_kernel(params: Any, path: Sequence[str], value: Any) -> Any:
    """Functional update of ``params[path...]`` (copies the dicts along the path only)."""
    if not path:
        return value
    new = dict(params)
    new[path[0]] = set_kernel(params[path[0]], path[1:], value)
    return new
