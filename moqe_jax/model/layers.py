"""Switch Transformer building blocks in Flax linen, bit-faithful to Flaxformer (docs/T5X_SWITCH.md §4).

Parameter names reproduce the T5X ``target`` tree (spec §2) so checkpoints load without renaming.
Every kernel matmul goes through :mod:`moqe_jax.ops` so a kernel leaf may be a float array or a packed
weight (``QuantizedTensor``, ``Sub1Tensor``); params are read with ``get_param`` and passed through
untouched. The modules that matmul carry ``kernels`` (an ``ops`` kernel mode), a static field: the kernel
choice is part of the trace.

Layers return ``(x, info)``; ``info`` is ``{}`` for dense layers and for MoE layers a dict with
``inputs`` (post-norm, logit-masked ``[B,L,D]``), ``expert``/``gate``/``kept`` ``[B,L]``, ``dispatch [B,L,E]``,
the scalars ``aux_loss``, ``z_loss``, ``dropped_fraction`` and Flaxformer's ``fraction_tokens_left_behind``,
``router_confidence``, ``expert_usage``, plus ``expert_load [E]`` (spec §4.9, docs/ROUTING.md §8).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax import ops
from moqe_jax import sharding as shd
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import ConfigError
from moqe_jax.model import routing

Array = Any
MASK_VALUE = -1e10  # Flaxformer's attention mask bias

# ---- initializers (T5X / Flaxformer) ---------------------------------------------------------
kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
expert_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                      batch_axis=(0,))
embedding_init = nn.initializers.normal(stddev=1.0)
router_init = nn.initializers.normal(stddev=2e-2)
relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def query_kernel_init(d_kv: int):
    """Query kernel init with the 1/sqrt(d_kv) attention scale folded in (spec §2)."""
    def init(key, shape, dtype=jnp.float32):
        return kernel_init(key, shape, dtype) / math.sqrt(d_kv)
    return init


# ---- pure functions ---------------------------------------------------------------------------
def rms_norm(x: Array, scale: Array, eps: float, dtype: Any) -> Array:
    """T5LayerNorm (spec §4.3): f32 stats, cast to ``dtype``, multiply by ``scale`` in ``dtype``."""
    x32 = jnp.asarray(x, jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y.astype(dtype) * ops.dequantize_weight(scale, dtype)


def relative_position_bucket(rp: Array, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> Array:
    """T5 relative-position bucket of ``rp = memory_pos - query_pos`` (spec §4.6, Flaxformer/MTF)."""
    rp = jnp.asarray(rp, jnp.int32)
    n = -rp
    ret = jnp.zeros_like(n)
    nb = num_buckets
    if bidirectional:
        nb //= 2
        ret = ret + (n < 0).astype(jnp.int32) * nb
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = nb // 2
    is_small = n < max_exact
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    val_large = max_exact + (jnp.log(nf / max_exact + np.finfo(np.float32).eps) / math.log(max_distance / max_exact)
                             * (nb - max_exact)).astype(jnp.int32)
    val_large = jnp.minimum(val_large, nb - 1)
    return ret + jnp.where(is_small, n, val_large)


def relpos_bias(table: Array, qlen: int, klen: int, bidirectional: bool, cfg: SwitchConfig,
                q_offset: Array | int = 0) -> Array:
    """``[1, H, q, k]`` bias = ``table[:, bucket(k - q)]`` in the activation dtype (exact bf16 selection)."""
    qpos = jnp.arange(qlen, dtype=jnp.int32)[:, None] + q_offset
    kpos = jnp.arange(klen, dtype=jnp.int32)[None, :]
    b = relative_position_bucket(kpos - qpos, bidirectional, cfg.relative_attention_num_buckets,
                                 cfg.relative_attention_max_distance)
    t = ops.dequantize_weight(table, jnp.float32).astype(cfg.jnp_dtype)  # [H, NB]
    return jnp.take(t, b, axis=1)[None]  # [1, H, q, k]


def mask_bias(mask: Array, dtype: Any) -> Array:
    """Boolean mask -> additive bias 0 / −1e10 in ``dtype`` (Flaxformer)."""
    return jnp.where(mask, 0.0, MASK_VALUE).astype(dtype)


def activation(x: Array, gate: Array | None = None) -> Array:
    """ReLU, or gated GELU (tanh approximation, Flax ``nn.gelu``) × linear (spec §4.7)."""
    if gate is None:
        return jax.nn.relu(x)
    return jax.nn.gelu(x, approximate=True) * gate


def dropout(module: nn.Module, x: Array, rate: float, deterministic: bool,
            broadcast_dims: tuple[int, ...] = (-2,)) -> Array:
    """Flax ``nn.Dropout`` (Flaxformer's dropout factory, docs/FINETUNING.md): one Bernoulli(1 - rate) keep mask
    broadcast over ``broadcast_dims`` (default the length axis), kept values ``x / (1 - rate)``, dropped 0. A
    no-op (no rng drawn) when ``deterministic`` or ``rate == 0``; otherwise needs the ``'dropout'`` rng."""
    if deterministic or rate == 0.0:
        return x
    keep_prob = 1.0 - rate
    shape = list(x.shape)
    for d in broadcast_dims:
        shape[d] = 1
    keep = jnp.broadcast_to(jax.random.bernoulli(dropout_rng(module), keep_prob, shape), x.shape)
    return jax.lax.select(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


def dropout_rng(module: nn.Module) -> Array:
    """``module.make_rng("dropout")``, or one ``ConfigError`` saying how to pass it."""
    if not module.has_rng("dropout"):
        raise ConfigError(f"dropout_rate={module.cfg.dropout_rate} / expert_dropout_rate={module.cfg.expert_dropout} "
                          "with train=True needs a 'dropout' rng: apply(..., rngs={'dropout': key}) (Model.apply: "
                          "rng=key); or set dropout_rate=0 and expert_dropout_rate=0")
    return module.make_rng("dropout")


# ---- modules ---------------------------------------------------------------------------------
def get_param(module: nn.Module, name: str, init_fn: Any, shape: tuple[int, ...]) -> Array:
    """``module.param`` that passes an existing leaf through untouched (no Flax shape check), so a
    ``QuantizedTensor``/``Sub1Tensor`` (whose array leaves have packed shapes) can stand in for a kernel."""
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init_fn, shape)


class Kernel(nn.Module):
    """Holds one ``kernel`` param (float or quantized leaf), returned as is."""

    shape: tuple[int, ...]
    init_fn: Any = kernel_init

    @nn.compact
    def __call__(self) -> Array:
        return get_param(self, "kernel", self.init_fn, self.shape)


class LayerNorm(nn.Module):
    cfg: SwitchConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = get_param(self, "scale", nn.initializers.ones, (self.cfg.d_model,))
        return rms_norm(x, scale, self.cfg.layer_norm_epsilon, self.cfg.jnp_dtype)


class Embed(nn.Module):
    """Token embedder ``token_embedder/embedding [V, D]`` (spec §4.2, §4.10)."""

    cfg: SwitchConfig

    def setup(self) -> None:
        self.embedding = get_param(self, "embedding", embedding_init, (self.cfg.vocab_size, self.cfg.d_model))

    def __call__(self, ids: Array) -> Array:
        dt = self.cfg.jnp_dtype
        return jnp.take(ops.dequantize_weight(self.embedding, dt), ids, axis=0)


class RelativePositionBias(nn.Module):
    cfg: SwitchConfig

    @nn.compact
    def __call__(self) -> Array:
        return get_param(self, "rel_embedding", relpos_init,
                         (self.cfg.num_heads, self.cfg.relative_attention_num_buckets))


class MultiHeadAttention(nn.Module):
    """Unscaled multi-head dot-product attention (spec §4.5); ``query/key/value/out`` 2-D kernels."""

    cfg: SwitchConfig
    kernels: str = "auto"

    def setup(self) -> None:
        c = self.cfg
        d, j = c.d_model, c.inner_dim
        self.query = Kernel((d, j), query_kernel_init(c.d_kv))
        self.key = Kernel((d, j))
        self.value = Kernel((d, j))
        self.out = Kernel((j, d))

    def _heads(self, y: Array) -> Array:
        return y.reshape(*y.shape[:-1], self.cfg.num_heads, self.cfg.d_kv)

    def kv(self, x: Array) -> tuple[Array, Array]:
        """Keys and values ``[B, T, H, K]`` of ``x`` (precomputed for cross-attention decoding)."""
        dt = self.cfg.jnp_dtype
        x = x.astype(dt)
        return (self._heads(ops.qmatmul(x, self.key(), mode=self.kernels)),
                self._heads(ops.qmatmul(x, self.value(), mode=self.kernels)))

    def __call__(self, xq: Array, xkv: Array | None, bias: Array, *, kv: tuple[Array, Array] | None = None,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 deterministic: bool = True) -> tuple[Array, tuple[Array, Array]]:
        """Returns ``(out [B,Tq,D], (k, v))``; with ``cache`` the new k/v are written at ``cache_index``.
        ``deterministic=False``: Flaxformer's attention-weight dropout (``dropout_rate``, one keep mask per
        ``[B, H, key]`` broadcast over queries, weights × keep / (1 − rate))."""
        c = self.cfg
        dt = c.jnp_dtype
        q = self._heads(ops.qmatmul(xq.astype(dt), self.query(), mode=self.kernels))
        if kv is None:
            k, v = self.kv(xkv)
        else:
            k, v = kv
        if cache is not None:
            if cache_index is None:
                raise ValueError("Attention: cache= needs cache_index=")
            kc, vc = cache
            k = jax.lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, cache_index, 0, 0))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        if c.routing_mode == "hf":
            logits = logits.astype(jnp.float32)
        logits = logits + bias.astype(logits.dtype)
        w = jax.nn.softmax(logits, axis=-1).astype(dt)
        if not deterministic and c.dropout_rate > 0.0:
            keep_prob = 1.0 - c.dropout_rate
            keep = jax.random.bernoulli(dropout_rng(self), keep_prob, (*w.shape[:-2], 1, w.shape[-1]))
            w = w * (jnp.broadcast_to(keep, w.shape).astype(w.dtype) / jnp.asarray(keep_prob, w.dtype))
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v.astype(dt))
        o = o.reshape(*o.shape[:2], c.inner_dim)
        return ops.qmatmul(o, self.out(), mode=self.kernels), (k, v)


class MlpBlock(nn.Module):
    """Dense FFN: ``wi``/``wo`` or gated ``wi_0``/``wi_1``/``wo`` (spec §4.7)."""

    cfg: SwitchConfig
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict]:
        c = self.cfg
        x = x.astype(c.jnp_dtype)
        if c.gated:
            h = activation(ops.qmatmul(x, Kernel((c.d_model, c.d_ff), name="wi_0")(), mode=self.kernels),
                           ops.qmatmul(x, Kernel((c.d_model, c.d_ff), name="wi_1")(), mode=self.kernels))
        else:
            h = activation(ops.qmatmul(x, Kernel((c.d_model, c.d_ff), name="wi")(), mode=self.kernels))
        h = dropout(self, h, c.dropout_rate, not train)  # intermediate dropout, mask [B, 1, F]
        return ops.qmatmul(h, Kernel((c.d_ff, c.d_model), name="wo")(), mode=self.kernels), {}


class _RouterDense(nn.Module):
    """Flaxformer ``RouterWeights``' ``DenseGeneral`` ``w``: ``kernel [D, E]`` and, with ``router_bias``,
    ``bias [E]`` (init zeros, Flaxformer's ``RouterWeights`` default)."""

    cfg: SwitchConfig

    @nn.compact
    def __call__(self) -> tuple[Array, Array | None]:
        kernel = get_param(self, "kernel", router_init, (self.cfg.d_model, self.cfg.num_experts))
        if not self.cfg.router_bias:
            return kernel, None
        return kernel, get_param(self, "bias", nn.initializers.zeros, (self.cfg.num_experts,))


class _RouterWeights(nn.Module):
    cfg: SwitchConfig

    def setup(self) -> None:
        self.w = _RouterDense(self.cfg)

    def __call__(self) -> tuple[Array, Array | None]:
        return self.w()


class Router(nn.Module):
    """``router/router_weights/w/kernel [D, E]`` (+ ``w/bias [E]``); logits fully in f32 (spec §4.8 step 4).

    ``jitter_rng`` (training with ``router_jitter_noise = j > 0``): the f32 router inputs are multiplied by
    ``uniform(1 - j, 1 + j)`` noise before the matmul (Flaxformer ``Router._compute_router_probabilities``);
    the experts see the un-jittered inputs (docs/ROUTING.md §5)."""

    cfg: SwitchConfig

    def setup(self) -> None:
        self.router_weights = _RouterWeights(self.cfg)

    def __call__(self, x: Array, jitter_rng: Array | None = None) -> Array:
        kernel, bias = self.router_weights()
        w = ops.dequantize_weight(kernel, jnp.float32)
        x = x.astype(jnp.float32)
        if jitter_rng is not None:
            j = float(self.cfg.router_jitter_noise)
            x = x * jax.random.uniform(jitter_rng, x.shape, jnp.float32, minval=1.0 - j, maxval=1.0 + j)
        logits = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
        if bias is not None:
            logits = logits + ops.dequantize_weight(bias, jnp.float32)
        return logits


class Experts(nn.Module):
    """Stacked expert MLPs ``expert/{wi,wo}/kernel [E, D, F] / [E, F, D]``.

    ``__call__``: capacity layout ``[E, N, D]`` (``ops.grouped_qmatmul``); ``ragged``: rows sorted by expert
    ``[M, D]`` with ``group_sizes [E]`` (``ops.ragged_qmatmul``: only experts with rows are read). Same
    dtype policy in both: input cast to the activation dtype, weights dequantized to it.
    """

    cfg: SwitchConfig
    kernels: str = "auto"

    def setup(self) -> None:
        c = self.cfg
        e, d, f = c.num_experts, c.d_model, c.d_ff
        if c.gated:
            self.wi_0 = Kernel((e, d, f), expert_kernel_init)
            self.wi_1 = Kernel((e, d, f), expert_kernel_init)
        else:
            self.wi = Kernel((e, d, f), expert_kernel_init)
        self.wo = Kernel((e, f, d), expert_kernel_init)

    def _mlp(self, x: Array, mm: Any, drop: Any = None) -> Array:
        x = x.astype(self.cfg.jnp_dtype)
        if self.cfg.gated:
            h = activation(mm(x, self.wi_0()), mm(x, self.wi_1()))
        else:
            h = activation(mm(x, self.wi()))
        if drop is not None:
            h = drop(h)
        return mm(h, self.wo())

    def _expert_keep(self, train: bool) -> Array | None:
        """Expert dropout (Flaxformer: each expert's ``MlpBlock`` intermediate dropout at ``expert_dropout_rate``,
        own rng per expert, mask broadcast over the expert's token axis): keep mask ``[E, F]``, or None."""
        rate = self.cfg.expert_dropout
        if not train or rate == 0.0:
            return None
        return jax.random.bernoulli(dropout_rng(self), 1.0 - rate, (self.cfg.num_experts, self.cfg.d_ff))

    def _drop(self, keep: Array | None) -> Any:
        if keep is None:
            return None
        kp = 1.0 - self.cfg.expert_dropout
        return lambda h: jax.lax.select(jnp.broadcast_to(keep, h.shape), h / jnp.asarray(kp, h.dtype),
                                        jnp.zeros_like(h))

    def __call__(self, x: Array, train: bool = False) -> Array:
        keep = self._expert_keep(train)
        drop = self._drop(None if keep is None else keep[:, None, :])  # [E, 1, F] over [E, G·C, F]
        return self._mlp(x, lambda a, w: ops.grouped_qmatmul(a, w, mode=self.kernels), drop)

    def ragged(self, x: Array, group_sizes: Array, train: bool = False) -> Array:
        keep = self._expert_keep(train)
        if keep is not None:  # rows are sorted by expert: row r belongs to expert searchsorted(cumsum, r, 'right')
            row_expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(x.shape[0]), side="right")
            keep = keep[jnp.minimum(row_expert, self.cfg.num_experts - 1)]  # [M, F] (rows past the groups: unused)
        return self._mlp(x, lambda a, w: ops.ragged_qmatmul(a, w, group_sizes, mode=self.kernels), self._drop(keep))


