"""Round-to-nearest (RTN) quantizers: MoQE linear/log, GPTQ/QMoE min-max and ternary grids.

All functions work on weights ``w [*batch, K, N]`` (Flax ``[in, out]``; batch = expert axis E);
the "channel" is N and groups run along K (``spec.granularity``). Per-(group, channel) parameters
have shape ``[*batch, G, N]``. Everything here is plain ``jnp`` and jittable with ``spec`` static;
the value of a code is defined only by :func:`moqe_jax.packed.qtensor.dequant_codes`.

Grids (docs/FORMATS.md §1, docs/MOQE.md §4, docs/QMOE.md §1.1 and §5):

* **linear, symmetric** (MoQE / FasterTransformer ``symmetric_quantize``): ``s = absmax / 2^(b−1)``
  for *every* bit width (FT's rule for int8/int4, kept for 3 and 2 bits so that all ``2^b`` codes are
  used: 2 bits → levels ``{−a, −a/2, 0, a/2}``), ``q = clip(round(w/s), −2^(b−1), 2^(b−1)−1)``,
  code ``q + 2^(b−1)``. Rounding is half-to-even (FT's ``std::round`` is half-away; exact ties have
  probability ~0 for real weights). All-zero channel: ``absmax := 1`` (codes = mid-point, value 0).
* **linear, asymmetric** (GPTQ ``Quantizer``, QMoE 2-bit): ``xmin = min(min w, 0)``,
  ``xmax = max(max w, 0)``, both 0 → ``[−1, 1]``; ``s = (xmax−xmin)/(2^b−1)``,
  ``z = round(−xmin/s)``, code ``clip(round(w/s) + z, 0, 2^b−1)``.
* **mse** (linear and ternary): GPTQ's grid search, shrink ``p = 1 − i/100`` for ``i = 0..79``
  applied to the range (absmax for symmetric; ``xmin``/``xmax`` for asymmetric and ternary),
  error ``Σ|q − w|^2.4`` per (group, channel), the first strict minimum wins. (GPTQ's own
  ternary + mse path is broken; shrinking ``{xmin, xmax}`` is our extension.)
* **log** (Aji & Heafield 2020 / Marian ``quantizeLog``): sign bit + ``(b−1)``-bit exponent
  ``e ∈ [0, 2^(b−1)−1]``, value ``±S·2^(−e)``. Marian's
  ``e = −clip(floor(log2(|clip(v,S)|/S · 4/3)), −(2^(b−1)−1), 0)`` is evaluated exactly with
  threshold comparisons: ``e ≥ j ⟺ |v| < 1.5·S·2^(−j)``. ``S`` starts at the absmax of the (group,
  channel); with ``mse=True`` it is refined ``log_steps`` times by Marian's MSE fit
  ``S ← Σ(a·w)/Σ(a·a)``, ``a = ±2^(−e)`` (Marian does this per tensor; we do it per channel/group).
  Zero is not representable: an exact 0 gets the smallest positive magnitude ``S·2^(−(2^(b−1)−1))``
  (Marian's ``sgn(0)=0`` keeps it 0, our code format has no zero). An all-zero group gets ``S = 0``
  (every value is exactly 0).
* **ternary** (QMoE): ``{xmin, 0, xmax}`` with the range rule above; code 2 if ``w > xmax/2``,
  1 if ``w < xmin/2`` (strict), else 0; ``scales = xmax``, ``zeros = xmin``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax.errors import QuantizationError
from moqe_jax.packed.qtensor import QuantizedTensor, dequant_codes, expand_groups, pack_codes
from moqe_jax.packed.spec import QuantSpec

__all__ = [
    "LOG_MSE_STEPS",
    "MSE_GRID",
    "MSE_MAXSHRINK",
    "MSE_NORM",
    "as_spec",
    "find_params",
    "quantize_codes",
    "dequantize_grouped",
    "fake_quantize",
    "quantize_arrays",
    "quantize_tensor",
    "representable_range",
]

MSE_NORM = 2.4  # GPTQ Quantizer(norm=2.4)
MSE_GRID = 100  # GPTQ Quantizer(grid=100)
MSE_MAXSHRINK = 0.8  # GPTQ Quantizer(maxshrink=0.8) -> 80 candidates, p = 1.00 .. 0.21
LOG_MSE_STEPS = 10  # Marian --quantize-optimization-steps used when spec.mse with scheme="log"
_CHUNK_ELEMS = 1 << 25  # quantize stacked experts in chunks of ~32M weights (bounded host/device memory)


def as_spec(spec: Any) -> QuantSpec:
    """``QuantSpec`` from a spec, a dict or a bit width; invalid → :class:`QuantizationError`."""
    if isinstance(spec, QuantSpec):
        return spec
    try:
        if isinstance(spec, dict):
            return QuantSpec(**spec)
        return QuantSpec(bits=spec)
    except (TypeError, ValueError) as e:
        raise QuantizationError(f"invalid quantization spec {spec!r}: {e}") from None


# --------------------------------------------------------------------------------------------
# grouped views
# --------------------------------------------------------------------------------------------
def _grouped(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """``[*b, K, N]`` -> ``[*b, G, gs, N]`` (groups along K)."""
    *lead, k, n = w.shape
    g = spec.num_groups(k)
    return w.reshape(*lead, g, k // g, n)


def _codes_grouped(wg: jax.Array, s: jax.Array, z: jax.Array | None, spec: QuantSpec) -> jax.Array:
    """Codes for grouped weights ``[*b, G, gs, N]`` with params ``[*b, G, 1, N]`` (uint8)."""
    if spec.is_ternary:
        assert z is not None  # ternary grids always have w_min
        return jnp.where(wg > s / 2, 2, jnp.where(wg < z / 2, 1, 0)).astype(jnp.uint8)
    b = int(spec.bits)
    if spec.scheme == "log":
        emax = (1 << (b - 1)) - 1
        a = jnp.abs(wg)
        pos = s > 0
        r = jnp.where(pos, a / jnp.where(pos, s, 1.0), 1.0)
        e0 = -jnp.floor(jnp.log2(r * (4.0 / 3.0)))
        e0 = jnp.clip(jnp.nan_to_num(e0, posinf=emax, neginf=0.0), 0, emax)
        s15 = s * 1.5

        def thr(j: jax.Array) -> jax.Array:  # e >= j  <=>  |v| < 1.5·S·2^-j
            return s15 * jnp.exp2(-j)

        e = jnp.where((e0 < emax) & (a < thr(e0 + 1)), e0 + 1, e0)
        e = jnp.where((e > 0) & (a >= thr(e)), e - 1, e)
        sign = (wg < 0).astype(jnp.float32)
        return (sign * (1 << (b - 1)) + e).astype(jnp.uint8)
    maxq = spec.maxq
    if spec.symmetric:
        mid = 1 << (b - 1)
        q = jnp.clip(jnp.round(wg / s), -mid, mid - 1) + mid
    else:
        assert z is not None  # asymmetric grids have a zero-point
        q = jnp.clip(jnp.round(wg / s) + z, 0, maxq)
    return q.astype(jnp.uint8)


def _values_grouped(wg: jax.Array, s: jax.Array, z: jax.Array | None, spec: QuantSpec) -> jax.Array:
    return dequant_codes(_codes_grouped(wg, s, z, spec), s, z, spec)


def _mse_search(wg: jax.Array, s0: jax.Array, z0: jax.Array | None, lo: jax.Array, hi: jax.Array,
                spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    """GPTQ ``Quantizer.find_params(mse=True)``: shrink the range, keep the first strict minimum."""
    ps = jnp.asarray(np.array([1.0 - i / MSE_GRID for i in range(int(MSE_MAXSHRINK * MSE_GRID))],
                              np.float64).astype(np.float32))

    def cand(p: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        if spec.is_ternary:
            return p * hi, p * lo
        if spec.symmetric:
            return p * hi / float(1 << (int(spec.bits) - 1)), None
        lo1, hi1 = p * lo, p * hi
        s1 = (hi1 - lo1) / spec.maxq
        return s1, jnp.round(-lo1 / s1)

    def body(carry, p):
        best, bs, bz = carry
        s1, z1 = cand(p)
        err = jnp.sum(jnp.abs(_values_grouped(wg, s1, z1, spec) - wg) ** MSE_NORM, axis=-2, keepdims=True)
        better = err < best
        bs = jnp.where(better, s1, bs)
        if bz is not None:
            bz = jnp.where(better, z1, bz)
        return (jnp.where(better, err, best), bs, bz), None

    best0 = jnp.full(s0.shape, jnp.inf, jnp.float32)
    (_, s, z), _ = jax.lax.scan(body, (best0, s0, z0), ps)
    return s, z


def _log_refine(wg: jax.Array, s: jax.Array, spec: QuantSpec, steps: int) -> jax.Array:
    """Marian's MSE fit of the log scale: ``S ← Σ(a·w)/Σ(a·a)`` with ``a = q/S`` (``steps`` times)."""
    def body(_, s):
        codes = _codes_grouped(wg, s, None, spec)
        a = dequant_codes(codes, jnp.ones_like(s), None, spec)
        num = jnp.sum(a * wg, axis=-2, keepdims=True)
        den = jnp.sum(a * a, axis=-2, keepdims=True)
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), s)

    return jax.lax.fori_loop(0, steps, body, s)


