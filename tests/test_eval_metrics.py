"""Evaluation metrics against independent references: sacrebleu directly, NumPy float64 CE."""

from __future__ import annotations

import numpy as np
import pytest

from moqe_jax.errors import DataError, MoqeError
from moqe_jax.evaluate import (
    DirectionResult,
    EvalResult,
    check_vocab,
    corpus_scores,
    format_result,
    parse_directions,
    token_cross_entropy,
)

HYPS = ["The file could not be opened.", "cannot remove '%s': Permission denied", "Try 'ls --help' for info.",
        "missing operand", "invalid option -- %c"]
REFS = ["The file cannot be opened.", "cannot remove '%s': permission denied", "Try 'ls --help' for more information.",
        "missing file operand", "invalid option -- '%c'"]


def test_bleu_chrf_match_sacrebleu_directly():
    import sacrebleu

    sc = corpus_scores(HYPS, REFS, lang="en")
    assert sc.bleu == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    assert sc.chrf == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-9)
    assert 0 < sc.bleu < 100 and 0 < sc.chrf < 100
    assert "tok:13a" in sc.bleu_signature and "nrefs:1" in sc.bleu_signature
    assert sc.n == len(HYPS)
    # Chinese / Japanese targets use sacrebleu's zh / char tokenizers.
    zh_h, zh_r = ["无法打开文件", "权限不够"], ["无法打开该文件", "权限不足"]
    assert corpus_scores(zh_h, zh_r, "zh_CN").bleu == pytest.approx(
        sacrebleu.corpus_bleu(zh_h, [zh_r], tokenize="zh").score)
    assert "tok:char" in corpus_scores(["ファイル"], ["ファイルです"], "ja").bleu_signature
    perfect = corpus_scores(REFS, REFS)
    assert perfect.bleu == pytest.approx(100.0) and perfect.chrf == pytest.approx(100.0)
    with pytest.raises(DataError):
        corpus_scores(HYPS, REFS[:-1])


def _np_ce(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(x, labels[..., None], -1)[..., 0]
    ce = lse - picked
    return float(ce[mask].sum()), int(mask.sum())


@pytest.mark.parametrize("shape", [(2, 5, 17), (3, 7, 301)])
def test_token_cross_entropy_matches_numpy_float64(shape):
    rng = np.random.default_rng(sum(shape))
    logits = (rng.standard_normal(shape) * 4 + rng.standard_normal(shape[-1])).astype(np.float32)
    labels = rng.integers(0, shape[-1], shape[:2])
    mask = rng.random(shape[:2]) < 0.7
    mask[0, 0] = True
    logits[~mask] = np.nan  # masked positions must not leak (NaN * 0 would)
    s, n = token_cross_entropy(logits, labels, mask)
    ref_s, ref_n = _np_ce(np.nan_to_num(logits), labels, mask)
    assert n == ref_n
    assert s == pytest.approx(ref_s, rel=2e-6)
    s_all, n_all = token_cross_entropy(np.nan_to_num(logits), labels)
    assert n_all == shape[0] * shape[1]
    assert s_all == pytest.approx(_np_ce(np.nan_to_num(logits), labels, np.ones(shape[:2], bool))[0], rel=2e-6)
    with pytest.raises(DataError):
        token_cross_entropy(logits, labels[:, :-1])


def test_directions_and_vocab_errors():
    assert parse_directions("all")[:2] == ["en-fr", "fr-en"] and len(parse_directions(None)) == 20
    assert parse_directions("en-de, de-en,en-de") == ["en-de", "de-en"]
    with pytest.raises(MoqeError, match="en-xx"):
        parse_directions("en-de,en-xx")
    with pytest.raises(MoqeError):
        parse_directions(" , ")

    class Cfg:
        vocab_size = 512

    class M:
        config = Cfg()

    class Tok:
        def __init__(self, n):
            self.vocab_size = n

    check_vocab(M(), Tok(512))
    with pytest.raises(MoqeError, match="vocabulary size 8000 does not match the model's vocab_size 512"):
        check_vocab(M(), Tok(8000))
    Cfg.vocab_size = 32128
    check_vocab(M(), Tok(32100))  # T5X pads the vocabulary to a multiple of 128
    with pytest.raises(MoqeError):
        check_vocab(M(), Tok(32000))


def test_result_average_and_format():
    r = EvalResult(directions={"en-de": DirectionResult("en-de", 20.0, 50.0, 3, ce=1.5),
                               "de-en": DirectionResult("de-en", 30.0, 60.0, 3, ce=1.0)},
                   mlm_loss=2.5, mlm_tokens=10, tokens_per_s=100.0, gen_tokens=50)
    assert r.bleu == pytest.approx(25.0) and r.chrf == pytest.approx(55.0)
    txt = format_result(r, "x")
    assert "average" in txt and "25.00" in txt and "MLM" in txt
    d = r.to_dict()
    assert d["bleu"] == pytest.approx(25.0) and "hyps" not in d["directions"]["en-de"]
