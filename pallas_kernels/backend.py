"""The ONE place that decides how a Pallas kernel runs (docs/ARCHITECTURE.md, "Kernels"; docs/JAX_NOTES.md §4).

* NVIDIA GPU: the Pallas **Triton** lowering, selected by passing
  ``compiler_params=plgpu.CompilerParams(num_warps=, num_stages=)`` (jax >= 0.9.1 has no ``backend=``
  argument and defaults to Mosaic GPU otherwise). jax 0.11 deprecates this backend with a
  ``jax-pallas-triton`` DeprecationWarning; we filter exactly that warning around our own calls.
* CPU (tests): ``interpret=True`` runs the same kernel body as a jitted scan over the grid.
* Anything else: :func:`pallas_call` raises a one-line :class:`KernelBackendError`.

Every kernel in ``pallas_kernels`` (also the sub-1-bit one) launches through :func:`pallas_call`, so the
Triton deprecation-warning filter below is the only one in the project.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax

try:  # feature-detect the Triton lowering (removed from some future jax; see docs/JAX_NOTES.md §4.3)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    _HAS_TRITON = hasattr(plgpu, "CompilerParams")
except ImportError:  # pragma: no cover - depends on the installed jax
    pl = None  # type: ignore[assignment]
    plgpu = None  # type: ignore[assignment]
    _HAS_TRITON = False

__all__ = ["KernelBackendError", "gpu_kernels_available", "pallas_call", "triton_available", "pl", "plgpu"]


class KernelBackendError(RuntimeError):
    """No way to run a Pallas kernel here (no NVIDIA GPU with the Triton lowering, interpret not asked)."""


def triton_available() -> bool:
    """Whether this jax ships the Pallas Triton lowering (``jax.experimental.pallas.triton``)."""
    return _HAS_TRITON


@functools.lru_cache(maxsize=1)
def _gpu_platform() -> str | None:
    try:
        devs = jax.devices()
    except RuntimeError:  # pragma: no cover
        return None
    if not devs or devs[0].platform != "gpu":
        return None
    kind = getattr(devs[0], "device_kind", "") or ""
    client = getattr(devs[0], "client", None)
    ver = str(getattr(client, "platform_version", "")).lower()
    if "rocm" in ver or "hip" in ver or "amd" in kind.lower():
        return "rocm"
    return "cuda"


def gpu_kernels_available() -> bool:
    """True when the default device is an NVIDIA GPU and the Pallas Triton lowering is importable."""
    return _HAS_TRITON and _gpu_platform() == "cuda"


def pallas_call(kernel: Callable[..., None], *, out_shape: Any, grid: tuple[int, ...],
                interpret: bool = False, num_warps: int = 4, num_stages: int = 3,
                name: str | None = None, **kwargs: Any) -> Callable[..., Any]:
    """``pl.pallas_call`` bound to the right backend; returns the callable like ``pl.pallas_call``.

    ``interpret=True`` always works (CPU tests); otherwise an NVIDIA GPU with the Triton lowering is
    required and a :class:`KernelBackendError` names what is missing.
    """
    if pl is None:
        raise KernelBackendError("jax.experimental.pallas is not importable in this jax; use kernel mode 'xla'")
    if interpret:
        return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=True, name=name, **kwargs)
    if not _HAS_TRITON:
        raise KernelBackendError(f"jax {jax.__version__} has no Pallas Triton lowering "
                                 "(jax.experimental.pallas.triton); use kernel mode 'xla' or 'interpret'")
    if _gpu_platform() != "cuda":
        raise KernelBackendError(f"Pallas kernels need an NVIDIA GPU (default backend is {jax.default_backend()!r}); "
                                 "use kernel mode 'xla', or 'interpret' for CPU tests")
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    call = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=False, name=name,
                          compiler_params=params, **kwargs)

    @functools.wraps(call)
    def run(*args: Any) -> Any:
        # jax >= 0.11 marks the Triton backend deprecated (DeprecationWarning 'jax-pallas-triton'). We use it
        # deliberately (Mosaic GPU has no sub-byte/mixed-input path we can use; docs/JAX_NOTES.md §4.2), so that one
        # warning is silenced here and nowhere else.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"(?is).*triton.*")
            return call(*args)

    return run
