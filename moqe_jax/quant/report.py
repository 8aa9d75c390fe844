"""Model size report per component (MoQE headline: 2-bit experts → 79.6 % smaller than the fp16 MoE).

``size_report(model)`` measures the REAL storage of every leaf: ``QuantizedTensor.nbytes`` (packed
codes + scales + zeros) or a codec's ``nbytes``; float leaves count as stored in ``float_dtype``
(default bfloat16 = how the non-quantized weights are deployed in MoQE/QMoE's accounting; pass
``float_dtype=None`` for the leaves' actual in-memory dtype). Baselines: every parameter in
bf16/fp16 (2 bytes) and in fp32 (4 bytes).

``projected_report(config, spec, components)`` builds the quantized layout of a preset without
allocating a single weight: parameter shapes come from ``jax.eval_shape`` of the model init, and
each selected leaf is "quantized" with :func:`moqe_jax.quant.rtn.quantize_tensor` on a
``jax.ShapeDtypeStruct`` (itself ``jax.eval_shape`` of the real quantizer), so the bytes are those of
the real packed arrays. ``moqe_5p3b_config()`` is MoQE's 5.3B MT model as recalled in
docs/MOQE.md §3 (24/12 layers, D=1024, F=4096, 32 experts every other layer, vocab ≈125k).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax.errors import QuantizationError
from moqe_jax.model.components import COMPONENTS, component_of
from moqe_jax.packed import is_packed
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.policy import DEFAULT_COMPONENTS, plan_quantization
from moqe_jax.quant.rtn import as_spec, quantize_tensor
from moqe_jax.tree import flatten_params, unflatten_params

__all__ = ["ComponentSize", "SizeReport", "size_report", "projected_report", "moqe_5p3b_config", "leaf_nbytes"]


@dataclass
class ComponentSize:
    """Storage of one component (or the total)."""

    component: str
    params: int = 0
    quantized_params: int = 0
    bytes_after: int = 0
    formats: set[str] = field(default_factory=set)

    @property
    def bytes_16bit(self) -> int:
        """bf16 / fp16 baseline (2 bytes per parameter)."""
        return 2 * self.params

    @property
    def bytes_fp32(self) -> int:
        return 4 * self.params

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.bytes_after / max(1, self.params)

    @property
    def reduction_vs_16bit(self) -> float:
        """Fraction saved relative to the 16-bit model (MoQE's "79.6 % smaller than fp16")."""
        return 1.0 - self.bytes_after / max(1, self.bytes_16bit)

    @property
    def reduction_vs_fp32(self) -> float:
        return 1.0 - self.bytes_after / max(1, self.bytes_fp32)

    def add(self, other: ComponentSize) -> None:
        self.params += other.params
        self.quantized_params += other.quantized_params
        self.bytes_after += other.bytes_after
        self.formats |= other.formats

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "quantized_params": self.quantized_params, "bytes_after": self.bytes_after,
                "bytes_bf16": self.bytes_16bit, "bytes_fp16": self.bytes_16bit, "bytes_fp32": self.bytes_fp32,
                "bits_per_param": self.bits_per_param, "reduction_vs_bf16": self.reduction_vs_16bit,
                "reduction_vs_fp32": self.reduction_vs_fp32, "formats": sorted(self.formats)}


