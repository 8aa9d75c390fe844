"""One calibration pipeline (moqe_jax.calibration_batches): MT pairs (default) and span corruption."""

import numpy as np
import pytest

import moqe_jax
from moqe_jax.calibration import validate_batches
from moqe_jax.errors import DataError


class CharTokenizer:
    """Stand-in for the SentencePiece tokenizer: one id per character, 100 sentinels on top."""

    vocab_size = 300

    def encode(self, text):
        return [2 + (ord(c) % 190) for c in text]


def _pairs(seed, n=60):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "a rather long sentence that gets cut " * 3]
    return [{"src": " ".join(rng.choice(words, rng.integers(1, 6))), "tgt": " ".join(rng.choice(words, 3))}
            for _ in range(n)]


def test_mt_pairs(seed):
    tok, rows = CharTokenizer(), _pairs(seed)
    b = moqe_jax.calibration_batches(tok, rows, n=25, batch_size=8, seed=seed, max_len=40)
    assert [len(x["input_ids"]) for x in b] == [8, 8, 8, 1]
    x = np.concatenate([x["input_ids"] for x in b])
    assert x.shape[1] <= 40 and np.all(x.max(axis=1) > 1)
    last = np.array([r[r > 0][-1] for r in x])
    assert np.all(last == 1)  # every source ends with EOS, also when cut at max_len
    for bt in b:
        assert np.all(bt["decoder_input_ids"][:, 0] == 0)
    # tuples work as pairs, and the draw depends only on the seed
    again = moqe_jax.calibration_batches(tok, [(r["src"], r["tgt"]) for r in rows], n=25, batch_size=8, seed=seed,
                                         max_len=40)
    for p, q in zip(b, again, strict=True):
        np.testing.assert_array_equal(p["input_ids"], q["input_ids"])
    assert len(validate_batches(b, tok.vocab_size)) == 4


def test_span_corruption(seed):
    tok = CharTokenizer()
    texts = [r["src"] for r in _pairs(seed, 400)]
    b = moqe_jax.calibration_batches(tok, texts, mode="span", n=10, batch_size=4, seed=seed, max_len=32)
    assert [x["input_ids"].shape for x in b] == [(4, 32), (4, 32), (2, 32)]
    assert any((x["input_ids"] >= tok.vocab_size - 100).any() for x in b)  # sentinels
    with pytest.raises(DataError, match="mode"):
        moqe_jax.calibration_batches(tok, texts, mode="mlm")
    with pytest.raises(DataError):
        moqe_jax.calibration_batches(tok, [], n=4)