class MoeLayer(nn.Module):
    """Flaxformer ``MoeLayer`` with its routers (spec §4.8–4.9, docs/ROUTING.md); the Switch top-1 router by default.

    Router options (``SwitchConfig``): ``num_selected_experts`` (tokens-choose top-k), ``batch_prioritized_routing``
    (encoder only), ``router_type`` ("tokens_choose" | "experts_choose", the latter encoder only: decoder layers
    (``decoder=True``) always route tokens-choose, as Flaxformer's gins), ``router_jitter_noise`` (train only;
    rng ``'jitter'``, else ``'dropout'``), ``router_bias``, ``router_ignore_padding_tokens``.

    ``routing_mode="t5x"``: ``_maybe_pad``, batch-major groups, banker's-rounded capacity, dropped -> 0,
    f32 combine (output f32), experts run on the ``[E, G·C, D]`` capacity layout.
    ``"dropless"``: the same router (f32 logits, softmax, top-k, gates) and combine (f32, output f32), no
    capacity and no padding: token slots sorted by expert, only the experts that received tokens run
    (``ops.ragged_qmatmul``). Equals ``"t5x"`` whenever ``"t5x"`` drops no token; the one difference is that
    a token the capacity rule would drop is kept (so batch-prioritized routing changes nothing). Aux loss is
    computed over one group per sequence. No experts-choose (it needs a capacity).
    ``"hf"``: one group per sequence, capacity ``hf_expert_capacity`` (a mask over the sorted slots:
    dropped slots go to no expert), gate multiply in the activation dtype, output in the input dtype
    (HF ≥ PR #37123 / #48421 semantics); top-1 tokens-choose only.
    """

    cfg: SwitchConfig
    kernels: str = "auto"
    num_selected: int | None = None  # experts per token (k); None: cfg.num_selected_experts
    decoder: bool = False  # a decoder layer: no batch-prioritized routing, no experts-choose

    def setup(self) -> None:
        self.router = Router(self.cfg)
        self.expert = Experts(self.cfg, self.kernels)

    @property
    def k(self) -> int:
        return self.cfg.num_selected_experts if self.num_selected is None else self.num_selected

    @property
    def experts_choose(self) -> bool:
        return self.cfg.router_type == "experts_choose" and not self.decoder

    def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict]:
        if not 1 <= self.k <= self.cfg.num_experts or (self.k != 1 and self.cfg.routing_mode == "hf"):
            raise ConfigError(f"MoeLayer.num_selected={self.k}: routing_mode {self.cfg.routing_mode!r} is top-1 "
                              f"(transformers' Switch); top-k needs routing_mode='dropless' or 't5x' and "
                              f"1 <= k <= num_experts={self.cfg.num_experts}")
        if self.cfg.routing_mode == "t5x":
            return self._capacity(x, train)
        if self.experts_choose:
            raise ConfigError("router_type='experts_choose' needs routing_mode='t5x' (experts choose a capacity's "
                              f"worth of tokens), got routing_mode={self.cfg.routing_mode!r}")
        return self._sorted(x, train)

    def _jitter_rng(self, train: bool) -> Array | None:
        """The PRNG key for router jitter (training with ``router_jitter_noise > 0``), else None."""
        j = self.cfg.router_jitter_noise
        if not train or not j > 0:
            return None
        for name in ("jitter", "dropout"):  # Flaxformer's stream is 'jitter'; a training loop's 'dropout' also serves
            if self.has_rng(name):
                return self.make_rng(name)
        raise ConfigError(f"router_jitter_noise={j} with train=True needs a PRNG key: apply(..., rngs={{'jitter': "
                          "key}}) (or a 'dropout' key); or set router_jitter_noise=0")

    def _valid(self, x: Array) -> Array | None:
        """``ignore_padding_tokens``: a token is padding iff its router input is all zeros (Flaxformer
        ``Router.__call__``: ``sum(|x|) > 0``; T5X's logit mask and ``_maybe_pad`` zero padding)."""
        return jnp.sum(jnp.abs(x), axis=-1) > 0 if self.cfg.router_ignore_padding_tokens else None

    def _capacity(self, x: Array, train: bool) -> tuple[Array, dict]:
        c = self.cfg
        b, l, d = x.shape
        e, k = c.num_experts, self.k
        cf = c.train_capacity_factor if train else c.eval_capacity_factor
        lay = routing.group_layout(b, l, e, max_group_size=c.max_group_size, capacity_factor=cf,
                                   min_expert_capacity=c.min_expert_capacity,
                                   num_expert_replicas=c.num_expert_replicas)
        xp = jnp.pad(x, ((0, lay.pad_batch), (0, lay.pad_seq), (0, 0))) if (lay.pad_batch or lay.pad_seq) else x
        bp, lp = xp.shape[:2]
        g, s, cap = lay.groups, lay.group_size, lay.capacity
        xg = shd.constrain(xp.reshape(g, s, d), ("batch", "length", "embed"))  # groups over the batch axes
        logits = self.router(xg, self._jitter_rng(train))  # [G,S,E] f32
        probs = jax.nn.softmax(logits, axis=-1)
        valid = self._valid(xg)
        gi = jnp.arange(g)[:, None]

        def view(a: Array) -> Array:
            return a.reshape(bp, lp, *a.shape[2:])[:b, :l]

        if self.experts_choose:
            if cap > s:
                raise ConfigError(f"router_type='experts_choose': expert capacity {cap} exceeds the {s} tokens of a "
                                  "group (Flaxformer's top_k over tokens needs C <= S); lower the capacity factor / "
                                  "min_expert_capacity or route more tokens at once")
            er = routing.experts_choose_route(probs, cap, valid)
            tok = er.token.reshape(g, e * cap)
            buf = jnp.take_along_axis(xg.astype(c.jnp_dtype), tok[..., None], axis=1)  # [G, E·C, D]
            ex_in = shd.dispatch_to_experts(buf.reshape(g, e, cap, d))  # [E, G·C, D]
            ex_out = shd.combine_from_experts(self.expert(ex_in, train), g)  # [G, E·C, D]
            y = ex_out.astype(jnp.float32) * er.gate.reshape(g, e * cap)[..., None]
            out = jnp.zeros((g, s, d), jnp.float32).at[gi, tok].add(y)
            ei = jnp.arange(e)[None, :, None]
            disp = jnp.zeros((g, s, e), jnp.float32).at[gi[..., None], er.token, ei].add(1.0)
            comb = jnp.zeros((g, s, e), jnp.float32).at[gi[..., None], er.token, ei].add(er.gate)
            info = self._info(x, logits, probs, None, None, None, view, valid=valid, usage=jnp.float32(1.0),
                              disp=disp, comb=comb)
            return out.reshape(bp, lp, d)[:b, :l], info
        r = routing.tokens_choose_route(probs, k, cap, batch_prioritized=c.batch_prioritized_routing
                                        and not self.decoder, valid=valid)
        # dispatch: slot = expert·C + priority; dropped choices go nowhere
        slot = jnp.where(r.kept, r.expert * cap + r.priority, e * cap).reshape(g, s * k)
        xs = xg.astype(c.jnp_dtype) if k == 1 else jnp.repeat(xg.astype(c.jnp_dtype), k, axis=1)
        buf = jnp.zeros((g, e * cap, d), c.jnp_dtype).at[gi, slot].set(xs, mode="drop")
        ex_in = shd.dispatch_to_experts(buf.reshape(g, e, cap, d))  # [E, G·C, D]: all-to-all on a mesh
        ex_out = self.expert(ex_in, train)  # [E, G·C, D]
        ex_out = shd.combine_from_experts(ex_out, g)  # [G, E·C, D]
        y = jnp.take_along_axis(ex_out, jnp.minimum(slot, e * cap - 1)[..., None], axis=1)  # [G,S·k,D]
        y = y.reshape(g, s, k, d).astype(jnp.float32) * r.gate[..., None]
        out = jnp.where(r.kept[..., None], y, 0.0)
        out = out[..., 0, :] if k == 1 else jnp.sum(out, axis=2)  # Σ over kept choices of gate·expert(x)
        out = out.reshape(bp, lp, d)[:b, :l]
        return out, self._info(x, logits, probs, r.expert, r.gate, r.kept, view, valid=valid, slots=e * cap * g)

    def _sorted(self, x: Array, train: bool = False) -> tuple[Array, dict]:
        """``"dropless"`` and ``"hf"``: slots sorted by expert, one ragged grouped matmul over active experts."""
        c = self.cfg
        b, l, d = x.shape
        e, k = c.num_experts, self.k
        logits = self.router(x, self._jitter_rng(train))  # [B,L,E] f32
        probs = jax.nn.softmax(logits, axis=-1)
        valid = self._valid(x)
        if c.routing_mode == "hf":  # per-sequence capacity, in-order priority (the t5x router per group)
            r = routing.top1_route(probs, c.hf_expert_capacity)
            expert, gate, kept = r.expert[..., None], r.gate[..., None], r.kept[..., None]
            slots_total = e * c.hf_expert_capacity * b
        else:
            expert, gate = routing.topk_choice(probs, k)  # [B,L,k]
            kept = jnp.ones(expert.shape, bool) if valid is None else jnp.broadcast_to(valid[..., None], expert.shape)
            slots_total = b * l * k
        def run(xt: Array, et: Array, n: int, params: Any) -> Array:  # sort by expert, ragged MLP, unsort
            slots = routing.sort_slots(et, n)
            xs = xt[slots.token]  # [T·k, D] sorted by expert
            if params is None:
                ys = self.expert.ragged(xs, slots.group_sizes, train)
            else:  # the local experts of an expert-parallel mesh (moqe_jax.sharding.expert_parallel_sorted)
                # expert dropout: fold in the shard index, so the local experts' masks differ from the other shards'
                # (Flaxformer draws every expert's mask from its own key)
                rngs = ({"dropout": jax.random.fold_in(self.make_rng("dropout"), jax.lax.axis_index("expert"))}
                        if train and self.has_rng("dropout") else None)
                ys = Experts(c.replace(num_experts=n), self.kernels, parent=None).apply(
                    {"params": params}, xs, slots.group_sizes, train, method=Experts.ragged, rngs=rngs)
            return routing.unsort_slots(ys, slots.order, k)

        y = shd.expert_parallel_sorted(x.reshape(b * l, d), jnp.where(kept, expert, e).reshape(b * l, k), e, run,
                                       self.expert.variables.get("params", {})).reshape(b, l, k, d)
        if c.routing_mode == "hf":
            y = y * gate.astype(y.dtype)[..., None]
            out = jnp.where(kept[..., None], y, jnp.zeros((), y.dtype))[..., 0, :].astype(x.dtype)
        else:
            y = y.astype(jnp.float32) * gate[..., None]
            out = jnp.sum(jnp.where(kept[..., None], y, 0.0), axis=2) if k > 1 or valid is not None else y[..., 0, :]
        return out, self._info(x, logits, probs, expert, gate, kept, lambda a: a, valid=valid, slots=slots_total)

    def _info(self, x: Array, logits: Array, probs: Array, expert: Array | None, gate: Array | None,
              kept: Array | None, view: Any, *, valid: Array | None = None, slots: int | None = None,
              usage: Array | None = None, disp: Array | None = None, comb: Array | None = None) -> dict:
        """Aux losses / metrics (spec §4.9, docs/ROUTING.md §6) over the ``[G, S]`` groups (all, incl. padded,
        tokens; the sorted modes: one group per sequence); ``view`` maps a ``[G, S, ...]`` array to ``[B, L, ...]``.

        Tokens-choose: ``expert``/``gate``/``kept [G, S, k]``; experts-choose: ``disp``/``comb [G, S, E]`` (how
        often / with which weight each expert took each token) and ``usage`` (1). Per-token ``expert``/``gate``/
        ``kept`` in the result: the 1st choice and whether it was dispatched (experts-choose: the most probable
        expert, and whether any expert took the token); ``dispatch [B, L, E]``: which experts processed it."""
        e = self.cfg.num_experts
        if disp is None:  # tokens choose
            assert expert is not None and gate is not None and kept is not None
            kept_f = kept.astype(jnp.float32)[..., None]
            onehot = jax.nn.one_hot(expert, e, dtype=jnp.float32)  # [G, S, k, E]
            disp = jnp.sum(onehot * kept_f, axis=-2)
            comb = jnp.sum(onehot * (gate[..., None] * kept_f), axis=-2)
            aux = routing.load_balancing_loss(probs, expert, valid)
            first_e, first_g, first_k = expert[..., 0], gate[..., 0], kept[..., 0]
            somewhere = jnp.any(kept, axis=-1)
        else:  # experts choose: no load-balancing loss (Flaxformer: 0)
            assert comb is not None
            aux = jnp.zeros((), jnp.float32)
            first_e = jnp.argmax(probs, axis=-1).astype(jnp.int32)
            first_g = jnp.max(probs, axis=-1)
            somewhere = first_k = jnp.sum(disp, axis=-1) > 0
        z = jnp.mean(jnp.square(jax.nn.logsumexp(logits if valid is None else logits * valid[..., None], axis=-1)))
        n_disp = jnp.sum(disp)
        if valid is None:
            n_tok = jnp.float32(somewhere.size)
            dropped = jnp.sum(~somewhere).astype(jnp.float32) / somewhere.size
        else:
            n_tok = jnp.sum(valid).astype(jnp.float32)
            dropped = jnp.sum(valid & ~somewhere).astype(jnp.float32) / jnp.maximum(n_tok, 1.0)
        info = {
            "inputs": x,
            "expert": view(first_e),
            "gate": view(first_g),
            "kept": view(first_k),
            "dispatch": view(disp > 0),
            "aux_loss": aux,
            "z_loss": z,
            # share of the (non-padding) tokens dispatched to no expert
            "dropped_fraction": dropped,
            # Flaxformer's sown metrics (moe_layers._sow_expert_metrics)
            "fraction_tokens_left_behind": 1.0 - jnp.sum(somewhere).astype(jnp.float32) / n_tok,
            "router_confidence": jnp.sum(comb) / jnp.maximum(n_disp, 1.0),
            "expert_usage": usage if usage is not None else n_disp / jnp.float32(slots),
            # ours: per expert, the share of the layer's tokens it processed
            "expert_load": jnp.mean(disp, axis=(0, 1)),
        }
        self.sow("intermediates", "moe", {n: info[n] for n in ("inputs", "expert", "gate", "kept")})
        return info


