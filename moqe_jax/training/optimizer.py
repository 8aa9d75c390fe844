"""Optimizers: optax Adafactor as in T5X (decay 0.8, parameter scale, clipping 1.0, rsqrt schedule) or AdamW."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

from moqe_jax.errors import ConfigError
from moqe_jax.training.config import TrainConfig

__all__ = ["make_optimizer"]


def _schedule(tc: TrainConfig) -> Callable[[Any], Any]:
    lr, w = tc.learning_rate, max(1, tc.warmup_steps)
    if tc.schedule == "constant":
        return lambda step: lr
    if tc.schedule == "rsqrt":
        return lambda step: lr * jnp.sqrt(w / jnp.maximum(step.astype(jnp.float32) + 1.0, w))
    if tc.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, min(w, tc.steps - 1), max(tc.steps, w + 1), lr * 0.05)
    raise ConfigError(f"unknown schedule {tc.schedule!r} (rsqrt, constant, cosine)")


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Adafactor as in T5X (decay 0.8, parameter scale, clipping 1.0) or AdamW (warmup + schedule)."""
    sched = _schedule(tc)
    if tc.optimizer == "adafactor":
        return optax.adafactor(learning_rate=sched, decay_rate=0.8, multiply_by_parameter_scale=True,
                               clipping_threshold=1.0, factored=True, min_dim_size_to_factor=128,
                               weight_decay_rate=tc.weight_decay or None)
    if tc.optimizer == "adamw":
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adamw(sched, b1=0.9, b2=0.98, eps=1e-9, weight_decay=tc.weight_decay))
    raise ConfigError(f"unknown optimizer {tc.optimizer!r} (adafactor, adamw)")
