"""moqe-jax: MoQE low-bit expert quantization and QMoE sub-1-bit compression for Switch MoE in JAX.

Public API (docs/ARCHITECTURE.md): ``SwitchConfig``, ``load_model``, ``Model``, ``QuantSpec``,
``QuantizedTensor``, ``quantize``, ``compress_sub1``, ``enable_compilation_cache``. Imported lazily so
that ``import moqe_jax`` stays cheap (and changes no JAX setting).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SwitchConfig": "moqe_jax.config",
    "load_model": "moqe_jax.api",
    "save_model": "moqe_jax.api",
    "Model": "moqe_jax.api",
    "QuantSpec": "moqe_jax.packed.spec",
    "QuantizedTensor": "moqe_jax.packed.qtensor",
    "Sub1Tensor": "moqe_jax.packed.sub1",
    "quantize": "moqe_jax.pipeline",
    "compress_sub1": "moqe_jax.pipeline",
    "evaluate": "moqe_jax.pipeline",
    "calibration_batches": "moqe_jax.calibration",
    "qmatmul": "moqe_jax.ops",
    "enable_compilation_cache": "moqe_jax.cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moqe_jax' has no attribute {name!r}")
