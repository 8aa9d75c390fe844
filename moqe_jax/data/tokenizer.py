"""SentencePiece tokenizer for the gettext MT corpus, T5 conventions (docs/T5X_SWITCH.md §3).

Ids: pad=0, eos=1, unk=2 (no bos), then the target-language tags ``<2xx>`` as user-defined
symbols, then the unigram pieces. As in T5's ``cc_all.32000.100extra`` vocabulary, the SentencePiece
model holds ``vocab_size - num_extra_ids`` pieces and the sentinels ``<extra_id_0..99>`` live at the
TOP ids: ``<extra_id_i>`` = ``vocab_size - 1 - i``.

Training is reproducible: a deterministic sample of the training split (sorted, hashed order),
fixed SentencePiece seed, single thread, fixed settings (unigram, byte fallback, identity normalisation
so that format specifiers and punctuation survive exactly).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moqe_jax.errors import DataError

__all__ = ["Tokenizer", "train_tokenizer", "encode_text", "tokenizer_vocab_size", "PAD_ID", "EOS_ID", "UNK_ID",
           "NUM_EXTRA_IDS", "LANG_TAGS"]

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_EXTRA_IDS = 100
LANG_TAGS: tuple[str, ...] = tuple(f"<2{x}>" for x in ("en", "fr", "sv", "es", "ru", "de", "zh_CN", "it", "ja", "pl",
                                                        "cs"))
_SENTINEL = re.compile(r"<extra_id_(\d+)>")
_SPECIAL = re.compile(r"<extra_id_\d+>|<2[A-Za-z_]+> ?")
MODEL_FILE = "spm.model"


class Tokenizer:
    """Wraps a SentencePiece model plus ``num_extra_ids`` sentinel ids at the top of the vocabulary."""

    def __init__(self, path: str | os.PathLike, num_extra_ids: int = NUM_EXTRA_IDS) -> None:
        import sentencepiece as spm

        p = Path(path)
        if p.is_dir():
            p = p / MODEL_FILE
        if not p.is_file():
            raise DataError(f"{p}: tokenizer model not found")
        self.path = p
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(p))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{p}: not a SentencePiece model ({str(e).splitlines()[0] if str(e) else e})") from None
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOS_ID or self.sp.unk_id() != UNK_ID:
            raise DataError(f"{p}: expected pad=0 eos=1 unk=2, got pad={self.sp.pad_id()} eos={self.sp.eos_id()} "
                            f"unk={self.sp.unk_id()}")
        self.num_extra_ids = num_extra_ids
        self.sp_size = self.sp.GetPieceSize()

    @property
    def vocab_size(self) -> int:
        """Model vocabulary size: SentencePiece pieces + sentinels."""
        return self.sp_size + self.num_extra_ids

    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_i>`` (T5: counting down from the top)."""
        if not 0 <= i < self.num_extra_ids:
            raise DataError(f"sentinel index {i} out of range [0, {self.num_extra_ids})")
        return self.vocab_size - 1 - i

    def lang_tag_id(self, lang: str) -> int:
        i = self.sp.PieceToId(f"<2{lang}>")
        if i == UNK_ID:
            raise DataError(f"tokenizer {self.path} has no language tag <2{lang}>")
        return i

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Text → ids. ``<extra_id_N>`` becomes the sentinel id, ``<2xx>`` (and one following space) the tag id."""
        ids: list[int] = []
        pos = 0
        for m in _SPECIAL.finditer(text):
            tok = m.group(0).rstrip(" ")
            s = _SENTINEL.fullmatch(tok)
            if s is not None:
                if int(s.group(1)) >= self.num_extra_ids:
                    continue
                special = self.sentinel_id(int(s.group(1)))
            else:
                special = self.sp.PieceToId(tok)
                if special == UNK_ID:
                    continue
            ids += self.sp.EncodeAsIds(text[pos:m.start()]) if m.start() > pos else []
            ids.append(special)
            pos = m.end()
        if pos < len(text):
            ids += self.sp.EncodeAsIds(text[pos:])
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False) -> list[list[int]]:
        if not any(_SPECIAL.search(t) for t in texts):
            out = self.sp.EncodeAsIds(list(texts))
            return [o + [EOS_ID] for o in out] if add_eos else out
        return [self.encode(t, add_eos) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Ids → text; stops at the first eos, drops pad, renders sentinels as ``<extra_id_N>``."""
        out: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in np.asarray(ids).reshape(-1)):
            if i == EOS_ID:
                break
            if i == PAD_ID:
                continue
            if i >= self.sp_size:
                if run:
                    out.append(self.sp.DecodeIds(run))
                    run = []
                out.append(f"<extra_id_{self.vocab_size - 1 - i}>" if i < self.vocab_size else "")
                continue
            run.append(i)
        if run:
            out.append(self.sp.DecodeIds(run))
        return "".join(out)

    def decode_batch(self, batch: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(row) for row in batch]


