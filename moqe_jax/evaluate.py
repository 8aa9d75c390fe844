"""Evaluation of a (float, RTN, GPTQ, QAT or sub-1-bit) `Model` through ONE code path.

* Translation quality (MoQE §4, Tables 2 / Figs 2–3): batched greedy decoding with the model's own
  jitted ``Model.generate`` (the CLI's path), SentencePiece-decoded (detokenized) hypotheses, sacrebleu
  corpus BLEU and chrF per direction on the test split, and the plain average over directions (MoQE
  reports per-direction scores and their average). Tokens/s of the decoding is measured.
* Loss (QMoE §4 evaluates span-corruption loss on held-out C4; docs/QMOE.md §C): the MLM
  (span-corruption, noise 0.15, mean span 3) cross-entropy on held-out English text of our corpus
  (the English side of the test split, docs/DATA.md) and the teacher-forced token-level CE of the
  reference translations.

Only the parameters differ between a float and a quantized model; everything here calls
``model.logits`` / ``model.generate``.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moqe_jax.data.locate import default_data_dir
from moqe_jax.data.tokenizer import encode_text as _encode
from moqe_jax.data.tokenizer import tokenizer_vocab_size
from moqe_jax.errors import ConfigError, DataError

if TYPE_CHECKING:  # annotations only (the facade is imported where a model is loaded)
    from moqe_jax.api import Model

__all__ = [
    "CorpusScore", "DirectionResult", "EvalResult", "bleu_tokenizer_for", "corpus_scores", "token_cross_entropy",
    "parse_directions", "default_data_dir", "load_tokenizer", "tokenizer_vocab_size", "check_vocab", "load_eval_pairs",
    "translate", "decode_speed", "teacher_forced_loss", "mlm_examples", "evaluate_model",
    "format_result",
]

# sacrebleu tokenizer per TARGET language: 13a for space-delimited languages, `zh` for Chinese,
# `char` for Japanese (the `ja-mecab` tokenizer needs MeCab, which is not a dependency).
_BLEU_TOKENIZE = {"zh": "zh", "zh_CN": "zh", "zh_TW": "zh", "ja": "char"}


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def bleu_tokenizer_for(lang: str) -> str:
    """sacrebleu tokenizer name used for BLEU when the target language is ``lang``."""
    return _BLEU_TOKENIZE.get(lang, "13a")


@dataclass
class CorpusScore:
    """sacrebleu corpus BLEU and chrF of one set of hypotheses, with signatures."""

    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    n: int


def corpus_scores(hyps: Sequence[str], refs: Sequence[str], lang: str = "en") -> CorpusScore:
    """sacrebleu ``corpus_score`` (BLEU with :func:`bleu_tokenizer_for` ``(lang)``, chrF defaults)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hyps) != len(refs):
        raise DataError(f"{len(hyps)} hypotheses but {len(refs)} references")
    bleu = BLEU(tokenize=bleu_tokenizer_for(lang))
    chrf = CHRF()
    b = bleu.corpus_score(list(hyps), [list(refs)])
    c = chrf.corpus_score(list(hyps), [list(refs)])
    return CorpusScore(float(b.score), float(c.score), str(bleu.get_signature()), str(chrf.get_signature()),
                       len(hyps))


def token_cross_entropy(logits: Any, labels: Any, mask: Any | None = None) -> tuple[float, int]:
    """Sum of token cross-entropies ``-log softmax(logits)[label]`` over ``mask`` and the token count.

    ``logits`` ``[B, T, V]`` (any float), ``labels`` ``[B, T]`` int, ``mask`` ``[B, T]`` (default: all).
    Computed in float32 with a stable log-softmax; masked positions contribute exactly 0 (even if
    their logits are not finite).
    """
    import jax
    import jax.numpy as jnp

    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise DataError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    m = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(m, ce, 0.0))
    return float(total), int(jnp.sum(m))


# ----------------------------------------------------------------------------------------------
# tokenizer / data
# ----------------------------------------------------------------------------------------------
def parse_directions(spec: str | Sequence[str] | None) -> list[str]:
    """``"all"``/None → every corpus direction; ``"en-de,de-en"`` or a list → validated list."""
    from moqe_jax.data.corpus import DIRECTIONS

    if spec is None or spec == "all" or (not isinstance(spec, str) and list(spec) == ["all"]):
        return list(DIRECTIONS)
    items = [d.strip() for d in spec.split(",")] if isinstance(spec, str) else [str(d).strip() for d in spec]
    items = [d for d in items if d]
    if not items:
        raise DataError("no direction given; use e.g. 'en-de,de-en' or 'all'")
    unknown = [d for d in items if d not in DIRECTIONS]
    if unknown:
        raise DataError(f"unknown direction(s) {', '.join(unknown)}; known: {', '.join(DIRECTIONS)}")
    return list(dict.fromkeys(items))


