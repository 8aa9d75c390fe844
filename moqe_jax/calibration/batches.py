"""Calibration batches for GPTQ (QMoE §3): checked here before a long run starts."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from moqe_jax.errors import DataError

__all__ = ["validate_batches"]


def validate_batches(calib: Iterable[dict], vocab: int) -> list[dict[str, np.ndarray]]:
    """Materialise and check calibration batches -> list of int32 ``[batch, length]`` dicts.

    Each batch needs ``input_ids`` and ``decoder_input_ids`` (optional ``attention_mask``,
    ``decoder_attention_mask``); ids must lie in ``[0, vocab)``. Raises :class:`DataError`."""
    out = []
    for bi, batch in enumerate(calib):
        if not isinstance(batch, dict) or "input_ids" not in batch or "decoder_input_ids" not in batch:
            raise DataError(f"calibration batch {bi}: expected a dict with 'input_ids' and 'decoder_input_ids'")
        b: dict[str, np.ndarray] = {}
        for key in ("input_ids", "decoder_input_ids", "attention_mask", "decoder_attention_mask"):
            if batch.get(key) is None:
                continue
            a = np.asarray(batch[key])
            if a.ndim == 1:
                a = a[None]
            if a.ndim != 2 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
                raise DataError(f"calibration batch {bi}: {key} must be an integer [batch, length] array, "
                                f"got {a.dtype}{list(a.shape)}")
            if key.endswith("ids") and a.size and (a.min() < 0 or a.max() >= vocab):
                raise DataError(f"calibration batch {bi}: {key} has ids outside [0, {vocab})")
            b[key] = a.astype(np.int32)
        if b["input_ids"].shape[0] != b["decoder_input_ids"].shape[0]:
            raise DataError(f"calibration batch {bi}: input_ids and decoder_input_ids batch sizes differ")
        out.append(b)
    if not out:
        raise DataError("calibration data is empty")
    return out
