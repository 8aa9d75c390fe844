"""A tiny synthetic MT corpus + tokenizer + random tiny models, for CI runs of the reproduction scripts.

Used only when the bundled model / the real corpus are absent (or with ``--synthetic``): the
scripts then still exercise every code path (quantize → evaluate → tables → plots) in seconds.
The corpus has the exact layout of ``moqe data build`` (``{train,valid,test}.jsonl`` +
``english.txt``); the "translations" are deterministic word ciphers of random English-like
sentences, so numbers computed on it mean nothing.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_WORDS = ("the file is not found cannot open directory error warning copy move remove list print user group mode "
          "time size read write option invalid argument missing operand link target source device memory "
          "permission denied try more information usage input output archive").split()
_ENDINGS = (".", ": %s", " '%s'", "", "?", " (%d)")


def _cipher(word: str, lang: str) -> str:
    k = sum(map(ord, lang)) % 7 + 1
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) if c.isalpha() and c.islower() else c for c in word) + lang[:1]


def _translate(sentence: str, lang: str) -> str:
    return " ".join(_cipher(w, lang) for w in sentence.split(" "))


def build_synthetic_corpus(out_dir: str | Path, langs: Sequence[str] = ("de", "fr"), per_split: int = 24,
                           train: int = 200, seed: int = 0) -> Path:
    """Write a synthetic corpus (layout of ``moqe_jax.data.corpus.build_corpus``) under ``out_dir``."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": train, "valid": per_split, "test": per_split}
    english: list[str] = []
    for split, n in sizes.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for lang in langs:
                for _ in range(n):
                    en = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8))).capitalize()
                    en += rng.choice(_ENDINGS)
                    tr = _translate(en, lang)
                    if split == "train":
                        english.append(en)
                    for rec in ({"direction": f"en-{lang}", "src_lang": "en", "tgt_lang": lang,
                                 "src": f"<2{lang}> {en}", "tgt": tr, "en": en},
                                {"direction": f"{lang}-en", "src_lang": lang, "tgt_lang": "en",
                                 "src": f"<2en> {tr}", "tgt": en, "en": en}):
                        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (out / "english.txt").write_text("".join(e + "\n" for e in dict.fromkeys(english)), encoding="utf-8")
    return out


def build_synthetic_tokenizer(corpus_dir: str | Path, out_dir: str | Path, vocab_size: int = 512) -> Any:
    """Train the project's SentencePiece tokenizer on the synthetic training split."""
    from moqe_jax.data.corpus import read_jsonl
    from moqe_jax.data.tokenizer import train_tokenizer

    rows = read_jsonl(Path(corpus_dir) / "train.jsonl")
    sents = [r["tgt"] for r in rows] + [r["en"] for r in rows]
    return train_tokenizer(sents, out_dir, vocab_size=vocab_size)


def tiny_models(vocab_size: int = 512, seed: int = 0) -> tuple[Any, Any]:
    """Random ``tiny`` MoE model and its dense twin (no sparse layers), float32 activations."""
    from moqe_jax.api import Model
    from moqe_jax.config import SwitchConfig

    cfg = SwitchConfig.preset("tiny", vocab_size=vocab_size, dtype="float32")
    moe = Model.init(cfg, seed)
    dense = Model.init(cfg.replace(encoder_sparse_step=0, decoder_sparse_step=0, name="tiny-dense"), seed)
    return moe, dense


_CACHE: dict[tuple, dict[str, Any]] = {}


def synthetic_setup(work_dir: str | Path | None = None, langs: Sequence[str] = ("de", "fr"), vocab_size: int = 512,
                    ) -> dict[str, Any]:
    """Corpus dir, tokenizer dir and the two random tiny models (under ``work_dir``, default a temp dir).

    Memoized per process (model initialisation dominates the cost), so several scripts/tests share one.
    """
    key = (tuple(langs), vocab_size)
    if key in _CACHE and Path(_CACHE[key]["data"]).is_dir():
        return _CACHE[key]
    w = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="moqe_syn_"))
    corpus = build_synthetic_corpus(w / "corpus", langs)
    build_synthetic_tokenizer(corpus, w / "tokenizer", vocab_size)
    moe, dense = tiny_models(vocab_size)
    _CACHE[key] = {"data": corpus, "tokenizer": w / "tokenizer", "moe": moe, "dense": dense}
    return _CACHE[key]
