"""Quantization-aware training with the straight-through estimator (MoQE §4/§6: 2-bit experts need QAT).

``fake_quant(w, spec)`` is a ``jax.custom_vjp``:

* forward: exactly the values of the packed quantizer, ``quantize_tensor(w, spec).dequantize(w.dtype)``
  bit for bit, computed without packing (:func:`moqe_jax.quant.rtn.fake_quantize`); the grid
  (scales/zeros) is recomputed from the current ``w`` at every step, as in MoQE's RTN;
* backward: identity (STE, Bengio et al. 2013), optionally masked to zero outside the representable
  range of the grid (``clip_grad=True``, the "clipped STE" of PACT/LSQ-style QAT).

Usage inside a train step::

    loss = loss_fn(fake_quant_params(params, spec, components=("experts",)), batch)

and after training ``export_qat(params, spec)`` gives ``QuantizedTensor`` leaves whose forward
equals the fake-quant forward exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from moqe_jax.packed.qtensor import expand_groups
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.policy import DEFAULT_COMPONENTS, plan_quantization, quantize_model_rtn
from moqe_jax.quant.rtn import LOG_MSE_STEPS, as_spec, dequantize_grouped, quantize_arrays, representable_range
from moqe_jax.tree import flatten_params, unflatten_params

__all__ = ["fake_quant", "fake_quant_params", "export_qat"]


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def fake_quant(w: jax.Array, spec: QuantSpec, clip_grad: bool = False, log_steps: int = LOG_MSE_STEPS) -> jax.Array:
    """Quantize-dequantize ``w [*batch, K, N]`` (forward) with a straight-through gradient (backward)."""
    return _fwd(w, spec, clip_grad, log_steps)[0]


@partial(jax.jit, static_argnums=(1, 2, 3))
def _fwd(w: jax.Array, spec: QuantSpec, clip_grad: bool, log_steps: int):
    codes, s, z = quantize_arrays(w, spec, log_steps=log_steps)
    y = dequantize_grouped(codes, s, z, spec).astype(w.dtype)
    if not clip_grad:
        return y, None
    k = w.shape[-2]
    lo, hi = representable_range(s, z, spec)
    wf = w.astype(jnp.float32)
    return y, (wf >= expand_groups(lo, k)) & (wf <= expand_groups(hi, k))


def _bwd(spec: QuantSpec, clip_grad: bool, log_steps: int, mask: Any, g: jax.Array):
    if mask is None:
        return (g,)
    return (jnp.where(mask, g, jnp.zeros_like(g)),)


fake_quant.defvjp(_fwd, _bwd)


def fake_quant_params(params: Any, spec: QuantSpec, components: str | Sequence[str] | None = DEFAULT_COMPONENTS, *,
                      overrides: Mapping[str, Any] | None = None, clip_grad: bool = False,
                      log_steps: int = LOG_MSE_STEPS) -> Any:
    """``params`` with every leaf selected by the policy (:mod:`moqe_jax.quant.policy`) replaced by
    ``fake_quant(leaf)``; differentiable (STE), usable inside ``jax.jit``/``jax.grad``."""
    spec = as_spec(spec)
    plan = plan_quantization(params, spec, components, overrides)
    flat = flatten_params(params)
    for path, sp in plan.items():
        flat[path] = fake_quant(flat[path], sp, clip_grad, log_steps)
    return unflatten_params(flat)


def export_qat(params_or_model: Any, spec: QuantSpec, components: str | Sequence[str] | None = DEFAULT_COMPONENTS,
               *, overrides: Mapping[str, Any] | None = None, log_steps: int = LOG_MSE_STEPS) -> Any:
    """Packed ``QuantizedTensor`` leaves of the QAT-trained weights (same policy and spec as training).

    Returns the same kind of object it is given (params tree or ``Model``). Its dequantized weights
    equal ``fake_quant_params(params, ...)`` bit for bit, so the forward passes are identical.
    """
    return quantize_model_rtn(params_or_model, as_spec(spec), components, overrides=overrides, log_steps=log_steps)
