"""The Switch Transformer encoder-decoder (Flax linen), param tree = T5X ``target`` tree (spec §2).

``SwitchTransformer(cfg, kernels="auto").apply({"params": p}, input_ids, decoder_input_ids, attention_mask,
decoder_attention_mask, train=False)`` -> ``(logits [B,T,V] f32, aux)`` (``kernels``: the ``moqe_jax.ops``
kernel mode, a static field); ``aux`` holds the mean
``aux_loss``/``z_loss``/``dropped_fraction`` over sparse layers and per-layer MoE info under ``"moe"``.

Masks (spec §4.4). ``routing_mode="t5x"``: encoder validity = ``attention_mask`` or ``ids > 0``;
decoder: with ``decoder_attention_mask`` it is used for both the attention masks and the logit mask;
without it, the attention masks use T5X's ``decoder_target_tokens > 0`` reconstructed from the inputs
(``decoder_target_valid_from_ids``) and the logit mask uses ``tok>0 | next_tok>0 | pos==0``; padded
queries AND keys get −1e10; layer-norm outputs are multiplied by the logit mask.
``"hf"``: masks on keys only (``attention_mask`` default all ones), no logit mask, f32 attention
softmax, HF tied-logit scaling.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moqe_jax import ops
from moqe_jax.config import SwitchConfig
from moqe_jax.model.layers import (
    DecoderLayer,
    Embed,
    EncoderLayer,
    Kernel,
    LayerNorm,
    RelativePositionBias,
    dropout,
    mask_bias,
    relpos_bias,
)

Array = Any

__all__ = ["SwitchTransformer", "encoder_context", "decoder_context", "decoder_valid_from_ids",
           "decoder_target_valid_from_ids", "output_logits", "summarize_aux", "train_rngs"]


# ---- contexts shared by the module and the layer-wise API -----------------------------------------
def decoder_valid_from_ids(ids: Array) -> Array:
    """T5X decoder logit mask ``tok>0 | shift_left(tok)>0 | pos==0`` (spec §4.4) as bool ``[B,T]``."""
    nxt = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
    pos0 = jnp.arange(ids.shape[1])[None, :] == 0
    return (ids > 0) | (nxt > 0) | pos0


def decoder_target_valid_from_ids(ids: Array, eos_token_id: int) -> Array:
    """T5X decoder attention validity ``decoder_target_tokens > 0`` reconstructed from the inputs
    (``inputs = shift_right(targets)``): ``target_t = input_{t+1}``; the last target is > 0 iff the last
    input is neither padding nor EOS. Differs from the logit mask only at an input EOS followed by padding."""
    nxt = ids[:, 1:] > 0
    last = (ids[:, -1:] > 0) & (ids[:, -1:] != eos_token_id)
    return jnp.concatenate([nxt, last], axis=1)


def encoder_context(cfg: SwitchConfig, relpos_table: Array, input_ids: Array,
                    attention_mask: Array | None = None) -> dict[str, Array]:
    """``{"valid", "bias", "logit_mask"}`` for the encoder stack (bias includes the shared relpos bias)."""
    dt = cfg.jnp_dtype
    b, l = input_ids.shape
    if attention_mask is not None:
        valid = jnp.asarray(attention_mask).astype(bool)
    elif cfg.routing_mode == "hf":
        valid = jnp.ones((b, l), bool)
    else:
        valid = input_ids > 0
    if cfg.routing_mode == "hf":
        mask = jnp.broadcast_to(valid[:, None, None, :], (b, 1, l, l))
        logit_mask = None
    else:
        mask = valid[:, None, :, None] & valid[:, None, None, :]
        logit_mask = valid[..., None].astype(dt)
    bias = mask_bias(mask, dt) + relpos_bias(relpos_table, l, l, True, cfg)
    return {"valid": valid, "bias": bias, "logit_mask": logit_mask}


def decoder_context(cfg: SwitchConfig, relpos_table: Array, decoder_input_ids: Array, enc_valid: Array,
                    decoder_attention_mask: Array | None = None) -> dict[str, Array]:
    """``{"valid", "self_bias", "cross_bias", "logit_mask"}`` for the decoder stack (full sequences)."""
    dt = cfg.jnp_dtype
    b, t = decoder_input_ids.shape
    if decoder_attention_mask is not None:
        valid = tvalid = jnp.asarray(decoder_attention_mask).astype(bool)
    elif cfg.routing_mode == "hf":
        valid = tvalid = jnp.ones((b, t), bool)
    else:
        valid = decoder_valid_from_ids(decoder_input_ids)
        tvalid = decoder_target_valid_from_ids(decoder_input_ids, cfg.eos_token_id)
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if cfg.routing_mode == "hf":
        self_mask = causal & valid[:, None, None, :]
        cross_mask = jnp.broadcast_to(enc_valid[:, None, None, :], (b, 1, t, enc_valid.shape[1]))
        logit_mask = None
    else:
        self_mask = causal & tvalid[:, None, :, None] & tvalid[:, None, None, :]
        cross_mask = tvalid[:, None, :, None] & enc_valid[:, None, None, :]
        logit_mask = valid[..., None].astype(dt)
    self_bias = mask_bias(self_mask, dt) + relpos_bias(relpos_table, t, t, False, cfg)
    return {"valid": valid, "self_bias": self_bias, "cross_bias": mask_bias(cross_mask, dt),
            "logit_mask": logit_mask}


def output_logits(cfg: SwitchConfig, embedding: Array, logits_kernel: Array | None, y: Array,
                  kernels: str = "auto") -> Array:
    """Output logits (f32): tied ``(y @ Eᵀ)/sqrt(D)`` (hf: ``(y·D^-0.5) @ Eᵀ``) or ``y @ logits_dense``."""
    if cfg.tie_word_embeddings:
        e = ops.dequantize_weight(embedding, jnp.float32)
        y = y.astype(jnp.float32)
        if cfg.routing_mode == "hf":
            return jnp.dot(y * (cfg.d_model ** -0.5), e.T)
        return jnp.dot(y, e.T) / jnp.sqrt(jnp.float32(cfg.d_model))
    if logits_kernel is None:
        raise ValueError("output_logits: an untied model needs its logits_dense kernel")
    return ops.qmatmul(y.astype(jnp.float32), logits_kernel, mode=kernels)


def summarize_aux(infos: dict[str, dict]) -> dict[str, Any]:
    """Mean aux/z loss and dropped fraction over sparse layers + per-layer info (without ``inputs``)."""
    moe = {k: {n: v for n, v in i.items() if n != "inputs"} for k, i in infos.items() if i}
    if not moe:
        z = jnp.zeros((), jnp.float32)
        return {"aux_loss": z, "z_loss": z, "dropped_fraction": z, "moe": {}}
    def mean(key: str) -> Array:
        return jnp.mean(jnp.stack([i[key] for i in moe.values()]))
    return {"aux_loss": mean("aux_loss"), "z_loss": mean("z_loss"), "dropped_fraction": mean("dropped_fraction"),
            "moe": moe}


# ---- modules -------------------------------------------------------------------------------------
class Encoder(nn.Module):
    cfg: SwitchConfig
    kernels: str = "auto"

    def setup(self) -> None:
        c = self.cfg
        sp = c.sparse_layers("encoder")
        self.relpos_bias = RelativePositionBias(c)
        self.layers = [EncoderLayer(c, sparse=i in sp, kernels=self.kernels) for i in range(c.num_layers)]
        self.encoder_norm = LayerNorm(c)

    def __call__(self, x: Array, input_ids: Array, attention_mask: Array | None, train: bool = False):
        ctx = encoder_context(self.cfg, self.relpos_bias(), input_ids, attention_mask)
        rate = self.cfg.dropout_rate
        x = dropout(self, x, rate, not train)  # input dropout (Flaxformer Encoder.input_dropout)
        infos = {}
        for i, layer in enumerate(self.layers):
            x, info = layer(x, ctx["bias"], ctx["logit_mask"], train)
            if info:
                infos[f"encoder/layers_{i}"] = info
        y = dropout(self, self.encoder_norm(x), rate, not train)  # output dropout, before the logit mask
        if ctx["logit_mask"] is not None:
            y = ctx["logit_mask"] * y
        return y, ctx["valid"], infos


class Decoder(nn.Module):
    cfg: SwitchConfig
    kernels: str = "auto"

    def setup(self) -> None:
        c = self.cfg
        sp = c.sparse_layers("decoder")
        self.relpos_bias = RelativePositionBias(c)
        self.layers = [DecoderLayer(c, sparse=i in sp, kernels=self.kernels) for i in range(c.num_decoder_layers)]
        self.decoder_norm = LayerNorm(c)
        if not c.tie_word_embeddings:
            self.logits_dense = Kernel((c.d_model, c.vocab_size))

    def __call__(self, x: Array, encoded: Array, enc_valid: Array, decoder_input_ids: Array,
                 decoder_attention_mask: Array | None, embedding: Array, train: bool = False):
        c = self.cfg
        ctx = decoder_context(c, self.relpos_bias(), decoder_input_ids, enc_valid, decoder_attention_mask)
        x = dropout(self, x, c.dropout_rate, not train)  # input dropout (Flaxformer Decoder.input_dropout)
        infos = {}
        for i, layer in enumerate(self.layers):
            x, info = layer(x, encoded, ctx["self_bias"], ctx["cross_bias"], ctx["logit_mask"], train)
            if info:
                infos[f"decoder/layers_{i}"] = info
        y = dropout(self, self.decoder_norm(x), c.dropout_rate, not train)  # output dropout, before the logit mask
        if ctx["logit_mask"] is not None:
            y = ctx["logit_mask"] * y
        kernel = None if c.tie_word_embeddings else self.logits_dense()
        return output_logits(c, embedding, kernel, y, self.kernels), infos


class SwitchTransformer(nn.Module):
    """Switch encoder-decoder; see the module docstring for masks and outputs."""

    cfg: SwitchConfig
    kernels: str = "auto"

    def setup(self) -> None:
        self.token_embedder = Embed(self.cfg)
        self.encoder = Encoder(self.cfg, self.kernels)
        self.decoder = Decoder(self.cfg, self.kernels)

    def encode(self, input_ids: Array, attention_mask: Array | None = None, train: bool = False):
        """``(encoded [B,L,D], enc_valid [B,L], infos)``."""
        x = self.token_embedder(input_ids)
        return self.encoder(x, input_ids, attention_mask, train)

    def decode(self, encoded: Array, enc_valid: Array, decoder_input_ids: Array,
               decoder_attention_mask: Array | None = None, train: bool = False):
        """``(logits [B,T,V] f32, infos)``."""
        x = self.token_embedder(decoder_input_ids)
        return self.decoder(x, encoded, enc_valid, decoder_input_ids, decoder_attention_mask,
                            self.token_embedder.embedding, train)

    def __call__(self, input_ids: Array, decoder_input_ids: Array, attention_mask: Array | None = None,
                 decoder_attention_mask: Array | None = None, train: bool = False):
        encoded, valid, einfo = self.encode(input_ids, attention_mask, train)
        logits, dinfo = self.decode(encoded, valid, decoder_input_ids, decoder_attention_mask, train)
        aux = summarize_aux({**einfo, **dinfo})
        aux["encoder_output"] = encoded
        return logits, aux


def train_rngs(key: Array) -> dict[str, Array]:
    """The rng streams of a training forward pass, derived from one key: ``{"dropout", "jitter"}`` (Flaxformer's
    names: dropout masks; router jitter noise). Pass as ``SwitchTransformer.apply(..., train=True, rngs=...)``."""
    return {"dropout": jax.random.fold_in(key, 0), "jitter": jax.random.fold_in(key, 1)}


def init_params(cfg: SwitchConfig, seed: int | Array = 0) -> dict:
    """Random T5X-style init (embeddings N(0,1), router N(0,2e-2), variance-scaling kernels)."""
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    ids = jnp.ones((1, 8), jnp.int32)
    return SwitchTransformer(cfg).init(key, ids, ids)["params"]
