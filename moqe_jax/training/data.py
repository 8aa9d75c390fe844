"""Data sources of the training loop: a deterministic batch stream (batch ``i`` depends only on the seed and
``i``, so the data position of a resumed run is its step) plus eval batches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from moqe_jax import sharding as shd
from moqe_jax.errors import DataError
from moqe_jax.progress import write
from moqe_jax.training.config import TrainConfig

__all__ = ["Batch", "TrainData", "SyntheticData", "MTData", "MLMData", "load_mt_data", "load_mlm_data"]

Batch = dict[str, np.ndarray]


class TrainData(Protocol):
    """What the loop needs from a data source: a deterministic batch stream and eval batches."""

    def batch(self, index: int) -> Batch: ...

    def batch_rows(self) -> list[int]: ...

    def eval_batches(self, n: int) -> list[Batch]: ...


@dataclass
class SyntheticData:
    """Random seq2seq batches (target = reversed source) for tests: batch ``i`` depends only on ``seed, i``."""

    vocab_size: int
    batch_size: int = 8
    length: int = 16
    seed: int = 0

    def batch(self, index: int) -> Batch:
        from moqe_jax.data.batching import make_batch

        rng = np.random.default_rng([self.seed, int(index)])
        src, tgt = [], []
        for _ in range(self.batch_size):
            n = int(rng.integers(self.length // 2, self.length))
            s = rng.integers(3, self.vocab_size, size=n - 1).astype(np.int32)
            src.append(np.append(s, 1))
            tgt.append(np.append(s[::-1], 1))
        return make_batch(src, tgt, self.length)

    def batch_rows(self) -> list[int]:
        return [self.batch_size]

    def eval_batches(self, n: int) -> list[Batch]:
        return [self.batch(10_000_000 + i) for i in range(n)]


@dataclass
class MTData:
    """The gettext MT corpus, tokenized and length-bucketed (moqe_jax.data)."""

    batcher: Any
    valid: list[Batch]

    def batch(self, index: int) -> Batch:
        return self.batcher.batch(index)

    def batch_rows(self) -> list[int]:
        return sorted({self.batcher.rows_for(b) for b in self.batcher.buckets})

    def eval_batches(self, n: int) -> list[Batch]:
        return self.valid[:n]


def _encode_split(corpus_dir: Path, split: str, tok: Any, max_len: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Tokenize a split once and cache it next to the corpus (keyed by the tokenizer file's hash)."""
    import hashlib

    from moqe_jax.data.batching import encode_pairs
    from moqe_jax.data.corpus import read_jsonl

    h = hashlib.sha1(Path(tok.path).read_bytes()).hexdigest()[:10]
    cache = corpus_dir / f".{split}.{h}.{max_len}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                s_off, t_off = z["src_off"], z["tgt_off"]
                src = np.split(z["src"], s_off[1:-1])
                tgt = np.split(z["tgt"], t_off[1:-1])
            if len(src) == len(s_off) - 1 and len(tgt) == len(t_off) - 1:
                return src, tgt
        except Exception:  # noqa: BLE001,S110 - a truncated/corrupt cache (ours) is rebuilt below
            pass
    import jax

    if jax.process_index() == 0:
        write(f"tokenizing the {split} split of {corpus_dir} (once; cached in {cache.name}) ...")
    rows = read_jsonl(corpus_dir / f"{split}.jsonl")
    src, tgt = encode_pairs(rows, tok, max_len)
    try:
        s_off = np.cumsum([0] + [len(s) for s in src])
        t_off = np.cumsum([0] + [len(t) for t in tgt])
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, src=np.concatenate(src), tgt=np.concatenate(tgt), src_off=s_off, tgt_off=t_off)
        os.replace(tmp, cache)
    except OSError:
        pass
    return src, tgt


def _check_vocab(tok: Any, vocab_size: int | None) -> None:
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise DataError(f"tokenizer {tok.path}: vocabulary of {tok.vocab_size} tokens > the model's vocab_size "
                        f"{vocab_size} (ids beyond it make the loss NaN); use a model with vocab_size >= "
                        f"{tok.vocab_size} (--set vocab_size={tok.vocab_size}) or the matching tokenizer")


