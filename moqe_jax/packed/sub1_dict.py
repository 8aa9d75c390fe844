"""QMoE's static sub-1-bit dictionary (Frantar & Alistarh 2023, §4; docs/QMOE.md §1.2–1.5).

One global dictionary of 2^16 codewords, each a sequence of 1…14 ternary *pairs* (pair symbol
``r = t0 + 3·t1`` for the weights at positions 2i, 2i+1 of a row), built best-first from an i.i.d.
model with P(0) = 0.885. Three tables derive from it:

* ``seq``  uint8 ``[65536, 14]`` pair symbols of each entry (slots past ``length`` are 0),
  ``length`` uint8 ``[65536]`` number of pairs;
* ``dec``  int32 ``[2·65536]`` the kernel's decode table (§1.4): word ``dec[2c+w]`` holds the entry's
  total pair count in bits 0–3 and weight ``14·w + j`` (j = 0…13) at bits ``4+2j … 5+2j``;
* ``trie`` int32 ``[65537, 9]`` the encoder's trie (§1.5): row = entry index of a node (root = 65536),
  column = next pair symbol, value = child entry or −1.

The construction reproduces QMoE's ``setup()`` bit for bit (float64 products in sequence order,
lexicographic tie-break by Python list ordering); :data:`DEC_SHA256` / :data:`TRIE_SHA256` are the
checksums of docs/QMOE.md §1.3 and are verified on every build / cache load.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moqe_jax.cache import cache_root

__all__ = ["Sub1Dictionary", "get_dictionary", "fitted_dictionary", "build_dictionary", "ZEROS", "NUM_CODES",
           "MAX_PAIRS", "NZ_SLOTS", "sparse_dec_table",
           "TRIE_ROOT", "DEC_SHA256", "TRIE_SHA256", "pair_probabilities"]

ZEROS = 0.885          # QMoE's assumed P(weight == 0)
NUM_CODES = 1 << 16    # dictionary size
MAX_PAIRS = 14         # longest entry, in pairs (28 weights)
TRIE_ROOT = NUM_CODES  # root row of the trie table
NZ_SLOTS = 4           # nonzero slots per codeword in the sparse table (every entry has <= 3 nonzeros)
DEC_SHA256 = "c09862c453fe122634070a475357ff81a679aff65829d84a56f806c02a54ed45"
TRIE_SHA256 = "fc77a88c6c9c32a0a884b2736ac78c25239a162817d133dc8457c8f0770a8b0b"
_CACHE_VERSION = 1


def pair_probabilities(zeros: float = ZEROS) -> list[float]:
    """QMoE's pair model: ``prob[3i+j] = (1.0·p_i)·p_j`` in float64, ``p = [z, (1−z)/2, (1−z)/2]``."""
    p = [zeros, (1 - zeros) / 2, (1 - zeros) / 2]
    return [(1.0 * p[i]) * p[j] for i in range(3) for j in range(3)]