def load_tokenizer(src: Any) -> Any:
    """The project's `moqe_jax.data.tokenizer.Tokenizer` (SentencePiece + sentinels) from a path (``.model``
    file or a directory holding ``spm.model``), or pass an object with ``encode``/``decode`` through."""
    if not isinstance(src, (str, os.PathLike)):
        return src
    from moqe_jax.data.tokenizer import Tokenizer

    return Tokenizer(src)


def check_vocab(model: Model, tok: Any, where: str = "tokenizer") -> None:
    """Raise `DataError` unless the tokenizer's vocabulary fits the model's.

    Equal sizes pass; so does a model vocabulary padded up to a multiple of 128 (T5X pads
    32100 → 32128) by fewer than 128 entries. Anything else would silently produce garbage.
    """
    mv = int(model.config.vocab_size)
    tv = tokenizer_vocab_size(tok)
    if tv == mv or (mv % 128 == 0 and tv < mv < tv + 128):
        return
    raise DataError(f"{where}: vocabulary size {tv} does not match the model's vocab_size {mv}")


def _decode(tok: Any, ids: Sequence[int]) -> str:
    return str(tok.decode([int(i) for i in ids]))


def load_eval_pairs(data: str | os.PathLike | Mapping[str, Sequence[Any]], directions: Sequence[str],
                    samples: int | None = None, split: str = "test", seed: int = 0) -> dict[str, list[dict]]:
    """Per direction, up to ``samples`` records ``{"src", "tgt", "en", ...}`` of ``split``.

    ``data`` is a corpus directory written by ``moqe data build`` (``{split}.jsonl``) or a mapping
    ``direction -> records`` (dicts with src/tgt, or (src, tgt) tuples). The sample is a seeded,
    order-preserving random subset (the split is grouped by catalog, so a prefix would be biased).
    """
    from moqe_jax.data.corpus import read_jsonl

    if isinstance(data, Mapping):
        rows_by: dict[str, list[dict]] = {}
        for d in directions:
            if d not in data:
                raise DataError(f"direction {d} not in the given data (has: {', '.join(sorted(data))})")
            rows_by[d] = [r if isinstance(r, dict) else {"src": r[0], "tgt": r[1]} for r in data[d]]
    else:
        rows = read_jsonl(Path(data) / f"{split}.jsonl", directions)
        rows_by = {d: [] for d in directions}
        for r in rows:
            rows_by[r["direction"]].append(r)
    out: dict[str, list[dict]] = {}
    for d in directions:
        rs = rows_by.get(d, [])
        if not rs:
            where = "the given data" if isinstance(data, Mapping) else str(data)
            raise DataError(f"direction {d}: no {split} sentences in {where}")
        if samples is not None and len(rs) > samples:
            idx = sorted(random.Random(f"{seed}:{d}").sample(range(len(rs)), samples))
            rs = [rs[i] for i in idx]
        out[d] = rs
    return out


# ----------------------------------------------------------------------------------------------
# batching helpers
# ----------------------------------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _pad_batch(seqs: Sequence[Sequence[int]], length: int, rows: int, pad: int, eos: int) -> np.ndarray:
    """``[rows, length]`` int32, sequences truncated to ``length`` (keeping a final EOS); filler rows = [EOS]."""
    out = np.full((rows, length), pad, np.int32)
    for i in range(rows):
        s = list(seqs[i]) if i < len(seqs) else [eos]
        if len(s) > length:
            s = s[:length - 1] + [eos]
        out[i, :len(s)] = s
    return out


def _progress(total: int, desc: str, enable: bool | None) -> Any:
    from tqdm import tqdm

    if enable is None:
        enable = os.environ.get("MOQE_NO_PROGRESS") != "1" and bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, disable=not enable, leave=False)