def _params_grouped(wg: jax.Array, spec: QuantSpec, log_steps: int) -> tuple[jax.Array, jax.Array | None]:
    """Per-(group, channel) ``(scale, zero)`` shaped ``[*b, G, 1, N]``."""
    if spec.scheme == "log" and not spec.is_ternary:
        s = jnp.max(jnp.abs(wg), axis=-2, keepdims=True)
        if spec.mse and log_steps > 0:
            s = _log_refine(wg, s, spec, log_steps)
        return s, None
    if spec.symmetric and not spec.is_ternary:
        amax = jnp.max(jnp.abs(wg), axis=-2, keepdims=True)
        amax = jnp.where(amax == 0, 1.0, amax)
        s = amax / float(1 << (int(spec.bits) - 1))
        if spec.mse:
            s, _ = _mse_search(wg, s, None, -amax, amax, spec)
        return s, None
    lo = jnp.minimum(jnp.min(wg, axis=-2, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(wg, axis=-2, keepdims=True), 0.0)
    dead = (lo == 0) & (hi == 0)
    lo = jnp.where(dead, -1.0, lo)
    hi = jnp.where(dead, 1.0, hi)
    z: jax.Array | None
    if spec.is_ternary:
        s, z = hi, lo
    else:
        s = (hi - lo) / spec.maxq
        z = jnp.round(-lo / s)
    if spec.mse:
        s, z = _mse_search(wg, s, z, lo, hi, spec)
    return s, z


# --------------------------------------------------------------------------------------------
# public, jittable building blocks (also used by GPTQ and STE)
# --------------------------------------------------------------------------------------------
def find_params(w: jax.Array, spec: QuantSpec, *, log_steps: int = LOG_MSE_STEPS
                ) -> tuple[jax.Array, jax.Array | None]:
    """Grid of ``w [*batch, K, N]``: ``scales [*batch, G, N]`` and ``zeros`` (None if ``not spec.has_zeros``).

    Jittable (``spec``/``log_steps`` static). See the module docstring for each grid's rule.
    """
    wg = _grouped(jnp.asarray(w, jnp.float32), spec)
    s, z = _params_grouped(wg, spec, log_steps)
    s = s[..., 0, :]
    z = None if (z is None or not spec.has_zeros) else z[..., 0, :]
    return s, z


@overload
def _expand(a: jax.Array, k: int) -> jax.Array: ...


@overload
def _expand(a: None, k: int) -> None: ...


def _expand(a: jax.Array | None, k: int) -> jax.Array | None:
    if a is None:
        return None
    if a.shape[-2] == 0 or k % a.shape[-2]:
        raise QuantizationError(f"{a.shape[-2]} groups do not divide K={k}")
    return expand_groups(a, k)


def quantize_codes(w: jax.Array, scales: jax.Array, zeros: jax.Array | None, spec: QuantSpec) -> jax.Array:
    """uint8 codes ``[*batch, K, N]`` of ``w`` on a given grid (``scales``/``zeros`` ``[*batch, G, N]``).

    ``G`` may be any divisor of K (GPTQ calls this on single columns with ``K = G = 1``).
    """
    w = jnp.asarray(w, jnp.float32)
    k = w.shape[-2]
    return _codes_grouped(w, _expand(scales, k), _expand(zeros, k), spec)


def dequantize_grouped(codes: jax.Array, scales: jax.Array, zeros: jax.Array | None, spec: QuantSpec) -> jax.Array:
    """float32 values of unpacked ``codes [*batch, K, N]`` (``dequant_codes`` with groups expanded)."""
    k = codes.shape[-2]
    return dequant_codes(codes, _expand(scales, k), _expand(zeros, k), spec)


def quantize_arrays(w: jax.Array, spec: QuantSpec, *, log_steps: int = LOG_MSE_STEPS
                    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(codes [*b,K,N] uint8, scales [*b,G,N], zeros | None)`` of ``w`` (jittable)."""
    s, z = find_params(w, spec, log_steps=log_steps)
    return quantize_codes(w, s, z, spec), s, z


@partial(jax.jit, static_argnames=("spec", "log_steps"))
def fake_quantize(w: jax.Array, spec: QuantSpec, *, log_steps: int = LOG_MSE_STEPS) -> jax.Array:
    """``quantize_tensor(w).dequantize()`` computed without packing (float32, same ops bit for bit)."""
    codes, s, z = quantize_arrays(w, spec, log_steps=log_steps)
    return dequantize_grouped(codes, s, z, spec)


def representable_range(scales: jax.Array, zeros: jax.Array | None, spec: QuantSpec
                        ) -> tuple[jax.Array, jax.Array]:
    """``(lo, hi)`` per ``[*b, G, N]``: the smallest/largest value the grid can represent."""
    if spec.is_ternary:
        assert zeros is not None
        return zeros, scales
    b = int(spec.bits)
    if spec.scheme == "log":
        return -scales, scales
    if spec.symmetric:
        mid = float(1 << (b - 1))
        return -mid * scales, (mid - 1) * scales
    assert zeros is not None
    return scales * (0.0 - zeros), scales * (spec.maxq - zeros)


@partial(jax.jit, static_argnames=("spec", "log_steps"))
def _quantize_packed(w: jax.Array, spec: QuantSpec, log_steps: int = LOG_MSE_STEPS):
    codes, s, z = quantize_arrays(w, spec, log_steps=log_steps)
    return pack_codes(codes, spec.code_bits), s, z


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def quantize_tensor(w: Any, spec: Any, name: str | None = None, *, log_steps: int = LOG_MSE_STEPS
                    ) -> QuantizedTensor:
    """RTN-quantize one weight ``[*batch, K, N]`` into a packed :class:`QuantizedTensor`.

    Raises :class:`QuantizationError` (naming ``name``) for NaN/inf weights, non-float or <2-D
    input, an invalid spec, or a group size that does not divide K. Large stacked tensors are
    quantized in chunks along the leading (expert) axis.
    """
    spec = as_spec(spec)
    label = name or "weight"
    shape = tuple(getattr(w, "shape", np.shape(w)))
    dtype = jnp.dtype(w.dtype if hasattr(w, "dtype") else np.asarray(w).dtype)
    if len(shape) < 2:
        raise QuantizationError(f"{label}: cannot quantize a {len(shape)}-D tensor {list(shape)} (need [*batch, K, N])")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise QuantizationError(f"{label}: cannot quantize dtype {dtype} (need a float tensor)")
    if dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
        dtype = jnp.dtype(jnp.float32)  # NumPy float64 input: JAX computes and returns float32
    k = shape[-2]
    gs = spec.group_size(k)
    if k % gs:
        raise QuantizationError(f"{label}: group size {gs} does not divide the input dimension K={k} "
                                f"(shape {list(shape)})")
    if isinstance(w, jax.ShapeDtypeStruct):
        packed, s, z = jax.eval_shape(partial(_quantize_packed, spec=spec, log_steps=log_steps), w)
        return QuantizedTensor(packed, s, z, spec, k, dtype)
    w = jnp.asarray(w)
    if not _is_tracer(w):
        bad = int(jnp.sum(~jnp.isfinite(w)))
        if bad:
            raise QuantizationError(f"{label}: {bad} NaN/inf value(s) in a {list(shape)} tensor; refusing to quantize")
    if len(shape) > 2 and not _is_tracer(w) and math.prod(shape) > _CHUNK_ELEMS:
        lead = shape[:-2]
        flat = w.reshape(-1, *shape[-2:])
        per = max(1, _CHUNK_ELEMS // (shape[-2] * shape[-1]))
        parts = [_quantize_packed(flat[i:i + per], spec, log_steps) for i in range(0, flat.shape[0], per)]
        packed = jnp.concatenate([p[0] for p in parts]).reshape(*lead, *parts[0][0].shape[-2:])
        s = jnp.concatenate([p[1] for p in parts]).reshape(*lead, *parts[0][1].shape[-2:])
        z = None if parts[0][2] is None else jnp.concatenate([p[2] for p in parts]).reshape(s.shape)
    else:
        packed, s, z = _quantize_packed(w, spec, log_steps)
    return QuantizedTensor(packed, s, z, spec, k, dtype)
