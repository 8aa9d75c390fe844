"""QMoE sub-1-bit dictionary: bit-identical to QMoE's setup() (docs/QMOE.md §1.3–1.5 checksums)."""

import hashlib

import numpy as np

from moqe_jax.packed.sub1_dict import (
    DEC_SHA256,
    MAX_PAIRS,
    NUM_CODES,
    TRIE_ROOT,
    TRIE_SHA256,
    build_dictionary,
    get_dictionary,
    pair_probabilities,
)


def test_built_tables_match_qmoe_checksums():
    d = build_dictionary()  # fresh build, not the on-disk cache
    assert hashlib.sha256(d.dec.astype("<i4").tobytes()).hexdigest() == DEC_SHA256
    assert hashlib.sha256(d.trie.astype("<i4").tobytes()).hexdigest() == TRIE_SHA256
    assert d.dec.dtype == np.int32 and d.dec.shape == (2 * NUM_CODES,)
    assert d.trie.shape == (NUM_CODES + 1, 9)
    # spec §1.4 example and §1.3 length histogram
    assert [int(v) for v in d.dec[:6].view(np.uint32)] == [1, 1, 2, 2, 3, 3]
    hist = np.bincount(d.length, minlength=MAX_PAIRS + 1)[1:]
    assert hist.tolist() == [9, 65, 233, 577, 1161, 2049, 3305, 4993, 7177, 9921, 13289, 17345, 3843, 1569]
    cached = get_dictionary()
    np.testing.assert_array_equal(cached.dec, d.dec)
    np.testing.assert_array_equal(cached.trie, d.trie)


def test_dec_words_and_trie_agree_with_entries(seed):
    """Decode every entry from its dec words bit by bit and walk the trie (independent of the builder)."""
    d = get_dictionary()
    words = d.dec.view(np.uint32).reshape(NUM_CODES, 2).astype(np.int64)
    assert np.all((words[:, 0] & 15) == d.length) and np.all((words[:, 1] & 15) == d.length)
    w = np.zeros((NUM_CODES, 28), np.int64)
    for slot in range(28):
        w[:, slot] = (words[:, slot // 14] >> (4 + 2 * (slot % 14))) & 3
    pairs = w[:, 0::2] + 3 * w[:, 1::2]
    np.testing.assert_array_equal(pairs, d.seq)
    # unused slots are 0, no code 3
    assert np.all(w < 3)
    rng = np.random.default_rng(seed)
    for c in rng.integers(0, NUM_CODES, 300):
        node = TRIE_ROOT
        for r in d.seq[c, :d.length[c]]:
            node = d.trie[node, r]
        assert node == c
    # entries are in non-increasing probability order; entries 0..11 are the all-zero runs of 1..12 pairs
    # (13 zero pairs, 0.783^13 = 0.042, is less probable than the single pair [1], 0.051)
    pp = np.array(pair_probabilities())
    logp = np.where(np.arange(MAX_PAIRS)[None, :] < d.length[:, None], np.log(pp[d.seq]), 0).sum(1)
    assert np.all(np.diff(logp) <= 1e-9)
    assert np.all(d.seq[:12] == 0) and d.length[:12].tolist() == list(range(1, 13))
    assert d.seq[12, 0] == 1 and d.length[12] == 1