def load_mt_data(corpus_dir: str | os.PathLike, tc: TrainConfig, max_len: int = 96, eval_rows: int = 64,
                 tokenizer_dir: str | os.PathLike | None = None, drop_long: bool = True,
                 vocab_size: int | None = None) -> MTData:
    """``MTData`` from a ``moqe data build`` directory (tokenizer in ``<dir>/tokenizer`` unless given).
    ``vocab_size``: the model's; a larger tokenizer vocabulary is a `DataError`.

    Examples longer than ``max_len`` tokens (source or target incl. eos) are dropped from training when
    ``drop_long`` (else truncated); the validation sample keeps only those that fit."""
    from moqe_jax.data.batching import DEFAULT_BUCKETS, BucketBatcher, eval_batches
    from moqe_jax.data.tokenizer import Tokenizer

    d = Path(corpus_dir)
    if not (d / "train.jsonl").is_file():
        raise DataError(f"{d}: no train.jsonl (build the corpus with `moqe data build --out {d}`)")
    tok = Tokenizer(tokenizer_dir or d / "tokenizer")
    _check_vocab(tok, vocab_size)
    buckets = tuple(b for b in DEFAULT_BUCKETS if b <= max_len) or (max_len,)
    src, tgt = _encode_split(d, "train", tok, max_len + 1)
    vsrc, vtgt = _encode_split(d, "valid", tok, max_len + 1)
    if drop_long:  # train on what fits (truncated targets would teach truncated translations)
        keep = [i for i in range(len(src)) if max(len(src[i]), len(tgt[i])) <= max_len]
        src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    vkeep = [i for i in range(len(vsrc)) if max(len(vsrc[i]), len(vtgt[i])) <= max_len]
    vsrc, vtgt = [vsrc[i] for i in vkeep], [vtgt[i] for i in vkeep]
    div = shd.batch_divisor(tc.mesh)
    batcher = BucketBatcher(src, tgt, tc.batch_size, buckets, seed=tc.seed, tokens_per_batch=tc.tokens_per_batch,
                            row_multiple=div)
    # a fixed, direction-balanced validation sample (every 7th example) for the periodic eval loss
    sel = list(range(0, len(vsrc), 7))
    valid = list(eval_batches([vsrc[i] for i in sel], [vtgt[i] for i in sel], eval_rows, buckets))
    return MTData(batcher, valid)


@dataclass
class MLMData:
    """T5 span corruption (noise 0.15, mean span 3) of an English token stream (QMoE-style MLM objective).

    Batch ``i`` depends only on ``(seed, i)`` (`moqe_jax.data.span_corruption.mlm_batches`), so the data
    position is the step, as for `MTData`."""

    token_lists: list[list[int]]
    eval_token_lists: list[list[int]]
    vocab_size: int
    batch_size: int = 32
    inputs_length: int = 32
    seed: int = 0

    def batch(self, index: int) -> Batch:
        from moqe_jax.data.span_corruption import mlm_batches

        return next(mlm_batches(self.token_lists, self.vocab_size, self.batch_size, self.inputs_length,
                                seed=self.seed, start=int(index)))

    def batch_rows(self) -> list[int]:
        return [self.batch_size]

    def eval_batches(self, n: int) -> list[Batch]:
        from moqe_jax.data.span_corruption import mlm_batches

        it = mlm_batches(self.eval_token_lists, self.vocab_size, self.batch_size, self.inputs_length,
                         seed=self.seed + 1)
        return [next(it) for _ in range(n)]


def load_mlm_data(corpus_dir: str | os.PathLike, tc: TrainConfig, inputs_length: int = 32,
                  tokenizer_dir: str | os.PathLike | None = None, vocab_size: int | None = None) -> MLMData:
    """Span-corruption data: the training-split English side (``english.txt``) for training, the English side
    of the validation split for eval (docs/DATA.md: the English sentences of valid/test never occur in train)."""
    from moqe_jax.data.corpus import english_sentences, read_jsonl
    from moqe_jax.data.tokenizer import Tokenizer

    d = Path(corpus_dir)
    if not (d / "english.txt").is_file():
        raise DataError(f"{d}: no english.txt (build the corpus with `moqe data build --out {d}`)")
    tok = Tokenizer(tokenizer_dir or d / "tokenizer")
    _check_vocab(tok, vocab_size)
    train_en = english_sentences(d)
    valid_en = sorted({r["en"] for r in read_jsonl(d / "valid.jsonl")})
    return MLMData(tok.encode_batch(train_en), tok.encode_batch(valid_en), tok.vocab_size, tc.batch_size,
                   inputs_length, tc.seed)