def _strip_generated(row: Sequence[int], eos: int, pad: int, start: int, prompt_len: int = 0) -> list[int]:
    """Generated ids up to (excluding) the first EOS; leading decoder-start and pads removed."""
    out: list[int] = []
    r = list(row)[prompt_len:]
    if r and r[0] == start:
        r = r[1:]
    for t in r:
        if t == eos:
            break
        if t == pad:
            continue
        out.append(int(t))
    return out


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    """Timing of a batched decode: ``tokens_per_s`` excludes the first (compiling) batch when possible."""

    tokens: int = 0
    seconds: float = 0.0
    first_batch_seconds: float = 0.0
    batches: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for bk in buckets:
        if n <= bk:
            return bk
    return buckets[-1]


def translate(model: Model, tok: Any, sources: Sequence[str], *, batch_size: int = 32, max_src_len: int | None = None,
              max_new_tokens: int | None = None, num_beams: int = 1, buckets: Sequence[int] = (16, 32, 64, 128, 256),
              progress: bool | None = None) -> tuple[list[str], GenerationStats]:
    """Greedy (or beam) decode ``sources`` with ``model.generate``; SentencePiece-decoded hypotheses.

    Sentences are grouped into source-length buckets (``buckets``, or the single length
    ``max_src_len``); every batch of a bucket has the shape ``[batch_size, bucket]`` and decodes
    ``max_new_tokens`` (default ``2·bucket``, at most 512) steps, so there is one compilation per
    bucket and parameter structure. Sources longer than the largest bucket are truncated (keeping EOS).
    ``tokens_per_s`` counts generated tokens up to and including EOS over the batches that did not
    compile (the first of each bucket); a bucket with a single batch is decoded once more, compiled,
    for its timing.
    """
    cfg = model.config
    pad, eos, start = int(cfg.pad_token_id), int(cfg.eos_token_id), int(cfg.decoder_start_token_id)
    enc = [_encode(tok, s) + [eos] for s in sources]
    bks = (int(max_src_len),) if max_src_len else tuple(sorted(int(b) for b in buckets))
    groups: dict[int, list[int]] = {}
    for i in sorted(range(len(enc)), key=lambda i: len(enc[i])):
        groups.setdefault(_bucket(len(enc[i]), bks), []).append(i)
    hyps: list[str] = [""] * len(enc)
    stats = GenerationStats()
    all_tokens, all_seconds = 0, 0.0
    bar = _progress(len(enc), "translate", progress)
    for bk, members in sorted(groups.items()):
        new = int(max_new_tokens or min(2 * bk, 512))
        for b0 in range(0, len(members), batch_size):
            idx = members[b0:b0 + batch_size]
            x = _pad_batch([enc[i] for i in idx], bk, batch_size, pad, eos)
            t0 = time.perf_counter()
            out = np.asarray(model.generate(x, max_new_tokens=new, num_beams=num_beams))
            dt = time.perf_counter() - t0
            ntok = 0
            for j, i in enumerate(idx):
                ids = _strip_generated(out[j], eos, pad, start)
                ntok += min(len(ids) + 1, new)
                hyps[i] = _decode(tok, ids)
            all_tokens, all_seconds = all_tokens + ntok, all_seconds + dt
            if b0 == 0:
                stats.first_batch_seconds += dt
            else:
                stats.tokens, stats.seconds = stats.tokens + ntok, stats.seconds + dt
            stats.batches += 1
            bar.update(len(idx))
        if len(members) <= batch_size:  # single (compiling) batch: time it once more, compiled
            t0 = time.perf_counter()
            np.asarray(model.generate(x, max_new_tokens=new, num_beams=num_beams))
            stats.tokens, stats.seconds = stats.tokens + ntok, stats.seconds + time.perf_counter() - t0
    bar.close()
    if stats.seconds == 0.0:
        stats.tokens, stats.seconds = all_tokens, all_seconds
    return hyps, stats


def decode_speed(model: Model, *, batch_size: int = 8, src_len: int = 32, new_tokens: int = 64, reps: int = 3,
                 seed: int = 0, input_ids: Any = None) -> float:
    """Steady-state greedy decode throughput (generated tokens/s, counted up to and including EOS), after one
    warm-up call. ``input_ids`` ``[B, L]`` (e.g. real test sentences); default random ids ``[batch_size, src_len]``."""
    cfg = model.config
    if input_ids is None:
        rng = np.random.default_rng(seed)
        x = rng.integers(3, max(4, int(cfg.vocab_size) - 100), (batch_size, src_len)).astype(np.int32)
        x[:, -1] = int(cfg.eos_token_id)
    else:
        x = np.asarray(input_ids, np.int32)
    out = np.asarray(model.generate(x, max_new_tokens=new_tokens))
    eos, pad = int(cfg.eos_token_id), int(cfg.pad_token_id)
    ntok = sum(min(len(_strip_generated(r, eos, pad, -1)) + 1, new_tokens) for r in out)
    t0 = time.perf_counter()
    for _ in range(reps):
        np.asarray(model.generate(x, max_new_tokens=new_tokens))
    return reps * ntok / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------
