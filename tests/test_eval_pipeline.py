"""evaluate_model / moqe eval / moqe demo on a random tiny model and a synthetic corpus + tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from moqe_jax.errors import MoqeError


@pytest.fixture(scope="module")
def syn():
    from eval.synthetic import synthetic_setup

    return synthetic_setup()


def _np_ce_sum(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    ce = lse - np.take_along_axis(x, labels[..., None], -1)[..., 0]
    return float(ce[mask].sum())


def test_mlm_and_teacher_forced_loss_match_numpy_on_model_logits(syn):
    from moqe_jax.evaluate import _pad_batch, _shift_right, load_tokenizer, mlm_examples, teacher_forced_loss

    model = syn["moe"]
    tok = load_tokenizer(syn["tokenizer"])
    texts = [line for line in (syn["data"] / "english.txt").read_text().split("\n") if line][:40]
    ex = mlm_examples(tok, texts, seed=3, inputs_length=24)
    assert len(ex) >= 3
    sentinel0 = tok.vocab_size - 1
    assert all(x[-1] == 1 and y[-1] == 1 and sentinel0 in x and y[0] == sentinel0 for x, y in ex)
    ex = ex[:3]
    loss, n = teacher_forced_loss(model, ex, batch_size=4, max_src_len=32, max_tgt_len=16)
    # independent recomputation: same padded batch through model.logits, CE in float64 NumPy
    x = _pad_batch([e[0] for e in ex], 32, 4, 0, 1)
    y = _pad_batch([e[1] for e in ex], 16, 4, 0, 1)
    mask = np.zeros_like(y, bool)
    for i, e in enumerate(ex):
        mask[i, :len(e[1])] = True
    dmask = np.concatenate([np.ones((4, 1), bool), mask[:, :-1]], 1)
    logits = model.logits(x, _shift_right(y, 0, 0), attention_mask=x != 0, decoder_attention_mask=dmask)
    assert n == int(mask.sum()) == sum(len(e[1]) for e in ex)
    assert loss == pytest.approx(_np_ce_sum(np.asarray(logits), y, mask) / n, rel=1e-5)
    assert 0.5 * np.log(512) < loss < 3 * np.log(512)  # random model: about log(V)


def test_evaluate_model_tiny(syn):
    from moqe_jax.evaluate import corpus_scores, evaluate_model, format_result

    r = evaluate_model(syn["moe"], tokenizer=syn["tokenizer"], data=syn["data"], directions="en-de,de-en",
                       samples=4, mt_loss=True, mlm=True, batch_size=8, max_src_len=32)
    assert list(r.directions) == ["en-de", "de-en"]
    for d in r.directions.values():
        assert d.n == 4 and len(d.hyps) == 4 and len(d.refs) == 4
        assert d.bleu == pytest.approx(corpus_scores(d.hyps, d.refs).bleu)
        assert np.isfinite(d.chrf) and d.ce > 0
    assert r.tokens_per_s > 0 and r.gen_tokens > 0
    assert r.mlm_loss > 0 and r.mlm_tokens > 0 and r.mt_ce > 0
    assert "tok:13a" in r.bleu_signature
    assert "average" in format_result(r)


def test_evaluate_errors(syn):
    from moqe_jax.evaluate import evaluate_model

    m = syn["moe"]
    bad = m.replace(config=m.config.replace(vocab_size=640))
    with pytest.raises(MoqeError, match="vocabulary size 512 does not match the model's vocab_size 640"):
        evaluate_model(bad, tokenizer=syn["tokenizer"], data=syn["data"], directions="en-de", samples=2)
    with pytest.raises(MoqeError, match="unknown direction"):
        evaluate_model(m, tokenizer=syn["tokenizer"], data=syn["data"], directions="en-de,xx-en", samples=2)
    with pytest.raises(MoqeError, match="direction en-ja: no test sentences"):
        evaluate_model(m, tokenizer=syn["tokenizer"], data=syn["data"], directions="en-ja", samples=2)
    with pytest.raises(MoqeError, match="needs data="):
        evaluate_model(m, tokenizer=syn["tokenizer"], directions="en-de")


def test_cli_eval_and_demo(syn, tmp_path, capsys):
    from moqe_jax.cli import main

    mdir = tmp_path / "m"
    syn["moe"].save(mdir)
    rc = main(["eval", str(mdir), "--data", str(syn["data"]), "--tokenizer", str(syn["tokenizer"]),
               "--directions", "en-de,de-en", "--samples", "3", "--mlm", "--batch-size", "8",
               "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "en-de" in out and "average" in out and "MLM (span-corruption) loss" in out and "signature" in out
    assert (tmp_path / "r.json").is_file()
    rc = main(["eval", str(mdir), "--data", str(syn["data"]), "--tokenizer", str(syn["tokenizer"]),
               "--directions", "en-qq"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown direction" in err and len(err.strip().splitlines()) == 1
    rc = main(["demo", "--model", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "missing") in err and "default_model" in err
