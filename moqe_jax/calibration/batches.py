"""Calibration batches for GPTQ (QMoE §3, §C) — the one pipeline used by ``moqe compress``, ``moqe demo``
and eval/reproduce_qmoe.py.

:func:`calibration_batches` tokenizes text: ``mode="mt"`` (default) takes (source, target) translation
pairs, which is how the README's QMoE numbers were calibrated (QMoE calibrates on its task's data;
ours is MT); ``mode="span"`` takes English sentences and T5 span corruption (QMoE's own pre-training
objective). :func:`synthetic_batches` and :func:`jsonl_batches` are the token-level sources of the CLI;
:func:`validate_batches` checks any source before a long run starts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from moqe_jax.data.batching import EOS, shift_right
from moqe_jax.data.span_corruption import mlm_batches
from moqe_jax.data.tokenizer import encode_text, tokenizer_vocab_size
from moqe_jax.errors import DataError

__all__ = ["calibration_batches", "synthetic_batches", "jsonl_batches", "validate_batches"]

Batch = dict[str, np.ndarray]


def _pad_rows(rows: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad with 0 to ``length`` (default: the longest row) -> ``(ids, mask)`` int32; a row longer
    than ``length`` is cut keeping its final token (EOS)."""
    n = length or max(1, max(len(r) for r in rows))
    ids = np.zeros((len(rows), n), np.int32)
    mask = np.zeros((len(rows), n), np.int32)
    for i, r in enumerate(rows):
        r = list(r) if len(r) <= n else [*r[:n - 1], r[-1]]
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def _pair(r: Any) -> tuple[str, str]:
    if isinstance(r, Mapping):
        return r["src"], r["tgt"]
    src, tgt = r
    return src, tgt


def calibration_batches(tokenizer: Any, texts_or_pairs: Sequence[Any], *, mode: Literal["mt", "span"] = "mt",
                        n: int = 512, batch_size: int = 16, seed: int = 0, max_len: int = 64) -> list[Batch]:
    """GPTQ calibration data as ``{"input_ids", "decoder_input_ids"}`` int32 NumPy batches.

    ``mode="mt"``: ``texts_or_pairs`` are translation pairs (``(src, tgt)`` tuples or corpus rows with
    ``"src"``/``"tgt"``); ``n`` of them drawn with ``random.Random(seed)``, each side + EOS (1), padded with
    0 to the longest in all batches (at most ``max_len``), decoder inputs = targets shifted right behind
    the start id 0. ``mode="span"``: ``texts_or_pairs`` are English sentences, concatenated and
    span-corrupted (noise 0.15, mean span 3; ``moqe_jax.data.span_corruption``) into ``n`` rows of
    ``max_len`` encoder tokens, sentinels at the top of the tokenizer's vocabulary.
    ``tokenizer``: ``moqe_jax.data.tokenizer.Tokenizer`` or any object with ``encode``.
    """
    if n <= 0 or batch_size <= 0:
        raise DataError(f"calibration: n ({n}) and batch_size ({batch_size}) must be positive")
    if not texts_or_pairs:
        raise DataError("calibration: no text given")
    if mode == "mt":
        pairs = [_pair(r) for r in texts_or_pairs]
        pick = random.Random(seed).sample(range(len(pairs)), min(n, len(pairs)))
        ex = [(encode_text(tokenizer, pairs[i][0]) + [EOS], encode_text(tokenizer, pairs[i][1]) + [EOS])
              for i in pick]
        s_len = min(max(len(e[0]) for e in ex), max_len)
        t_len = min(max(len(e[1]) for e in ex), max_len)
        out = []
        for b0 in range(0, len(ex), batch_size):
            chunk = ex[b0:b0 + batch_size]
            x, _ = _pad_rows([c[0] for c in chunk], s_len)
            y, _ = _pad_rows([c[1] for c in chunk], t_len)
            out.append({"input_ids": x, "decoder_input_ids": shift_right(y)})
        return out
    if mode == "span":
        token_lists = [encode_text(tokenizer, t) for t in list(texts_or_pairs)[:max(4 * n, 1000)]]
        it = mlm_batches(token_lists, tokenizer_vocab_size(tokenizer), batch_size, inputs_length=max_len, seed=seed)
        out = []
        for s in range(0, n, batch_size):
            b = next(it)
            k = min(batch_size, n - s)
            out.append({"input_ids": b["input_ids"][:k], "decoder_input_ids": b["decoder_input_ids"][:k]})
        return out
    raise DataError(f"calibration mode {mode!r}: use 'mt' (translation pairs) or 'span' (span corruption)")


def synthetic_batches(vocab: int, n: int, seq_len: int, batch_size: int, seed: int = 0) -> list[Batch]:
    """Zipf-distributed ids with local repetition (seeded); decoder = start token + half-length targets.
    For smoke tests of models without a tokenizer."""
    rng = np.random.default_rng(seed)
    t = max(2, seq_len // 2)
    out = []
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        ids = np.minimum(rng.zipf(1.3, size=(b, seq_len + t)), vocab - 1).astype(np.int32)
        ids = np.where(rng.random(ids.shape) < 0.3, np.roll(ids, 1, axis=1), ids)
        ids = np.maximum(ids, 2)
        dec = np.concatenate([np.zeros((b, 1), np.int32), ids[:, seq_len:seq_len + t - 1]], axis=1)
        out.append({"input_ids": ids[:, :seq_len], "decoder_input_ids": dec})
    return out


def jsonl_batches(path: str, n: int, batch_size: int) -> list[Batch]:
    """Token ids from a JSONL file: one object per line with ``input_ids`` and ``decoder_input_ids`` (or
    ``targets``, shifted right behind the start id 0); the first ``n`` lines, padded with attention masks."""
    rows_in, rows_dec = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    enc = [int(t) for t in r["input_ids"]]
                    if "decoder_input_ids" in r:
                        dec = [int(t) for t in r["decoder_input_ids"]]
                    else:
                        dec = [0] + [int(t) for t in r["targets"]][:-1]
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{path}:{ln}: expected input_ids and decoder_input_ids/targets id lists ({e})"
                                    ) from None
                rows_in.append(enc)
                rows_dec.append(dec)
                if len(rows_in) >= n:
                    break
    except OSError as e:
        raise DataError(f"{path}: cannot read calibration data ({e.strerror})") from None
    if not rows_in:
        raise DataError(f"{path}: no calibration sample")
    out = []
    for s in range(0, len(rows_in), batch_size):
        ids, am = _pad_rows(rows_in[s:s + batch_size])
        dids, dm = _pad_rows(rows_dec[s:s + batch_size])
        dm[:, 0] = 1  # the decoder start token (id 0) is a real position
        out.append({"input_ids": ids, "attention_mask": am, "decoder_input_ids": dids, "decoder_attention_mask": dm})
    return out


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