def _shift_right(labels: np.ndarray, start: int, pad: int) -> np.ndarray:
    out = np.full_like(labels, pad)
    out[:, 0] = start
    out[:, 1:] = labels[:, :-1]
    return out


def teacher_forced_loss(model: Model, examples: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 32,
                        max_src_len: int | None = None, max_tgt_len: int | None = None,
                        progress: bool | None = None, desc: str = "loss") -> tuple[float, int]:
    """Mean token CE (nats) of ``targets`` given ``inputs`` (T5 teacher forcing) and the token count.

    ``examples`` are (input ids, target ids) pairs, both ending with EOS. Decoder inputs are the
    targets shifted right behind ``decoder_start_token_id``; pad positions are masked. One fixed
    batch shape for the whole set.
    """
    if not examples:
        raise DataError("no examples to compute a loss on")
    cfg = model.config
    pad, eos, start = int(cfg.pad_token_id), int(cfg.eos_token_id), int(cfg.decoder_start_token_id)
    s_len = int(max_src_len or min(_round_up(max(len(e[0]) for e in examples), 16), 512))
    t_len = int(max_tgt_len or min(_round_up(max(len(e[1]) for e in examples), 16), 512))
    total, count = 0.0, 0
    bar = _progress(len(examples), desc, progress)
    for b0 in range(0, len(examples), batch_size):
        chunk = examples[b0:b0 + batch_size]
        x = _pad_batch([c[0] for c in chunk], s_len, batch_size, pad, eos)
        y = _pad_batch([c[1] for c in chunk], t_len, batch_size, pad, eos)
        ymask = np.zeros_like(y, dtype=bool)
        for j, c in enumerate(chunk):
            ymask[j, :min(len(c[1]), t_len)] = True
        dec_in = _shift_right(y, start, pad)
        dec_mask = np.zeros_like(ymask)
        dec_mask[:, 0] = True
        dec_mask[:, 1:] = ymask[:, :-1]
        logits = model.logits(x, dec_in, attention_mask=(x != pad), decoder_attention_mask=dec_mask)
        s, n = token_cross_entropy(logits, y, ymask)
        total += s
        count += n
        bar.update(len(chunk))
    bar.close()
    return total / max(count, 1), count


def mlm_examples(tok: Any, texts: Sequence[str], *, seed: int = 0, inputs_length: int = 64,
                 noise_density: float = 0.15, mean_span: float = 3.0) -> list[tuple[list[int], list[int]]]:
    """Span-corruption examples of ``texts`` (T5 / QMoE §C: noise 0.15, mean span 3).

    The held-out sentences are concatenated (each followed by EOS) into rows that give exactly
    ``inputs_length`` tokens after corruption, then corrupted with ``moqe_jax.data.span_corruption``
    (sentinels at the top of the tokenizer's vocabulary) under a fixed seed, so every model sees the
    same inputs.
    """
    from moqe_jax.data.span_corruption import compute_input_and_target_lengths, pack_stream, span_corrupt

    raw_len, _ = compute_input_and_target_lengths(inputs_length, noise_density, mean_span)
    rows = pack_stream([_encode(tok, t) for t in texts if t], raw_len)
    b = span_corrupt(rows, np.random.default_rng(seed), tokenizer_vocab_size(tok), noise_density, mean_span)
    return [([int(i) for i in x], [int(i) for i in y if i != 0]) for x, y in zip(b["input_ids"], b["targets"],
                                                                                strict=True)]


# ----------------------------------------------------------------------------------------------
# the evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class DirectionResult:
    """Scores of one translation direction."""

    direction: str
    bleu: float
    chrf: float
    n: int
    ce: float | None = None
    hyps: list[str] = field(default_factory=list, repr=False)
    refs: list[str] = field(default_factory=list, repr=False)


