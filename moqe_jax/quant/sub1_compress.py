"""Whole-model sub-1-bit compression (QMoE §4, ``moqe_jax.pipeline.compress_sub1``): every ternary
channel-wise expert becomes a :class:`~moqe_jax.packed.sub1.Sub1Tensor`; returns ``(result, Sub1Report)``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from moqe_jax.errors import QuantizationError
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.sub1 import Sub1Tensor
from moqe_jax.quant.protocols import M
from moqe_jax.quant.sub1 import encode, pair_symbols

__all__ = ["Sub1Report", "compress_params", "compress_model"]


@dataclasses.dataclass
class Sub1Report:
    """What sub-1-bit compression stored: over the encoded weights, their stored bits and the ratio to
    bf16; the order-0 entropy and zero fraction of their ternary symbols (None when nothing new was
    encoded); ``skipped``: ternary leaves that have no QMoE representation (group-wise)."""

    tensors: int = 0
    params: int = 0
    bits: float = 0.0
    bits_per_param: float = 0.0
    ratio_vs_bf16: float = 0.0
    entropy_bits: float | None = None
    zero_fraction: float | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        extra = f", entropy {self.entropy_bits:.3f} bits" if self.entropy_bits is not None else ""
        return (f"sub1: {self.tensors} tensors, {self.params:,} params, {self.bits_per_param:.3f} bits/param = "
                f"{self.ratio_vs_bf16:.2f}x vs bf16{extra}")


def compress_params(params: Any, *, verbose: bool = False) -> tuple[Any, Sub1Report]:
    """Replace every ternary channel-wise QuantizedTensor leaf by its :class:`Sub1Tensor` -> ``(tree, report)``.

    Existing ``Sub1Tensor`` leaves are kept and counted in the report.
    """
    report = Sub1Report()
    symbol_counts = np.zeros(3, np.int64)

    def count(st: Sub1Tensor) -> None:
        report.params += st.size
        report.bits += 8.0 * st.nbytes
        report.tensors += 1

    def conv(path: Any, x: Any) -> Any:
        nonlocal symbol_counts
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if isinstance(x, Sub1Tensor):
            count(x)
            return x
        if not (isinstance(x, QuantizedTensor) and x.spec.is_ternary):
            return x
        if x.scales.shape[-2] != 1:
            report.skipped.append(name)
            return x
        st = encode(x, name=name)
        count(st)
        pairs = pair_symbols(x).reshape(-1)
        symbol_counts += np.bincount(np.concatenate([pairs % 3, pairs // 3]), minlength=3)[:3]
        if verbose:
            print(f"sub1 {name}: {st.shape} {st.bits_per_param:.3f} bits/param "
                  f"({16 / st.bits_per_param:.2f}x vs bf16)")
        return st

    new = jax.tree_util.tree_map_with_path(conv, params, is_leaf=lambda x: isinstance(x, (QuantizedTensor, Sub1Tensor)))
    n = max(1, report.params)
    report.bits_per_param = report.bits / n
    report.ratio_vs_bf16 = 16.0 * n / max(1.0, report.bits)
    c = symbol_counts.astype(np.float64)
    if c.sum():
        p = c[c > 0] / c.sum()
        report.entropy_bits = float(-(p * np.log2(p)).sum())
        report.zero_fraction = float(c[0] / c.sum())
    return new, report


def compress_model(model: M, *, verbose: bool = True) -> tuple[M, Sub1Report]:
    """QMoE sub-1-bit code for every ternary expert of ``model`` -> ``(model.replace(params=…), report)``."""
    new_params, report = compress_params(model.params, verbose=verbose)
    if report.tensors == 0:
        raise QuantizationError("compress_sub1: the model has no ternary channel-wise QuantizedTensor "
                                "(quantize the experts with bits='ternary' first)")
    if verbose:
        print(report.summary())
    return model.replace(params=new_params), report