def encode_text(tok: object, text: str) -> list[int]:
    """Ids of ``text`` from a :class:`Tokenizer` or a raw SentencePiece processor (``out_type=int``)."""
    try:
        ids = tok.encode(text, out_type=int)  # type: ignore[attr-defined]
    except TypeError:
        ids = tok.encode(text)  # type: ignore[attr-defined]
    return [int(i) for i in ids]


def tokenizer_vocab_size(tok: object) -> int:
    """Vocabulary size of a :class:`Tokenizer`, a SentencePiece processor or a wrapper exposing ``vocab_size``."""
    for name in ("vocab_size", "get_piece_size", "piece_size"):
        v = getattr(tok, name, None)
        if v is None:
            continue
        v = v() if callable(v) else v
        return int(v)
    raise DataError(f"cannot tell the vocabulary size of tokenizer {type(tok).__name__}")


def _sample(sentences: Sequence[str], max_sentences: int) -> list[str]:
    """Deterministic subset in a hash order (independent of input order and of PYTHONHASHSEED)."""
    uniq = sorted(set(sentences))
    keyed = sorted(uniq, key=lambda s: hashlib.sha1(s.encode("utf-8")).digest())
    return keyed[:max_sentences]


def train_tokenizer(sentences: Sequence[str], out_dir: str | os.PathLike, vocab_size: int = 8000,
                    num_extra_ids: int = NUM_EXTRA_IDS, max_sentences: int = 400_000, seed: int = 0,
                    character_coverage: float = 0.9995) -> Tokenizer:
    """Train the unigram SentencePiece model (``vocab_size - num_extra_ids`` pieces) → ``out_dir/spm.model``."""
    import sentencepiece as spm

    if vocab_size - num_extra_ids < 300:
        raise DataError(f"vocab_size {vocab_size} too small (needs > {num_extra_ids + 300})")
    sample = _sample(sentences, max_sentences)
    if not sample:
        raise DataError("cannot train a tokenizer on an empty corpus")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    prefix = str(out / "spm")
    import sys

    print(f"training the SentencePiece tokenizer on {len(sample)} sentences (vocab {vocab_size}; about a minute "
          "for the full corpus) ...", file=sys.stderr, flush=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_prefix=prefix, model_type="unigram",
            vocab_size=vocab_size - num_extra_ids, character_coverage=character_coverage, byte_fallback=True,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, user_defined_symbols=list(LANG_TAGS),
            normalization_rule_name="identity", split_digits=True, num_threads=1, shuffle_input_sentence=False,
            input_sentence_size=0, remove_extra_whitespaces=False, max_sentence_length=4096, minloglevel=2,
            train_extremely_large_corpus=False)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (8000). Please set it to a value <= 1234."
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"SentencePiece training failed for vocab_size={vocab_size}: {msg}") from None
    (out / "spm.vocab").unlink(missing_ok=True)
    _strip_paths(out / MODEL_FILE)
    return Tokenizer(out / MODEL_FILE, num_extra_ids)


def _strip_paths(path: Path) -> None:
    """Make the model file byte-reproducible: the trainer spec records the output path (model_prefix)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb2
    except ImportError:  # protobuf missing: the pieces are still reproducible, only the file bytes differ
        return
    m = pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf module
    m.ParseFromString(path.read_bytes())
    m.trainer_spec.model_prefix = "spm"
    path.write_bytes(m.SerializeToString())