def fmt_bytes(n: float) -> str:
    """Decimal units (MB = 10^6 bytes): the one unit system of every size table."""
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    """A parameter count with a T/B/M/K suffix."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


@dataclass
class SizeReport:
    """Per-component sizes; ``total`` sums them. ``format_table()`` renders a plain-text table."""

    components: dict[str, ComponentSize]
    name: str = ""
    float_dtype: str | None = "bfloat16"
    projected: bool = False

    @property
    def total(self) -> ComponentSize:
        t = ComponentSize("total")
        for c in self.components.values():
            t.add(c)
        return t

    def __getitem__(self, component: str) -> ComponentSize:
        return self.components[component]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "projected": self.projected, "float_dtype": self.float_dtype,
                "components": {k: v.to_dict() for k, v in self.components.items()}, "total": self.total.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        head = ("component", "params", "quantized", "bits/param", "fp32", "bf16/fp16", "after", "vs 16-bit", "format")
        rows = []
        for c in [*self.components.values(), self.total]:
            rows.append((c.component, fmt_count(c.params), f"{c.quantized_params / max(1, c.params):.1%}",
                         f"{c.bits_per_param:.3f}", fmt_bytes(c.bytes_fp32), fmt_bytes(c.bytes_16bit),
                         fmt_bytes(c.bytes_after), f"{0.0 - c.reduction_vs_16bit + 0.0:+.1%}",
                         ", ".join(sorted(c.formats)) if c.component != "total" else ""))
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        line = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
        title = f"size report: {self.name}" + (" (projected, no weights allocated)" if self.projected else "")
        fl = (f"non-quantized weights counted as {self.float_dtype}" if self.float_dtype
              else "float leaves at their dtype")
        out = [title, line.format(*head), sep, *(line.format(*r) for r in rows[:-1]), sep, line.format(*rows[-1]),
               f"({fl}; 'after' = real bytes of packed codes + scales/zeros)"]
        return "\n".join(out)

    __str__ = format_table


def leaf_nbytes(leaf: Any, float_dtype: str | None = "bfloat16") -> tuple[int, int, str]:
    """``(params, stored bytes, format)`` of one parameter leaf."""
    if is_packed(leaf):
        spec = getattr(leaf, "spec", None)
        fmt = spec.describe() if spec is not None else type(leaf).__name__
        return int(math.prod(leaf.shape)), int(leaf.nbytes), fmt
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    n = int(math.prod(shape))
    dt = jnp.dtype(float_dtype) if float_dtype else jnp.dtype(getattr(leaf, "dtype", np.float32))
    return n, n * dt.itemsize, str(dt)


def size_report(model_or_params: Any, config: Any = None, *, float_dtype: str | None = "bfloat16",
                name: str | None = None) -> SizeReport:
    """Per-component parameter counts and storage of a model or params tree (real ``nbytes``)."""
    params = getattr(model_or_params, "params", model_or_params)
    config = config if config is not None else getattr(model_or_params, "config", None)
    comps: dict[str, ComponentSize] = {}
    for path, leaf in flatten_params(params).items():
        if leaf is None:
            continue
        try:
            comp = component_of(path)
        except KeyError:
            comp = "other"
        n, nb, fmt = leaf_nbytes(leaf, float_dtype)
        row = comps.setdefault(comp, ComponentSize(comp))
        row.add(ComponentSize(comp, n, n if is_packed(leaf) else 0, nb, {fmt}))
    order = [*COMPONENTS, "other"]
    comps = {c: comps[c] for c in order if c in comps}
    return SizeReport(comps, name or getattr(config, "name", "") or "", float_dtype)


def moqe_5p3b_config() -> Any:
    """MoQE's 5.3B multilingual MT MoE (docs/MOQE.md §3, recalled shapes; not a preset)."""
    from moqe_jax.config import SwitchConfig

    cfg = SwitchConfig.preset("switch-large-128", num_layers=24, num_decoder_layers=12, num_experts=32,
                              vocab_size=125_000, encoder_sparse_step=2, decoder_sparse_step=2)
    return cfg.replace(name="moqe-5.3b")


def _resolve_config(config: Any) -> Any:
    if isinstance(config, str):
        if config in ("moqe-5.3b", "moqe-5p3b"):
            return moqe_5p3b_config()
        from moqe_jax.config import SwitchConfig

        return SwitchConfig.preset(config)
    return config


def projected_report(config: Any, spec: QuantSpec | None, components: str | Sequence[str] | None = DEFAULT_COMPONENTS,
                     *, overrides: Mapping[str, Any] | None = None, float_dtype: str | None = "bfloat16"
                     ) -> SizeReport:
    """Size report of ``config`` (a ``SwitchConfig`` or preset name, or ``"moqe-5.3b"``) quantized with
    ``spec`` on ``components`` — computed on shapes only (``jax.eval_shape``), nothing allocated.
    ``spec=None`` gives the unquantized model."""
    from moqe_jax.model.switch import init_params

    cfg = _resolve_config(config)
    shapes = jax.eval_shape(lambda: init_params(cfg, 0))
    if spec is not None:
        spec = as_spec(spec)
        plan = plan_quantization(shapes, spec, components, overrides)
        flat = flatten_params(shapes)
        for path, sp in plan.items():
            sds = flat[path]
            if not isinstance(sds, jax.ShapeDtypeStruct):
                raise QuantizationError(f"{path}: expected an abstract shape, got {type(sds).__name__}")
            flat[path] = quantize_tensor(sds, sp, name=path)
        shapes = unflatten_params(flat)
    rep = size_report(shapes, cfg, float_dtype=float_dtype)
    rep.projected = True
    return rep
