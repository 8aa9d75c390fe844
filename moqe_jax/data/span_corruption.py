"""T5 span corruption (MLM) for a monolingual English stream (T5 §3.1.4; QMoE's eval loss).

Port of the Hugging Face Flax T5 recipe (``examples/flax/language-modeling/run_t5_mlm_flax.py``:
``compute_input_and_target_lengths``, ``random_spans_noise_mask``, ``create_sentinel_ids``,
``filter_input_ids``), with an explicit ``np.random.Generator`` instead of the global RNG.
Noise density 0.15, mean span length 3; each noise span is replaced by one sentinel in the inputs
(``<extra_id_0>`` = ``vocab_size - 1``, counting down) and the targets are the sentinels followed
by the dropped spans; both end with eos.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from moqe_jax.data.batching import EOS, PAD, Batch, shift_right
from moqe_jax.errors import DataError

__all__ = ["compute_input_and_target_lengths", "random_spans_noise_mask", "create_sentinel_ids",
           "filter_input_ids", "span_corrupt", "pack_stream", "mlm_batches"]


def compute_input_and_target_lengths(inputs_length: int, noise_density: float = 0.15,
                                     mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """Raw token length that, after corruption, yields exactly ``inputs_length`` inputs; and the targets length."""

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_nonnoise = tokens_length - num_noise
        num_spans = int(round(num_noise / mean_noise_span_length))
        return num_nonnoise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inp, tar = lengths(tokens_length)
    if noise_density == 0.5 and tar > inp:
        tokens_length -= 1
        tar -= 1
    return tokens_length, tar


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.arange(num_items - 1) < (num_segments - 1)
    rng.shuffle(mask)
    first_in_segment = np.pad(mask, [[1, 0]])
    segment_id = np.cumsum(first_in_segment)
    _, segment_length = np.unique(segment_id, return_counts=True)
    return segment_length


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """Boolean mask of ``length``: ``round(length·density)`` noise tokens in spans alternating with non-noise
    (the sequence starts with non-noise)."""
    num_noise = int(np.round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_nonnoise = length - num_noise
    num_spans = max(int(np.round(min(num_noise, num_nonnoise) / mean_noise_span_length)), 1)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
    interleaved = np.reshape(np.stack([nonnoise_lengths, noise_lengths], axis=1), [num_spans * 2])
    span_starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros((length,), dtype=np.int8)
    indicator[span_starts] = True
    span_num = np.cumsum(indicator)
    return np.equal(span_num % 2, 1)


def create_sentinel_ids(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Per position: the sentinel id at the start of each masked span, -1 inside spans, 0 elsewhere."""
    mask = mask.astype(np.int32)
    start = mask - np.roll(mask, 1, axis=-1) * mask
    start[:, 0] = mask[:, 0]
    sentinel = np.where(start != 0, np.cumsum(start, axis=-1), start)
    sentinel = np.where(sentinel != 0, vocab_size - sentinel, 0)
    sentinel -= mask - start
    return sentinel


def filter_input_ids(input_ids: np.ndarray, sentinel_ids: np.ndarray, eos: int = EOS) -> np.ndarray:
    """Replace span starts by sentinels, drop the rest of each span, append eos."""
    b = input_ids.shape[0]
    full = np.where(sentinel_ids != 0, sentinel_ids, input_ids)
    out = full[full >= 0].reshape((b, -1))
    return np.concatenate([out, np.full((b, 1), eos, dtype=out.dtype)], axis=-1).astype(np.int32)


def span_corrupt(tokens: np.ndarray, rng: np.random.Generator, vocab_size: int, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0, num_extra_ids: int = 100) -> Batch:
    """``tokens [B, raw_len]`` (no padding) → ``input_ids``, ``targets``, ``decoder_input_ids``, ``weights``."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or (tokens <= 0).any():
        raise DataError("span_corrupt expects a [B, L] array of real (non-pad) token ids")
    if (tokens >= vocab_size - num_extra_ids).any():
        raise DataError("span_corrupt input already contains sentinel ids")
    mask = np.asarray([random_spans_noise_mask(tokens.shape[1], rng, noise_density, mean_noise_span_length)
                       for _ in range(tokens.shape[0])])
    inputs = filter_input_ids(tokens, create_sentinel_ids(mask, vocab_size))
    targets = filter_input_ids(tokens, create_sentinel_ids(~mask, vocab_size))
    return {"input_ids": inputs, "targets": targets, "decoder_input_ids": shift_right(targets, PAD),
            "weights": (targets > 0).astype(np.float32)}


def pack_stream(token_lists: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """Concatenate sentences (each followed by eos) and cut into rows of ``length`` (remainder dropped)."""
    flat = np.fromiter((t for ids in token_lists for t in (*ids, EOS)), dtype=np.int32)
    n = len(flat) // length
    if n == 0:
        raise DataError(f"English stream too short: {len(flat)} tokens < one row of {length}")
    return flat[:n * length].reshape(n, length)


def mlm_batches(token_lists: Sequence[Sequence[int]], vocab_size: int, batch_size: int, inputs_length: int = 64,
                seed: int = 0, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                start: int = 0) -> Iterator[Batch]:
    """Infinite deterministic stream of span-corrupted batches (batch ``i`` depends only on ``seed, i``)."""
    raw_len, _ = compute_input_and_target_lengths(inputs_length, noise_density, mean_noise_span_length)
    rows = pack_stream(token_lists, raw_len)
    i = start
    while True:
        rng = np.random.default_rng([seed, i])
        sel = rng.choice(len(rows), size=batch_size, replace=len(rows) < batch_size)
        yield span_corrupt(rows[sel], rng, vocab_size, noise_density, mean_noise_span_length)
        i += 1
