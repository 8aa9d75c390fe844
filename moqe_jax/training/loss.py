"""The T5X training loss: token cross-entropy + ``z_loss``·logZ² of the output logits, normalised by the number
of real target tokens, + ``aux_loss_factor`` × load-balancing loss + ``router_z_loss_factor`` × router z-loss
(docs/T5X_SWITCH.md §3/§4.9); with QAT the loss sees the fake-quantized weights (straight-through estimator)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from moqe_jax.config import SwitchConfig
from moqe_jax.training.config import TrainConfig
from moqe_jax.training.data import Batch

__all__ = ["cross_entropy_with_z_loss", "make_loss_fn"]


def cross_entropy_with_z_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float,
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """T5X ``cross_entropy_with_logits`` (+ z_loss·logZ²), summed with ``weights``: ``(total, ce, z)`` sums."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = (lse - tgt_logit) * weights
    z = z_loss * jnp.square(lse) * weights
    return jnp.sum(ce + z), jnp.sum(ce), jnp.sum(z)


def _fake_quant(tc: TrainConfig) -> Callable[[Any], Any] | None:
    spec = tc.qat_spec()
    if spec is None:
        return None
    from moqe_jax.quant.ste import fake_quant_params

    comps = tuple(tc.qat_components)
    return lambda p: fake_quant_params(p, spec, comps)


def make_loss_fn(cfg: SwitchConfig, tc: TrainConfig, train: bool = True) -> Callable[[Any, Batch], tuple]:
    """``loss(params, batch, rng=None) -> (loss, metrics)`` with the T5X loss terms (module docstring).

    ``train=True`` with ``rng`` (a PRNG key): the config's dropout and router noise draw from ``train_rngs(rng)``
    (one key per step from the train loop, so a run is deterministic given its seed)."""
    from moqe_jax.model.switch import SwitchTransformer, train_rngs

    model = SwitchTransformer(cfg)
    fq = _fake_quant(tc)

    def loss_fn(params: Any, batch: Batch, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        p = fq(params) if fq is not None else params
        rngs = train_rngs(rng) if (train and rng is not None) else None
        logits, aux = model.apply({"params": p}, batch["input_ids"], batch["decoder_input_ids"], None, None, train,
                                  rngs=rngs)
        w = batch["weights"]
        ntok = jnp.maximum(jnp.sum(w), 1.0)
        total, ce, z = cross_entropy_with_z_loss(logits, jnp.asarray(batch["targets"]), jnp.asarray(w), tc.z_loss)
        loss = total / ntok + tc.aux_loss_factor * aux["aux_loss"] + tc.router_z_loss_factor * aux["z_loss"]
        usage = [i["expert_usage"] for i in aux["moe"].values()]
        metrics = {"loss": loss, "ce": ce / ntok, "z_logits": z / ntok, "aux_loss": aux["aux_loss"],
                   "router_z_loss": aux["z_loss"], "dropped_fraction": aux["dropped_fraction"],
                   "tokens": jnp.sum(w),
                   "expert_usage": jnp.mean(jnp.stack(usage), axis=0) if usage else jnp.zeros((0,))}
        return loss, metrics

    return loss_fn
