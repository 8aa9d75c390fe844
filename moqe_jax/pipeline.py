"""The main jobs as functions (docs/ARCHITECTURE.md): the CLI, train/ and eval/ call these.

Thin dispatch to the modules that implement each paper concept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from moqe_jax.packed.spec import QuantSpec

if TYPE_CHECKING:  # annotations only: the jobs import their modules lazily (fast CLI start)
    from moqe_jax.api import Model
    from moqe_jax.evaluate import EvalResult
    from moqe_jax.quant.sub1_compress import Sub1Report


def quantize(model: Model, spec: QuantSpec, components: Sequence[str] = ("experts",),
             method: str = "rtn", calib: Iterable[dict] | None = None, **kwargs: Any) -> Model:
    """Quantize the selected components of ``model`` (MoQE RTN or QMoE GPTQ) -> new ``Model``.

    GPTQ's per-layer :class:`~moqe_jax.calibration.CalibrationReport` comes with
    :func:`moqe_jax.calibration.gptq_quantize_model`, which returns ``(model, report)``."""
    if method == "rtn":
        from moqe_jax.quant.policy import quantize_model_rtn

        return quantize_model_rtn(model, spec, components=components, **kwargs)
    if method == "gptq":
        from moqe_jax.calibration import gptq_quantize_model

        if calib is None:
            raise ValueError("method='gptq' needs calibration data (calib=...)")
        return gptq_quantize_model(model, spec, calib, components=components, **kwargs)[0]
    raise ValueError(f"unknown method {method!r}; choose 'rtn' or 'gptq'")


def compress_sub1(model: Model, *, verbose: bool = True) -> tuple[Model, Sub1Report]:
    """QMoE sub-1-bit dictionary code for every ternary expert of ``model`` -> ``(new Model, Sub1Report)``."""
    from moqe_jax.quant.sub1_compress import compress_model

    return compress_model(model, verbose=verbose)


def evaluate(model: Model, **kwargs: Any) -> EvalResult:
    """BLEU/chrF and MLM loss (eval/)."""
    from moqe_jax.evaluate import evaluate_model

    return evaluate_model(model, **kwargs)
