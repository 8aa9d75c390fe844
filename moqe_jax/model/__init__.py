"""Switch Transformer model (Flax linen), bit-faithful to Flaxformer/T5X (docs/T5X_SWITCH.md §4).

Modules:
  * ``switch``     — ``SwitchTransformer`` (param tree = T5X ``target`` tree, spec §2), masks, logits.
  * ``layers``     — RMSNorm, relative-position buckets, attention, dense MLP, ``MoeLayer`` (Flaxformer routers).
  * ``routing``    — pure grouping / capacity / priority functions of the MoE layer (spec §4.8).
  * ``layerwise``  — functional layer-by-layer API for calibration (``encode_embed``, ``encoder_layer``,
    ``encoder_final``, ``decode_embed``, ``decoder_layer``, ``decoder_final``); see its docstring.
  * ``decode``     — greedy / beam search with a KV cache.
  * ``api``        — the jitted ``forward``, ``param_shapes``, ``param_counts`` (``Model``: ``moqe_jax.api``).
  * ``components`` — parameter path -> paper component.

Sharding rules (logical axes -> mesh) live in ``moqe_jax.sharding``.
"""
