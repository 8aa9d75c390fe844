"""GPTQ calibration of whole models (QMoE §3): the layer-by-layer driver with resumable progress and the
calibration batches it consumes. Sits above ``moqe_jax.quant`` (the solver, Hessians, layer runner) and
``moqe_jax.checkpoint`` (the store the progress is saved with)."""

from moqe_jax.calibration.batches import calibration_batches, jsonl_batches, synthetic_batches, validate_batches
from moqe_jax.calibration.driver import GPTQ_COMPONENTS, gptq_quantize_model
from moqe_jax.quant.calibration_report import CalibrationReport, LayerReport

__all__ = ["CalibrationReport", "GPTQ_COMPONENTS", "LayerReport", "calibration_batches", "gptq_quantize_model",
           "jsonl_batches", "synthetic_batches", "validate_batches"]
