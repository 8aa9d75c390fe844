"""Layer-by-layer functional API over a T5X param tree (for GPTQ calibration, QMoE §3 / docs/ARCHITECTURE.md "GPTQ").

Each function takes ``cfg`` and the FULL ``params`` tree (layers read their own subtree, e.g.
``params["encoder"]["layers_3"]``), so a caller can run stack → layer i → swap layer i's params →
continue::

    x, ctx = encode_embed(cfg, params, input_ids, attention_mask)
    for i in range(cfg.num_layers):
        x, info = encoder_layer(cfg, params, i, x, ctx)   # info["inputs"/"expert"/"gate"/"kept"] if sparse
    encoded = encoder_final(cfg, params, x, ctx)
    y, dctx = decode_embed(cfg, params, decoder_input_ids, encoded, ctx, decoder_attention_mask)
    for i in range(cfg.num_decoder_layers):
        y, info = decoder_layer(cfg, params, i, y, dctx)
    logits = decoder_final(cfg, params, y, dctx)

The result equals ``SwitchTransformer(cfg).apply`` exactly (same helper functions, same modules).
``info`` of a sparse layer: ``inputs`` (post-norm, logit-masked MoE input ``[B,L,D]``), ``expert``,
``gate``, ``kept`` ``[B,L]`` and the aux scalars; ``{}`` for dense layers. All functions are jit-able
with ``cfg`` static (wrap with ``jax.jit(..., static_argnums=(0, 2))`` for the layer functions); the matmul
functions take ``kernels`` (the ``moqe_jax.ops`` kernel mode, static).
"""

from __future__ import annotations

from typing import Any, cast

import jax.numpy as jnp

from moqe_jax.config import SwitchConfig
from moqe_jax.model.layers import DecoderLayer, Embed, EncoderLayer, rms_norm
from moqe_jax.model.switch import decoder_context, encoder_context, output_logits

Array = Any
__all__ = ["encode_embed", "encoder_layer", "encoder_final", "decode_embed", "decoder_layer", "decoder_final",
           "embed"]


def embed(cfg: SwitchConfig, params: dict, ids: Array) -> Array:
    """Token embedding in the activation dtype (spec §4.2)."""
    return Embed(cfg).apply({"params": params["token_embedder"]}, jnp.asarray(ids))


def encode_embed(cfg: SwitchConfig, params: dict, input_ids: Array,
                 attention_mask: Array | None = None) -> tuple[Array, dict]:
    """Embedded encoder input and its context ``{"valid", "bias", "logit_mask"}``."""
    input_ids = jnp.asarray(input_ids)
    ctx = encoder_context(cfg, params["encoder"]["relpos_bias"]["rel_embedding"], input_ids, attention_mask)
    return embed(cfg, params, input_ids), ctx


def encoder_layer(cfg: SwitchConfig, params: dict, i: int, x: Array, ctx: dict,
                  train: bool = False, kernels: str = "auto") -> tuple[Array, dict]:
    """Apply encoder layer ``i`` (params ``params["encoder"][f"layers_{i}"]``)."""
    layer = EncoderLayer(cfg, sparse=cfg.is_sparse("encoder", i), kernels=kernels)
    out = layer.apply({"params": params["encoder"][f"layers_{i}"]}, x, ctx["bias"], ctx["logit_mask"], train)
    return cast(tuple[Array, dict], out)


def encoder_final(cfg: SwitchConfig, params: dict, x: Array, ctx: dict) -> Array:
    y = rms_norm(x, params["encoder"]["encoder_norm"]["scale"], cfg.layer_norm_epsilon, cfg.jnp_dtype)
    return y if ctx["logit_mask"] is None else ctx["logit_mask"] * y


def decode_embed(cfg: SwitchConfig, params: dict, decoder_input_ids: Array, encoded: Array, enc_ctx: dict,
                 decoder_attention_mask: Array | None = None) -> tuple[Array, dict]:
    """Embedded decoder input and context ``{"valid", "self_bias", "cross_bias", "logit_mask", "encoded"}``."""
    ids = jnp.asarray(decoder_input_ids)
    ctx = decoder_context(cfg, params["decoder"]["relpos_bias"]["rel_embedding"], ids, enc_ctx["valid"],
                          decoder_attention_mask)
    ctx["encoded"] = encoded
    return embed(cfg, params, ids), ctx


def decoder_layer(cfg: SwitchConfig, params: dict, i: int, y: Array, ctx: dict,
                  train: bool = False, kernels: str = "auto") -> tuple[Array, dict]:
    """Apply decoder layer ``i`` (params ``params["decoder"][f"layers_{i}"]``)."""
    layer = DecoderLayer(cfg, sparse=cfg.is_sparse("decoder", i), kernels=kernels)
    out = layer.apply({"params": params["decoder"][f"layers_{i}"]}, y, ctx["encoded"], ctx["self_bias"],
                      ctx["cross_bias"], ctx["logit_mask"], train)
    return cast(tuple[Array, dict], out)


def decoder_final(cfg: SwitchConfig, params: dict, y: Array, ctx: dict, kernels: str = "auto") -> Array:
    """Final norm, logit mask and output logits ``[B,T,V]`` f32."""
    z = rms_norm(y, params["decoder"]["decoder_norm"]["scale"], cfg.layer_norm_epsilon, cfg.jnp_dtype)
    if ctx["logit_mask"] is not None:
        z = ctx["logit_mask"] * z
    kernel = None if cfg.tie_word_embeddings else params["decoder"]["logits_dense"]["kernel"]
    return output_logits(cfg, params["token_embedder"]["embedding"], kernel, z, kernels)