@dataclass
class EvalResult:
    """Everything ``evaluate_model`` measured (BLEU/chrF averaged like MoQE's tables)."""

    directions: dict[str, DirectionResult] = field(default_factory=dict)
    bleu_signature: str = ""
    chrf_signature: str = ""
    mt_ce: float | None = None
    mt_ce_tokens: int = 0
    mlm_loss: float | None = None
    mlm_tokens: int = 0
    tokens_per_s: float | None = None
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def bleu(self) -> float:
        """Average BLEU over directions (nan when no translation was evaluated)."""
        v = [r.bleu for r in self.directions.values()]
        return float(np.mean(v)) if v else float("nan")

    @property
    def chrf(self) -> float:
        v = [r.chrf for r in self.directions.values()]
        return float(np.mean(v)) if v else float("nan")

    def to_dict(self, with_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_text:
            for r in d["directions"].values():
                r.pop("hyps", None)
                r.pop("refs", None)
        d["bleu"], d["chrf"] = self.bleu, self.chrf
        flagged: list[str] = []
        d = _json_safe(d, "", flagged)
        d["nonfinite"] = flagged  # keys whose value was NaN/inf (written as null: the JSON stays valid)
        return d

    def nonfinite_losses(self) -> list[str]:
        """Names of the losses that are NaN/inf (a broken model or data), e.g. ``["mt_ce", "ce en-de"]``."""
        out = [k for k in ("mt_ce", "mlm_loss") if _bad(getattr(self, k))]
        return out + [f"ce {r.direction}" for r in self.directions.values() if _bad(r.ce)]


def _bad(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _json_safe(x: Any, path: str, flagged: list[str]) -> Any:
    """NaN/inf floats -> None (their key paths appended to ``flagged``), recursively."""
    if isinstance(x, dict):
        return {k: _json_safe(v, f"{path}.{k}" if path else str(k), flagged) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v, f"{path}[{i}]", flagged) for i, v in enumerate(x)]
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            flagged.append(path)
            return None
        return float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def evaluate_model(model: Model, *, tokenizer: Any, data: Any = None, directions: str | Sequence[str] | None = "all",
                   samples: int | None = 100, split: str = "test", bleu: bool = True, mt_loss: bool = False,
                   mlm: bool = False, mlm_texts: Sequence[str] | None = None, mlm_samples: int | None = 256,
                   batch_size: int = 32, max_src_len: int | None = None, max_new_tokens: int | None = None,
                   num_beams: int = 1, buckets: Sequence[int] = (16, 32, 64, 128, 256), seed: int = 0,
                   progress: bool | None = None) -> EvalResult:
    """Evaluate ``model`` (any params: float, RTN, GPTQ, QAT, sub-1-bit) on the MT corpus.

    Args:
      tokenizer: SentencePiece model path/dir or tokenizer object; its vocabulary must match the model.
      data: corpus directory (``moqe data build``) or ``{direction: records}``; needed for BLEU / mt_loss
        and, without ``mlm_texts``, for MLM (held-out English = English side of ``split``).
      directions: ``"all"``, ``"en-de,de-en"`` or a list; unknown ones raise `DataError`.
      samples: sentences per direction (seeded subset; None = all).
      bleu: decode and score BLEU/chrF per direction (one decode over all directions, sorted by length).
      mt_loss: teacher-forced token CE of the references.
      mlm: span-corruption loss on held-out English (``mlm_texts`` or the split's English side).
    """
    t_start = time.perf_counter()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size (--batch-size) must be an integer >= 1, got {batch_size!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ConfigError(f"beam size (--beams) must be an integer >= 1, got {num_beams!r}")
    tok = load_tokenizer(tokenizer)
    check_vocab(model, tok)
    dirs = parse_directions(directions)
    res = EvalResult()
    pairs: dict[str, list[dict]] = {}
    if bleu or mt_loss or (mlm and mlm_texts is None):
        if data is None:
            raise DataError("evaluation needs data= (a corpus directory from `moqe data build`)")
        pairs = load_eval_pairs(data, dirs, samples, split, seed)
    if bleu:
        flat = [(d, r) for d in dirs for r in pairs[d]]
        hyps, st = translate(model, tok, [r["src"] for _, r in flat], batch_size=batch_size, max_src_len=max_src_len,
                             max_new_tokens=max_new_tokens, num_beams=num_beams, buckets=buckets,
                             progress=progress)
        res.tokens_per_s, res.gen_tokens, res.gen_seconds = st.tokens_per_s, st.tokens, st.seconds
        k = 0
        for d in dirs:
            n = len(pairs[d])
            h, refs = hyps[k:k + n], [r["tgt"] for r in pairs[d]]
            k += n
            sc = corpus_scores(h, refs, lang=d.split("-", 1)[1])
            res.directions[d] = DirectionResult(d, sc.bleu, sc.chrf, n, hyps=h, refs=refs)
            if sc.bleu_signature not in res.bleu_signature:
                res.bleu_signature = "; ".join(x for x in (res.bleu_signature, sc.bleu_signature) if x)
            res.chrf_signature = sc.chrf_signature
    eos = int(model.config.eos_token_id)
    loss_sets: dict[str, list[tuple[list[int], list[int]]]] = {}
    if mt_loss:
        for d in dirs:
            loss_sets[d] = [(_encode(tok, r["src"]) + [eos], _encode(tok, r["tgt"]) + [eos]) for r in pairs[d]]
    if mlm:
        texts = list(mlm_texts) if mlm_texts is not None else _held_out_english(pairs)
        if mlm_samples is not None and len(texts) > mlm_samples:
            texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), mlm_samples))]
        loss_sets["__mlm__"] = mlm_examples(tok, texts, seed=seed)
    if loss_sets:  # one batch shape for every loss computation: one compilation per parameter structure
        every = [e for ex in loss_sets.values() for e in ex]
        s_len = min(_round_up(max(len(e[0]) for e in every), 16), 512)
        t_len = min(_round_up(max(len(e[1]) for e in every), 16), 512)
    tot, cnt = 0.0, 0
    for d, ex in loss_sets.items():
        desc = "MLM loss" if d == "__mlm__" else f"CE {d}"
        ce, n = teacher_forced_loss(model, ex, batch_size=batch_size, max_src_len=s_len, max_tgt_len=t_len,
                                    progress=progress, desc=desc)
        if d == "__mlm__":
            res.mlm_loss, res.mlm_tokens = ce, n
            continue
        tot, cnt = tot + ce * n, cnt + n
        if d in res.directions:
            res.directions[d].ce = ce
        else:
            res.directions[d] = DirectionResult(d, float("nan"), float("nan"), len(pairs[d]), ce=ce)
    if mt_loss:
        res.mt_ce, res.mt_ce_tokens = tot / max(cnt, 1), cnt
    res.seconds = time.perf_counter() - t_start
    return res