@dataclass(frozen=True)
class Sub1Dictionary:
    """The four derived tables (module docstring). ``sha256`` identifies ``dec`` (stored in meta)."""

    seq: np.ndarray      # uint8 [C, 14]
    length: np.ndarray   # uint8 [C]
    dec: np.ndarray      # int32 [2C]
    trie: np.ndarray     # int32 [C+1, 9]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.dec.astype("<i4").tobytes()).hexdigest()

    @property
    def weights(self) -> np.ndarray:
        """uint8 ``[C, 28]`` ternary symbols of each entry, weight order (t0, t1 of each pair)."""
        s = self.seq
        return np.stack([s % 3, s // 3], axis=-1).reshape(s.shape[0], 2 * MAX_PAIRS).astype(np.uint8)


def _enumerate(zeros: float, num_codes: int, max_pairs: int) -> list[list[int]]:
    """Best-first enumeration with a heap of ``(−prob, sequence)`` exactly as QMoE's ``setup()``."""
    pp = pair_probabilities(zeros)
    heap: list[tuple[float, list[int]]] = [(-1.0, [])]
    entries: list[list[int]] = []
    while len(entries) < num_codes:
        negp, seq = heapq.heappop(heap)
        if seq:
            entries.append(seq)
        if len(seq) < max_pairs:
            for r in range(9):
                heapq.heappush(heap, (negp * pp[r], seq + [r]))
    return entries


def build_dictionary(zeros: float = ZEROS, num_codes: int = NUM_CODES) -> Sub1Dictionary:
    """Build the dictionary and its ``dec``/``trie`` tables (≈2 s in CPython)."""
    entries = _enumerate(zeros, num_codes, MAX_PAIRS)
    length = np.fromiter((len(s) for s in entries), np.uint8, count=num_codes)
    seq = np.zeros((num_codes, MAX_PAIRS), np.uint8)
    for c, s in enumerate(entries):
        seq[c, :len(s)] = s
    # dec words: weights 0..13 / 14..27, 2 bits each from bit 4; pair count in bits 0..3 of both.
    w = np.stack([seq % 3, seq // 3], axis=-1).reshape(num_codes, 2, 14).astype(np.uint32)
    shifts = (4 + 2 * np.arange(14, dtype=np.uint32))
    words = np.bitwise_or.reduce(w << shifts, axis=-1) | length[:, None].astype(np.uint32)
    dec = words.reshape(-1).view(np.int32).copy()
    # trie: parent of entry c = entry of seq[:len-1] (prefix-closed dictionary), root for singles.
    index = {tuple(s): c for c, s in enumerate(entries)}
    parent = np.fromiter((TRIE_ROOT if len(s) == 1 else index[tuple(s[:-1])] for s in entries), np.int64,
                         count=num_codes)
    last = seq[np.arange(num_codes), length.astype(np.int64) - 1].astype(np.int64)
    trie = np.full((num_codes + 1, 9), -1, np.int32)
    trie[parent, last] = np.arange(num_codes, dtype=np.int32)
    return Sub1Dictionary(seq=seq, length=length, dec=dec, trie=trie)


def _cache_path() -> Path:
    return cache_root() / f"sub1_dict_v{_CACHE_VERSION}.npz"


def _verify(d: Sub1Dictionary) -> bool:
    return (d.sha256 == DEC_SHA256
            and hashlib.sha256(d.trie.astype("<i4").tobytes()).hexdigest() == TRIE_SHA256)


@functools.lru_cache(maxsize=1)
def get_dictionary() -> Sub1Dictionary:
    """QMoE's fixed dictionary (cached in memory and under ``~/.cache/moqe_jax``; checksum-verified)."""
    path = _cache_path()
    try:
        with np.load(path) as z:
            d = Sub1Dictionary(seq=z["seq"], length=z["length"], dec=z["dec"], trie=z["trie"])
        if _verify(d):
            return d
    except (OSError, KeyError, ValueError):
        pass
    d = build_dictionary()
    if not _verify(d):  # pragma: no cover - would mean a broken reimplementation
        raise RuntimeError("sub-1-bit dictionary does not match QMoE's SHA-256 checksums")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, seq=d.seq, length=d.length, dec=d.dec, trie=d.trie)
        os.replace(tmp, path)
    except OSError:
        pass
    return d


@functools.lru_cache(maxsize=4)
def fitted_dictionary(zeros: float) -> Sub1Dictionary:
    """Same construction for another P(0) (e.g. a model's measured zero share); ≈1 s, memory-cached.

    Experimental (benchmarks only): streams are always stored with QMoE's fixed dictionary
    (:func:`get_dictionary`), whose identity ``DEC_SHA256`` is recorded in the tensor metadata.
    """
    if not 0.0 < zeros < 1.0:
        raise ValueError(f"P(0) must be in (0, 1), got {zeros}")
    return build_dictionary(zeros=round(float(zeros), 6))


@functools.lru_cache(maxsize=1)
def sparse_dec_table() -> np.ndarray:
    """int32 ``[65536]`` one-word nonzero table of QMoE's dictionary (docs/FORMATS.md §2).

    Per codeword: bits 0–3 pair count; for its j-th nonzero weight (j < 3, weight order) a 7-bit field at
    bit ``4 + 7j``: bit 6 = present, bit 5 = value is ``w_max`` (symbol 2; else ``w_min``), bits 0–4 =
    weight position in the entry (0–27). Derived (never stored); used by the decode-fused kernel and
    the XLA decoder. Every entry of the fixed dictionary has at most 3 nonzero weights.
    """
    d = get_dictionary()
    w = d.weights.astype(np.int64)                               # [C, 28]
    if int((w != 0).sum(1).max()) > NZ_SLOTS - 1:  # pragma: no cover - property of the fixed dictionary
        raise AssertionError("dictionary entry with more than 3 nonzero weights")
    table = d.length.astype(np.int64).copy()
    nz_rank = np.cumsum(w != 0, axis=1) - 1                      # rank of each nonzero within its entry
    rows, pos = np.nonzero(w)
    field = 64 | ((w[rows, pos] == 2).astype(np.int64) << 5) | pos
    np.add.at(table, rows, field << (4 + 7 * nz_rank[rows, pos]))
    return table.astype(np.int32)
