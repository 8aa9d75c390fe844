"""Autoregressive decoding with a KV cache: greedy and beam search, each ONE compiled program.

``generate`` (the host edge, called by ``Model.generate``) checks the inputs, pads them to a bucket and runs
``greedy_search`` / ``beam_search``: one ``jax.jit`` holding the encoder and a ``lax.while_loop`` over the
decode steps, which stops as soon as every row has ended (EOS or ``max_new_tokens``).

Buckets. The batch is padded to a power of two (extra rows copy row 0 and start "done"), the encoder input
length to a power of two ≥ 8 (extra positions masked) and the KV cache to a power of two ≥ 8 (at most
``max_cache_len``); ``max_new_tokens``, ``min_new_tokens``, the EOS id and the length penalty are traced
values. A session therefore compiles one program per (batch bucket, length bucket, cache bucket,
num_beams, routing mode, kernel mode). Padding is exact for the routing modes whose tokens do not share
expert capacity across rows and positions ("dropless", "hf"); under "t5x" capacity, extra rows/positions
take capacity slots, so ``bucket`` defaults to off there (results then equal the unpadded run exactly).

Routing. Generation runs the "dropless" MoE dispatch (only the experts that received tokens, no capacity)
when the installed ``SwitchConfig`` offers it and the model's config is in "t5x" mode (the two agree
whenever the T5X path drops no token); an "hf" config keeps "hf" (HF semantics are more than routing);
``routing_mode=`` overrides.

Packed weights stay packed. The expert weights are loop invariants of the decode loop, and XLA's
while-loop invariant code motion would hoist their dequantization out of the loop, i.e. keep a float copy
of every packed decoder weight for the whole generation. Each step therefore passes the packed leaves
through ``lax.optimization_barrier`` together with the step counter, so the (XLA reference) dequantization
or the Pallas kernel runs inside the step on the packed arrays; only one layer's transient float operand
exists at a time (tests/test_generate.py checks that no float ``[E, K, N]`` expert weight enters the loop).

A step embeds one token per sequence, attends to cache positions ``≤ pos`` with the causal
relative-position bias of query position ``pos`` (Flaxformer decode mode, docs/T5X_SWITCH.md §4.4: no
decoder padding mask, no decoder logit mask, cross mask = encoder validity). The MoE layers route the
``B`` step tokens as one batch (T5X decode behaviour).

Beam search keeps finished hypotheses in the beam with a frozen score (they can only extend with the
pad id at zero cost) and ranks the final beams by ``logprob / ((5 + len) / 6) ** length_penalty``
(T5X/GNMT brevity penalty). ``num_beams=1`` is exactly greedy search. Before ``min_new_tokens`` tokens
EOS is not allowed (its logit is −inf). ``kernels`` (static) is the ``moqe_jax.ops`` kernel mode of every
matmul.
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax.config import ROUTING_MODES, SwitchConfig
from moqe_jax.errors import ConfigError
from moqe_jax.model import layerwise
from moqe_jax.model.layers import DecoderLayer, MultiHeadAttention, mask_bias, relpos_bias
from moqe_jax.packed.base import is_packed

Array = Any
__all__ = ["encode_for_decoding", "init_cache", "decode_step", "greedy_search", "beam_search", "generate",
           "generation_routing_mode", "bucket_size", "MAX_CACHE_LEN"]

MAX_CACHE_LEN = 4096  # default bound of max_new_tokens (the KV cache length); generate(max_cache_len=) raises it
_MIN_BUCKET = 8


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
        x, _, c = cast(tuple[Array, Any, Any], layer.apply(
            {"params": params["decoder"][f"layers_{i}"]}, x, None, self_bias, cross_bias, None, False,
            cross_kv=cross[i], cache=cache[i], cache_index=pos))
        new_cache.append(c)
    ctx = {"logit_mask": None}
    logits = layerwise.decoder_final(cfg, params, x, ctx, kernels)
    return logits.reshape(b, -1), tuple(new_cache)


def _packed_in_step(params: dict, i: Array) -> dict:
    """``params`` with every packed leaf tied to the step counter ``i`` by an optimization barrier, so XLA
    cannot hoist their dequantization out of the decode loop (module docstring, "Packed weights")."""
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_packed)
    idx = [j for j, leaf in enumerate(leaves) if is_packed(leaf)]
    if not idx:
        return params
    packed, _ = jax.lax.optimization_barrier(([leaves[j] for j in idx], i))
    for j, leaf in zip(idx, packed, strict=True):
        leaves[j] = leaf
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _forbid_eos(logits: Array, i: Array, min_new: Array, eos: Array) -> Array:
    """EOS logit −inf while fewer than ``min_new`` tokens have been generated."""
    ban = (i < min_new) & (jnp.arange(logits.shape[-1]) == eos)
    return jnp.where(ban, -jnp.inf, logits)


@functools.partial(jax.jit, static_argnums=(0, 3), static_argnames=("kernels",))
def greedy_search(cfg: SwitchConfig, params: dict, input_ids: Array, cache_len: int, attention_mask: Array,
                  row_valid: Array, max_new_tokens: Array, min_new_tokens: Array, eos_id: Array, *,
                  kernels: str = "auto") -> Array:
    """Greedy decoding ``[B, cache_len]`` (pad id after EOS and after ``max_new_tokens``; rows with
    ``row_valid`` False start finished). ``cache_len`` is static, the rest traced."""
    b = input_ids.shape[0]
    _, enc_valid, cross = encode_for_decoding(cfg, params, input_ids, attention_mask, kernels)
    cache = init_cache(cfg, b, cache_len)
    out = jnp.full((b, cache_len), cfg.pad_token_id, jnp.int32)
    tok = jnp.full((b,), cfg.decoder_start_token_id, jnp.int32)
    done = ~row_valid

    def cond(state):
        i, _, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, out, done = state
        p = _packed_in_step(params, i)
        logits, cache = decode_step(cfg, p, tok, i, cache, cross, enc_valid, kernels)
        logits = _forbid_eos(logits, i, min_new_tokens, eos_id)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, cfg.pad_token_id, nxt)
        out = out.at[:, i].set(nxt)
        done = done | (nxt == eos_id)
        return i + 1, nxt, cache, out, done

    _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tok, cache, out, done))
    return out


@functools.partial(jax.jit, static_argnums=(0, 3, 4), static_argnames=("kernels",))
def beam_search(cfg: SwitchConfig, params: dict, input_ids: Array, cache_len: int, num_beams: int,
                attention_mask: Array, row_valid: Array, max_new_tokens: Array, min_new_tokens: Array,
                eos_id: Array, length_penalty: Array, *, kernels: str = "auto") -> Array:
    """Beam search; the best beam per input ``[B, cache_len]`` (pad id after EOS / ``max_new_tokens``)."""
    b = input_ids.shape[0]
    k = num_beams
    _, enc_valid, cross = encode_for_decoding(cfg, params, input_ids, attention_mask, kernels)

    def tile(a: Array) -> Array:
        return jnp.repeat(a, k, axis=0)

    enc_valid = tile(enc_valid)
    cross = jax.tree_util.tree_map(tile, cross)
    cache = init_cache(cfg, b * k, cache_len)
    seqs = jnp.full((b, k, cache_len), cfg.pad_token_id, jnp.int32)
    tok = jnp.full((b * k,), cfg.decoder_start_token_id, jnp.int32)
    # only beam 0 is live at the start (the others are duplicates)
    scores = jnp.tile(jnp.array([0.0] + [-1e9] * (k - 1), jnp.float32)[None], (b, 1))
    done = jnp.broadcast_to(~row_valid[:, None], (b, k))
    lengths = jnp.zeros((b, k), jnp.int32)
    neg = jnp.float32(-1e30)

    def cond(state):
        i, *_, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, seqs, scores, done, lengths = state
        p = _packed_in_step(params, i)
        logits, cache = decode_step(cfg, p, tok, i, cache, cross, enc_valid, kernels)
        v = logits.shape[-1]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        lp = jnp.where((i < min_new_tokens) & (jnp.arange(v) == eos_id), neg, lp).reshape(b, k, v)
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
        done = prev_done | (nxt == eos_id)
        flat = (beam + jnp.arange(b)[:, None] * k).reshape(-1)
        cache = jax.tree_util.tree_map(lambda a: a[flat], cache)
        return i + 1, nxt.reshape(-1), cache, seqs, top, done, lengths

    _, _, _, seqs, scores, done, lengths = jax.lax.while_loop(
        cond, body, (jnp.int32(0), tok, cache, seqs, scores, done, lengths))
    norm = scores / (((5.0 + lengths.astype(jnp.float32)) / 6.0) ** length_penalty)
    best = jnp.argmax(norm, axis=1)
    return jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]


# ---- the host edge: checks, routing default, buckets --------------------------------------------------
def generation_routing_mode(cfg: SwitchConfig, routing_mode: str | None = None) -> str:
    """The routing mode ``generate`` uses: ``routing_mode`` when given, else "dropless" for a "t5x" config
    (identical logits whenever the capacity path drops no token), else the config's own mode."""
    if routing_mode is not None:
        if routing_mode not in ROUTING_MODES:
            raise ConfigError(f"generate: routing_mode must be one of {', '.join(ROUTING_MODES)}, got {routing_mode!r}")
        return routing_mode
    if cfg.routing_mode == "t5x" and cfg.router_type != "experts_choose":  # experts-choose needs a capacity
        return "dropless"
    return cfg.routing_mode