def _held_out_english(pairs: Mapping[str, Iterable[dict]]) -> list[str]:
    seen: dict[str, None] = {}
    for rows in pairs.values():
        for r in rows:
            en = r.get("en")
            if en:
                seen.setdefault(en, None)
    if not seen:
        raise DataError("no held-out English text for the MLM loss (records lack the 'en' field)")
    return list(seen)


def _fmt(v: float | None, nd: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _fmt_loss(v: float | None, nd: int = 3) -> str:
    """A loss: "–" when not computed, "nan"/"inf" when computed but non-finite (never hidden)."""
    if v is None:
        return "–"
    return f"{v:.{nd}f}" if math.isfinite(v) else str(v)


def format_result(res: EvalResult, title: str = "") -> str:
    """Per-direction BLEU/chrF(/CE) table plus the average, MLM loss and speed, as plain text."""
    lines = [title] if title else []
    if res.directions:
        lines.append(f"{'direction':<12}{'n':>6}{'BLEU':>8}{'chrF':>8}{'CE':>8}")
        for r in res.directions.values():
            lines.append(f"{r.direction:<12}{r.n:>6}{_fmt(r.bleu):>8}{_fmt(r.chrf):>8}{_fmt_loss(r.ce):>8}")
        n = sum(r.n for r in res.directions.values())
        lines.append(f"{'average':<12}{n:>6}{_fmt(res.bleu):>8}{_fmt(res.chrf):>8}{_fmt_loss(res.mt_ce):>8}")
    if res.bleu_signature:
        lines.append(f"BLEU signature: {res.bleu_signature}")
        lines.append(f"chrF signature: {res.chrf_signature}")
    if res.mlm_loss is not None:
        lines.append(f"MLM (span-corruption) loss: {_fmt_loss(res.mlm_loss, 4)} nats/token over {res.mlm_tokens} "
                     "target tokens")
    if res.tokens_per_s is not None:
        lines.append(f"decode speed: {_fmt(res.tokens_per_s, 1)} tokens/s ({res.gen_tokens} tokens)")
    bad = res.nonfinite_losses()
    if bad:
        lines.append(f"warning: non-finite loss ({', '.join(bad)}): the model produces NaN/inf logits; check its "
                     "weights (`moqe info`) and how it was made")
    return "\n".join(lines)
