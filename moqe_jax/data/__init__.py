"""Data: gettext MT corpus (docs/DATA.md), SentencePiece tokenizer, length-bucketed batching, T5 span corruption."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["build_dataset", "DATA_MD_PAIRS"]

# docs/DATA.md's table, measured on 2026-11-23 on another machine image (for comparison only).
DATA_MD_PAIRS: dict[str, int] = {"fr": 54500, "sv": 43489, "es": 42845, "ru": 42642, "de": 40335, "zh_CN": 37141,
                                 "it": 36982, "ja": 32048, "pl": 30055, "cs": 21612}


def build_dataset(locale_dir: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int = 8000,
                  progress: bool | None = None):
    """Corpus (``{train,valid,test}.jsonl``, ``english.txt``, ``stats.json``) + tokenizer (``tokenizer/spm.model``).

    The tokenizer is trained on the training split only (both sides), so valid/test stay unseen.
    Returns ``(CorpusStats, Tokenizer)``.
    """
    from moqe_jax.data.corpus import build_corpus, read_jsonl
    from moqe_jax.data.tokenizer import train_tokenizer

    stats = build_corpus(locale_dir, out_dir, progress=progress)
    rows = read_jsonl(Path(out_dir) / "train.jsonl")
    texts = [r["tgt"] for r in rows]  # every training sentence appears once as a target (en and X sides)
    tok = train_tokenizer(texts, Path(out_dir) / "tokenizer", vocab_size=vocab_size)
    return stats, tok