def bucket_size(n: int, lo: int = 1, hi: int | None = None) -> int:
    """Smallest power of two ≥ ``max(n, lo)``, capped at ``hi`` (never below ``n``)."""
    b = max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return max(n, min(b, hi)) if hi is not None else b


def _int_arg(name: str, v: Any, lo: int, hi: int | None = None, why: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise ConfigError(f"generate: {name} must be an integer, got {v!r}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f"≥ {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"generate: {name} must be {rng}, got {v}{why if v > lo else ''}")
    return v


def _host_array(a: Any, name: str) -> np.ndarray:
    if isinstance(a, jax.core.Tracer):
        raise ConfigError(f"generate: {name} is a tracer; generate compiles its own loop, call it outside "
                          "jax.jit/vmap (use Model.logits inside a jitted function)")
    return np.asarray(a)


def check_inputs(cfg: SwitchConfig, input_ids: Any,
                 attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(ids int32 [B, L], mask bool [B, L] or None)`` after the checks of ``generate`` (one ConfigError
    each): shape, emptiness, dtype, vocabulary range, mask shape/values, all-padding rows."""
    try:
        ids = _host_array(input_ids, "input_ids")
    except ConfigError:
        raise
    except ValueError:  # ragged nested lists
        raise ConfigError("generate: input_ids rows have different lengths; pad them to one length (pad id "
                          f"{cfg.pad_token_id}) and pass attention_mask") from None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ConfigError(f"generate: input_ids must be [batch, length] (or one sequence [length]), got shape "
                          f"{list(ids.shape)}")
    if ids.size == 0:
        raise ConfigError(f"generate: input_ids is empty (shape {list(ids.shape)}); pass at least one sequence "
                          "of at least one token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"generate: input_ids must hold integer token ids, got dtype {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ConfigError(f"generate: input_ids holds token id {bad} outside the vocabulary [0, {cfg.vocab_size}) "
                          "of this model; check the tokenizer matches the model")
    valid = None
    if attention_mask is not None:
        am = _host_array(attention_mask, "attention_mask")
        if am.ndim == 1 and ids.shape[0] == 1:
            am = am[None]
        if am.shape != ids.shape:
            raise ConfigError(f"generate: attention_mask shape {list(am.shape)} does not match input_ids shape "
                              f"{list(ids.shape)}; pass one 0/1 value per input token")
        if am.dtype != np.bool_ and not np.isin(am, (0, 1)).all():
            raise ConfigError("generate: attention_mask must hold only 0/1 (or booleans)")
        valid = am.astype(bool)
    empty = (ids == cfg.pad_token_id).all(axis=1)
    if valid is not None:
        empty |= ~valid.any(axis=1)
    if empty.any():
        raise ConfigError(f"generate: row(s) {np.flatnonzero(empty)[:8].tolist()} of input_ids are all padding "
                          "(no valid token); drop them from the batch")
    return ids.astype(np.int32), valid


def generate(cfg: SwitchConfig, params: dict, input_ids: Any, max_new_tokens: int = 32, num_beams: int = 1,
             attention_mask: Any = None, length_penalty: float = 0.6, *, eos_id: int | None = None,
             min_new_tokens: int = 0, routing_mode: str | None = None, bucket: bool | None = None,
             max_cache_len: int = MAX_CACHE_LEN, kernels: str = "auto") -> np.ndarray:
    """Greedy (``num_beams=1``) or beam-search decoding, ``[B, max_new_tokens]`` int32 NumPy ids (pad id
    after EOS). See the module docstring for buckets, the routing default and packed weights."""
    ids, valid = check_inputs(cfg, input_ids, attention_mask)
    max_cache_len = _int_arg("max_cache_len", max_cache_len, 1)
    max_new = _int_arg("max_new_tokens", max_new_tokens, 1, max_cache_len,
                       f" (the KV cache holds max_cache_len={max_cache_len} positions; pass a larger "
                       "max_cache_len if memory allows)")
    min_new = _int_arg("min_new_tokens", min_new_tokens, 0, max_new)
    k = _int_arg("num_beams", num_beams, 1, cfg.vocab_size)
    eos = _int_arg("eos_id", cfg.eos_token_id if eos_id is None else eos_id, 0, cfg.vocab_size - 1)
    if isinstance(length_penalty, bool) or not np.isfinite(length_penalty):
        raise ConfigError(f"generate: length_penalty must be a finite number, got {length_penalty!r}")
    mode = generation_routing_mode(cfg, routing_mode)
    run_cfg = cfg if mode == cfg.routing_mode else cfg.replace(routing_mode=mode)
    if bucket is None:
        bucket = mode != "t5x"
    b, n = ids.shape
    if bucket:
        bb, lb = bucket_size(b), bucket_size(n, _MIN_BUCKET)
        cache_len = bucket_size(max_new, _MIN_BUCKET, max_cache_len)
    else:
        bb, lb, cache_len = b, n, max_new
    if valid is None:  # the model's own default validity (switch.encoder_context): HF all ones, else ids > 0
        valid = np.ones(ids.shape, bool) if mode == "hf" else ids > 0
    rows = np.concatenate([np.arange(b), np.zeros(bb - b, np.int64)])  # extra rows copy row 0
    pad = ((0, 0), (0, lb - n))
    ids_p = jnp.asarray(np.pad(ids[rows], pad, constant_values=cfg.pad_token_id))
    mask_p = jnp.asarray(np.pad(valid[rows], pad, constant_values=False))
    row_valid = jnp.asarray(np.arange(bb) < b)
    scalars = (jnp.int32(max_new), jnp.int32(min_new), jnp.int32(eos))
    if k == 1:
        out = greedy_search(run_cfg, params, ids_p, cache_len, mask_p, row_valid, *scalars,
                            kernels=kernels)
    else:
        out = beam_search(run_cfg, params, ids_p, cache_len, k, mask_p, row_valid, *scalars,
                          jnp.float32(length_penalty), kernels=kernels)
    return np.asarray(out)[:b, :max_new]
