"""Autoregressive decoding with a KV cache: greedy and beam search (jitted ``lax.while_loop``,
stopping early once every sequence has emitted EOS).

The encoder runs once; every decoder layer keeps a self-attention k/v cache ``[B, T_max, H, K]`` and
precomputed cross-attention k/v. A step embeds one token per sequence, attends to cache positions
``≤ pos`` with the causal relative-position bias of query position ``pos`` (Flaxformer decode mode,
spec §4.4: no decoder padding mask, no decoder logit mask, cross mask = encoder validity). The MoE
layers route the ``B`` step tokens as one batch (T5X decode behaviour).

Beam search keeps finished hypotheses in the beam with a frozen score (they can only extend with the
pad id at zero cost) and ranks the final beams by ``logprob / ((5 + len) / 6) ** length_penalty``
(T5X/GNMT brevity penalty). ``num_beams=1`` is exactly greedy search. ``kernels`` (static) is the
``moqe_jax.ops`` kernel mode of every matmul.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from moqe_jax.config import SwitchConfig
from moqe_jax.model import layerwise
from moqe_jax.model.layers import DecoderLayer, MultiHeadAttention, mask_bias, relpos_bias

Array = Any
__all__ = ["encode_for_decoding", "init_cache", "decode_step", "greedy_search", "beam_search"]


def encode_for_decoding(cfg: SwitchConfig, params: dict, input_ids: Array, attention_mask: Array | None = None,
                        kernels: str = "auto"):
    """Encoder output, its validity ``[B,L]`` and per-layer cross-attention k/v."""
    x, ctx = layerwise.encode_embed(cfg, params, input_ids, attention_mask)
    for i in range(cfg.num_layers):
        x, _ = layerwise.encoder_layer(cfg, params, i, x, ctx, kernels=kernels)
    encoded = layerwise.encoder_final(cfg, params, x, ctx)
    cross = []
    for i in range(cfg.num_decoder_layers):
        p = params["decoder"][f"layers_{i}"]["encoder_decoder_attention"]
        cross.append(MultiHeadAttention(cfg, kernels).apply({"params": p}, encoded, method=MultiHeadAttention.kv))
    return encoded, ctx["valid"], tuple(cross)


def init_cache(cfg: SwitchConfig, batch: int, max_len: int) -> tuple:
    z = jnp.zeros((batch, max_len, cfg.num_heads, cfg.d_kv), cfg.jnp_dtype)
    return tuple((z, z) for _ in range(cfg.num_decoder_layers))


def decode_step(cfg: SwitchConfig, params: dict, tokens: Array, pos: Array, cache: tuple, cross: tuple,
                enc_valid: Array, kernels: str = "auto") -> tuple[Array, tuple]:
    """One decoder step: ``tokens [B]`` at position ``pos`` -> ``(logits [B, V] f32, new cache)``."""
    dt = cfg.jnp_dtype
    b = tokens.shape[0]
    tmax = cache[0][0].shape[1]
    x = layerwise.embed(cfg, params, tokens[:, None])
    kpos = jnp.arange(tmax)
    self_bias = mask_bias((kpos <= pos)[None, None, None, :], dt) + relpos_bias(
        params["decoder"]["relpos_bias"]["rel_embedding"], 1, tmax, False, cfg, q_offset=pos)
    cross_bias = mask_bias(enc_valid[:, None, None, :], dt)
    new_cache = []
    for i in range(cfg.num_decoder_layers):
        layer = DecoderLayer(cfg, sparse=cfg.is_sparse("decoder", i), kernels=kernels)
        x, _, c = layer.apply({"params": params["decoder"][f"layers_{i}"]}, x, None, self_bias, cross_bias, None,
                              False, cross_kv=cross[i], cache=cache[i], cache_index=pos)
        new_cache.append(c)
    ctx = {"logit_mask": None}
    logits = layerwise.decoder_final(cfg, params, x, ctx, kernels)
    return logits.reshape(b, -1), tuple(new_cache)


@functools.partial(jax.jit, static_argnums=(0, 3), static_argnames=("kernels",))
def greedy_search(cfg: SwitchConfig, params: dict, input_ids: Array, max_new_tokens: int,
                  attention_mask: Array | None = None, *, kernels: str = "auto") -> Array:
    """Greedy decoding: ``[B, max_new_tokens]`` (pad id after EOS)."""
    b = input_ids.shape[0]
    _, enc_valid, cross = encode_for_decoding(cfg, params, input_ids, attention_mask, kernels)
    cache = init_cache(cfg, b, max_new_tokens)
    out = jnp.full((b, max_new_tokens), cfg.pad_token_id, jnp.int32)
    tok = jnp.full((b,), cfg.decoder_start_token_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(state):
        i, _, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, out, done = state
        logits, cache = decode_step(cfg, params, tok, i, cache, cross, enc_valid, kernels)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, cfg.pad_token_id, nxt)
        out = out.at[:, i].set(nxt)
        done = done | (nxt == cfg.eos_token_id)
        return i + 1, nxt, cache, out, done

    _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tok, cache, out, done))
    return out


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 6), static_argnames=("kernels",))
def beam_search(cfg: SwitchConfig, params: dict, input_ids: Array, max_new_tokens: int, num_beams: int,
                attention_mask: Array | None = None, length_penalty: float = 0.6, *, kernels: str = "auto") -> Array:
    """Beam search; returns the best beam per input ``[B, max_new_tokens]`` (pad id after EOS)."""
    b = input_ids.shape[0]
    k = num_beams
    _, enc_valid, cross = encode_for_decoding(cfg, params, input_ids, attention_mask, kernels)

    def tile(a: Array) -> Array:
        return jnp.repeat(a, k, axis=0)

    enc_valid = tile(enc_valid)
    cross = jax.tree_util.tree_map(tile, cross)
    cache = init_cache(cfg, b * k, max_new_tokens)
    seqs = jnp.full((b, k, max_new_tokens), cfg.pad_token_id, jnp.int32)
    tok = jnp.full((b * k,), cfg.decoder_start_token_id, jnp.int32)
    # only beam 0 is live at the start (the others are duplicates)
    scores = jnp.tile(jnp.array([0.0] + [-1e9] * (k - 1), jnp.float32)[None], (b, 1))
    done = jnp.zeros((b, k), bool)
    lengths = jnp.zeros((b, k), jnp.int32)
    neg = jnp.float32(-1e30)

    def cond(state):
        i, *_, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, seqs, scores, done, lengths = state
        logits, cache = decode_step(cfg, params, tok, i, cache, cross, enc_valid, kernels)
        v = logits.shape[-1]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, v)
        pad_only = jnp.full((v,), neg).at[cfg.pad_token_id].set(0.0)
        lp = jnp.where(done[..., None], pad_only[None, None], lp)
        cand = (scores[..., None] + lp).reshape(b, k * v)
        top, idx = jax.lax.top_k(cand, k)
        beam = idx // v
        nxt = (idx % v).astype(jnp.int32)
        gather = lambda a: jnp.take_along_axis(a, beam, axis=1)  # noqa: E731
        prev_done = gather(done)
        seqs = jnp.take_along_axis(seqs, beam[..., None], axis=1).at[:, :, i].set(nxt)
        lengths = gather(lengths) + (~prev_done).astype(jnp.int32)
        done = prev_done | (nxt == cfg.eos_token_id)
        flat = (beam + jnp.arange(b)[:, None] * k).reshape(-1)
        cache = jax.tree_util.tree_map(lambda a: a[flat], cache)
        return i + 1, nxt.reshape(-1), cache, seqs, top, done, lengths

    _, _, _, seqs, scores, done, lengths = jax.lax.while_loop(
        cond, body, (jnp.int32(0), tok, cache, seqs, scores, done, lengths))
    norm = scores / (((5.0 + lengths.astype(jnp.float32)) / 6.0) ** length_penalty)
    best = jnp.argmax(norm, axis=1)
    return jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]
