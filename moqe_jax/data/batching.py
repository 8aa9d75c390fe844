"""Length-bucketed batching for seq2seq training (NumPy only).

Every example is padded to the smallest bucket length ≥ max(len(src), len(tgt)), so the jitted
train step sees at most ``len(buckets)`` shapes (limits recompiles). Batches are a deterministic
function of ``(seed, global batch index)``: epoch ``e`` shuffles examples with
``default_rng([seed, e])``, chunks each bucket into batches and shuffles the batch order. The
data position of a run is therefore ONE integer (the next global batch index), which the
training loop checkpoints and resumes from.

T5 conventions: ``targets = tgt + [eos]``, ``decoder_input_ids`` = targets shifted right with
``decoder_start = pad = 0``; ``weights = targets > 0`` (spec §4.4 / T5X ``NUM_REAL_TARGET_TOKENS``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from moqe_jax.errors import DataError

__all__ = ["Batch", "encode_pairs", "shift_right", "make_batch", "BucketBatcher", "eval_batches", "DEFAULT_BUCKETS"]

Batch = dict[str, np.ndarray]
DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 64, 96)
PAD, EOS = 0, 1


def encode_pairs(rows: Sequence[dict], tokenizer, max_len: int = DEFAULT_BUCKETS[-1],
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Tokenize corpus rows → (source ids + eos, target ids + eos), truncated to ``max_len`` (eos kept)."""
    src = tokenizer.encode_batch([r["src"] for r in rows])
    tgt = tokenizer.encode_batch([r["tgt"] for r in rows])

    def fin(ids: list[int]) -> np.ndarray:
        return np.asarray(ids[:max_len - 1] + [EOS], dtype=np.int32)

    return [fin(s) for s in src], [fin(t) for t in tgt]


def shift_right(targets: np.ndarray, start: int = PAD) -> np.ndarray:
    """Decoder inputs: ``[start, t_0, ..., t_{L-2}]`` (T5 teacher forcing)."""
    out = np.full_like(targets, PAD)
    out[:, 1:] = targets[:, :-1]
    out[:, 0] = start
    return out


def make_batch(src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], length: int, rows: int | None = None) -> Batch:
    """Pad a list of examples into one batch of ``rows`` rows (extra rows are all padding, weight 0)."""
    n = len(src)
    rows = n if rows is None else rows
    inp = np.zeros((rows, length), np.int32)
    tar = np.zeros((rows, length), np.int32)
    for i in range(n):
        s, t = src[i][:length], tgt[i][:length]
        inp[i, :len(s)] = s
        tar[i, :len(t)] = t
    return {"input_ids": inp, "decoder_input_ids": shift_right(tar), "targets": tar,
            "weights": (tar > 0).astype(np.float32)}


def _bucket_of(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    b = np.searchsorted(np.asarray(buckets), lengths, side="left")
    return np.minimum(b, len(buckets) - 1)


@dataclass
class BucketBatcher:
    """Infinite deterministic stream of bucketed training batches.

    ``batch_size`` rows per batch; with ``tokens_per_batch`` the rows of a bucket of length L are
    ``tokens_per_batch // L`` rounded down to a multiple of ``row_multiple`` (the data-axis size),
    so short buckets carry more sentences for the same compute.
    """

    src: Sequence[np.ndarray]
    tgt: Sequence[np.ndarray]
    batch_size: int
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    seed: int = 0
    tokens_per_batch: int | None = None
    row_multiple: int = 1

    def __post_init__(self) -> None:
        if len(self.src) != len(self.tgt):
            raise DataError(f"source/target count mismatch: {len(self.src)} vs {len(self.tgt)}")
        if not self.src:
            raise DataError("cannot batch an empty dataset")
        if self.batch_size <= 0 or self.batch_size % self.row_multiple:
            raise DataError(f"batch_size {self.batch_size} must be a positive multiple of {self.row_multiple}")
        self.buckets = tuple(sorted(self.buckets))
        lens = np.asarray([max(len(s), len(t)) for s, t in zip(self.src, self.tgt, strict=True)])
        self._bucket = _bucket_of(lens, self.buckets)
        self._plan_epoch: int | None = None
        self._plan: list[tuple[int, np.ndarray]] = []
        self._per_epoch = len(self._make_plan(0))

    def rows_for(self, length: int) -> int:
        if self.tokens_per_batch is None:
            return self.batch_size
        r = (self.tokens_per_batch // length) // self.row_multiple * self.row_multiple
        return max(self.row_multiple, r)

    def _make_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.src))
        plan: list[tuple[int, np.ndarray]] = []
        for b, length in enumerate(self.buckets):
            idx = perm[self._bucket[perm] == b]
            rows = self.rows_for(length)
            for k in range(len(idx) // rows):  # drop the remainder (it comes back next epoch)
                plan.append((length, idx[k * rows:(k + 1) * rows]))
        if not plan:  # dataset smaller than one batch: repeat it to fill one
            length = self.buckets[int(self._bucket.max())]
            rows = self.rows_for(length)
            plan.append((length, np.resize(perm, rows)))
        order = rng.permutation(len(plan))
        return [plan[i] for i in order]

    @property
    def batches_per_epoch(self) -> int:
        return self._per_epoch

    def batch(self, index: int) -> Batch:
        """The ``index``-th batch of the infinite stream (deterministic)."""
        epoch, k = divmod(int(index), self._per_epoch)
        if self._plan_epoch != epoch:
            self._plan = self._make_plan(epoch)
            self._plan_epoch = epoch
        length, idx = self._plan[k % len(self._plan)]
        return make_batch([self.src[i] for i in idx], [self.tgt[i] for i in idx], length)

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        i = start
        while True:
            yield self.batch(i)
            i += 1


def eval_batches(src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], batch_size: int,
                 buckets: Sequence[int] = DEFAULT_BUCKETS) -> Iterator[Batch]:
    """Every example exactly once, in bucket order; the last batch of a bucket is padded with empty rows."""
    buckets = tuple(sorted(buckets))
    lens = np.asarray([max(len(s), len(t)) for s, t in zip(src, tgt, strict=True)])
    bkt = _bucket_of(lens, buckets) if len(lens) else np.zeros(0, int)
    for b, length in enumerate(buckets):
        idx = np.nonzero(bkt == b)[0]
        for k in range(0, len(idx), batch_size):
            sel = idx[k:k + batch_size]
            yield make_batch([src[i] for i in sel], [tgt[i] for i in sel], length, rows=batch_size)
