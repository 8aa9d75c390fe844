"""Tokenizer (reproducible, T5 ids), length-bucketed batching, T5 span corruption (HF Flax recipe invariants)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from moqe_jax.data.batching import BucketBatcher, eval_batches, make_batch, shift_right
from moqe_jax.data.span_corruption import (
    compute_input_and_target_lengths,
    mlm_batches,
    random_spans_noise_mask,
    span_corrupt,
)
from moqe_jax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer
from moqe_jax.errors import DataError

WORDS = "open close file directory cannot read write error warning %s %d {0} the a of to is not found".split()


def _sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append(" ".join(rng.choice(WORDS, size=rng.integers(2, 9))).capitalize() + rng.choice([".", ":", "!"]))
        out.append("Übersetzung " + " ".join(rng.choice(["Datei", "öffnen", "Fehler", "%s", "nicht"], 3)))
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(_sentences(400, 0), tmp_path_factory.mktemp("tok"), vocab_size=420)


def test_tokenizer_ids_and_roundtrip(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    assert tok.vocab_size == 420 and tok.sp_size == 320
    assert tok.sentinel_id(0) == 419 and tok.sentinel_id(99) == 320
    assert tok.lang_tag_id("en") == 3 and tok.lang_tag_id("cs") == 13  # user-defined symbols right after specials
    text = "Cannot open %s: not found {0}!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    ids = tok.encode("<2de> open <extra_id_0> file <extra_id_7>", add_eos=True)
    assert ids[0] == tok.lang_tag_id("de") and ids[-1] == EOS_ID
    assert tok.sentinel_id(0) in ids and tok.sentinel_id(7) in ids
    assert tok.decode(ids) == "<2de> open <extra_id_0> file <extra_id_7>"
    assert tok.decode([5, 6, EOS_ID, 7, 8]) == tok.decode([5, 6])  # stops at eos
    assert tok.encode_batch(["open file", "<2fr> a"]) == [tok.encode("open file"), tok.encode("<2fr> a")]
    with pytest.raises(DataError):
        tok.lang_tag_id("xx")


def test_tokenizer_reproducible(tok: Tokenizer, tmp_path: Path) -> None:
    # same sentences in another order -> byte-identical model
    s = _sentences(400, 0)[::-1]
    t2 = train_tokenizer(s, tmp_path, vocab_size=420)
    h = [hashlib.sha256(Path(t.path).read_bytes()).hexdigest() for t in (tok, t2)]
    assert h[0] == h[1]


def test_tokenizer_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        Tokenizer(tmp_path / "nope")
    (tmp_path / "spm.model").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        Tokenizer(tmp_path)
    with pytest.raises(DataError, match="empty"):
        train_tokenizer([], tmp_path / "x", vocab_size=420)


def _examples(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    src = [np.append(rng.integers(3, 100, rng.integers(1, 60)), 1).astype(np.int32) for _ in range(n)]
    tgt = [np.append(rng.integers(3, 100, rng.integers(1, 60)), 1).astype(np.int32) for _ in range(n)]
    return src, tgt


def test_make_batch_shift_right() -> None:
    b = make_batch([np.array([5, 6, 1])], [np.array([7, 8, 9, 1])], 6, rows=2)
    np.testing.assert_array_equal(b["targets"][0], [7, 8, 9, 1, 0, 0])
    np.testing.assert_array_equal(b["decoder_input_ids"][0], [0, 7, 8, 9, 1, 0])
    np.testing.assert_array_equal(b["weights"][0], [1, 1, 1, 1, 0, 0])
    assert b["weights"][1].sum() == 0 and b["input_ids"][1].sum() == 0
    np.testing.assert_array_equal(shift_right(np.array([[3, 4, 5]])), [[0, 3, 4]])


def test_bucket_batcher_deterministic_and_complete() -> None:
    src, tgt = _examples(500, 1)
    bb = BucketBatcher(src, tgt, batch_size=8, buckets=(16, 32, 64), seed=3)
    # deterministic function of the index, independent of access order
    a = [bb.batch(i) for i in range(bb.batches_per_epoch + 3)]
    bb2 = BucketBatcher(src, tgt, batch_size=8, buckets=(16, 32, 64), seed=3)
    for i in (bb.batches_per_epoch + 2, 5, 0):
        for k in a[i]:
            np.testing.assert_array_equal(a[i][k], bb2.batch(i)[k])
    seen: list[tuple] = []
    for b in a[:bb.batches_per_epoch]:
        length = b["input_ids"].shape[1]
        assert length in (16, 32, 64) and b["input_ids"].shape == (8, length)
        for row_in, row_t in zip(b["input_ids"], b["targets"], strict=True):
            n = max(int((row_in > 0).sum()), int((row_t > 0).sum()))
            assert n <= length and (length == 16 or n > {32: 16, 64: 32}[length])  # smallest fitting bucket
            seen.append((tuple(row_in[row_in > 0]), tuple(row_t[row_t > 0])))
    allex = {(tuple(s), tuple(t)) for s, t in zip(src, tgt, strict=True)}
    assert len(set(seen)) == len(seen) and set(seen) <= allex  # no example twice within an epoch
    assert len(seen) > 500 - 3 * 8  # only per-bucket remainders are dropped
    # epochs differ
    assert not np.array_equal(a[0]["input_ids"], a[bb.batches_per_epoch]["input_ids"]) or \
        a[0]["input_ids"].shape != a[bb.batches_per_epoch]["input_ids"].shape


def test_tokens_per_batch_rows_and_eval_batches() -> None:
    src, tgt = _examples(200, 2)
    bb = BucketBatcher(src, tgt, batch_size=4, buckets=(16, 32, 64), tokens_per_batch=512, row_multiple=4)
    assert [bb.rows_for(b) for b in (16, 32, 64)] == [32, 16, 8]
    for i in range(bb.batches_per_epoch):
        b = bb.batch(i)
        assert b["input_ids"].shape[0] == bb.rows_for(b["input_ids"].shape[1])
    ev = list(eval_batches(src, tgt, 16, (16, 32, 64)))
    assert sum(int((b["weights"].sum(1) > 0).sum()) for b in ev) == 200
    with pytest.raises(DataError):
        BucketBatcher(src, tgt, batch_size=6, row_multiple=4)
    with pytest.raises(DataError):
        BucketBatcher([], [], batch_size=4)


def test_compute_lengths_matches_t5_numbers() -> None:
    # T5 / HF run_t5_mlm_flax: inputs 512 -> 568 raw tokens, 114 targets; inputs 64 -> raw 70 (check by formula)
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    raw, tar = compute_input_and_target_lengths(64)
    noise = int(round(raw * 0.15))
    spans = int(round(noise / 3.0))
    assert raw - noise + spans + 1 == 64 and noise + spans + 1 == tar


def test_noise_mask_statistics() -> None:
    rng = np.random.default_rng(0)
    masks = np.stack([random_spans_noise_mask(100, rng) for _ in range(300)])
    assert (masks.sum(1) == 15).all()  # exactly round(L * density) noise tokens
    assert not masks[:, 0].any()  # starts with non-noise
    starts = masks & ~np.pad(masks, ((0, 0), (1, 0)))[:, :-1]
    assert (starts.sum(1) == 5).all()  # round(15 / 3) spans
    assert abs(masks.mean(0)[1:].mean() - 0.15) < 0.01


def test_span_corrupt_reconstructs_original() -> None:
    """Independent reference: re-insert the target spans at the sentinels of the inputs -> original tokens."""
    rng = np.random.default_rng(5)
    vocab = 500
    raw, tar = compute_input_and_target_lengths(32)
    toks = rng.integers(3, vocab - 100, size=(6, raw)).astype(np.int32)
    b = span_corrupt(toks, rng, vocab)
    assert b["input_ids"].shape == (6, 32) and b["targets"].shape == (6, tar)
    for i in range(6):
        inp, tgt = list(b["input_ids"][i]), list(b["targets"][i])
        assert inp[-1] == EOS_ID and tgt[-1] == EOS_ID
        spans: dict[int, list[int]] = {}
        cur = None
        for t in tgt[:-1]:
            if t >= vocab - 100:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        sentinels = [t for t in inp if t >= vocab - 100]
        assert sentinels == [vocab - 1 - k for k in range(len(sentinels))] == list(spans)
        rebuilt = []
        for t in inp[:-1]:
            rebuilt += spans[t] if t >= vocab - 100 else [t]
        assert rebuilt == list(toks[i])
    np.testing.assert_array_equal(b["decoder_input_ids"][:, 1:], b["targets"][:, :-1])
    with pytest.raises(DataError):
        span_corrupt(np.zeros((2, 10), np.int32), rng, vocab)


def test_mlm_batches_deterministic() -> None:
    rng = np.random.default_rng(0)
    sents = [list(rng.integers(3, 300, rng.integers(3, 20))) for _ in range(100)]
    a = [next(mlm_batches(sents, 400, 4, 32, seed=1, start=i)) for i in (0, 3)]
    it = mlm_batches(sents, 400, 4, 32, seed=1)
    b = [next(it) for _ in range(4)]
    np.testing.assert_array_equal(a[0]["input_ids"], b[0]["input_ids"])
    np.testing.assert_array_equal(a[1]["targets"], b[3]["targets"])
    assert b[0]["input_ids"].shape == (4, 32)