def _mlp(cfg: SwitchConfig, sparse: bool, kernels: str, decoder: bool = False) -> nn.Module:
    return MoeLayer(cfg, kernels, decoder=decoder, name="mlp") if sparse else MlpBlock(cfg, kernels, name="mlp")


class EncoderLayer(nn.Module):
    """Pre-LN T5 encoder layer (Flaxformer ``EncoderLayer``); standalone-applicable on ``layers_i`` params."""

    cfg: SwitchConfig
    sparse: bool = False
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: Array, bias: Array, logit_mask: Array | None, train: bool = False) -> tuple[Array, dict]:
        c = self.cfg
        h = LayerNorm(c, name="pre_attention_layer_norm")(x)
        if logit_mask is not None:
            h = logit_mask * h
        a, _ = MultiHeadAttention(c, self.kernels, name="attention")(h, h, bias, deterministic=not train)
        x = x + dropout(self, a, c.dropout_rate, not train)
        h = LayerNorm(c, name="pre_mlp_layer_norm")(x)
        if logit_mask is not None:
            h = logit_mask * h
        y, info = _mlp(c, self.sparse, self.kernels)(h, train)
        return x + dropout(self, y, c.dropout_rate, not train), info


class DecoderLayer(nn.Module):
    """Pre-LN T5 decoder layer (self-attn, cross-attn, MLP); supports a k/v cache for decoding.

    ``cross_kv`` (precomputed encoder keys/values) replaces ``encoded``; ``cache``/``cache_index``
    enable incremental self-attention. Returns ``(x, info)`` or, with a cache, ``(x, info, new_cache)``.
    """

    cfg: SwitchConfig
    sparse: bool = False
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: Array, encoded: Array | None, self_bias: Array, cross_bias: Array,
                 logit_mask: Array | None, train: bool = False, *, cross_kv: tuple[Array, Array] | None = None,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None):
        c = self.cfg
        h = LayerNorm(c, name="pre_self_attention_layer_norm")(x)
        if logit_mask is not None:
            h = logit_mask * h
        a, new_cache = MultiHeadAttention(c, self.kernels, name="self_attention")(
            h, h, self_bias, cache=cache, cache_index=cache_index, deterministic=not train)
        x = x + dropout(self, a, c.dropout_rate, not train)
        h = LayerNorm(c, name="pre_cross_attention_layer_norm")(x)
        if logit_mask is not None:
            h = logit_mask * h
        a, _ = MultiHeadAttention(c, self.kernels, name="encoder_decoder_attention")(
            h, encoded, cross_bias, kv=cross_kv, deterministic=not train)
        x = x + dropout(self, a, c.dropout_rate, not train)
        h = LayerNorm(c, name="pre_mlp_layer_norm")(x)
        if logit_mask is not None:
            h = logit_mask * h
        y, info = _mlp(c, self.sparse, self.kernels, decoder=True)(h, train)
        x = x + dropout(self, y, c.dropout_rate, not train)
        if cache is not None:
            return x, info, new_cache
        return x, info

