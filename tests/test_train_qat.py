"""STE QAT from the bundled MoE model (reduced MoQE §4 experiment on the shipped corpus sample): 2-bit expert QAT
recovers the loss lost by 2-bit RTN, and the export is a packed QuantizedTensor model with the fake-quant forward."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from moqe_jax.api import Model, load_model
from moqe_jax.data.batching import BucketBatcher, encode_pairs
from moqe_jax.data.tokenizer import Tokenizer
from moqe_jax.evaluate import teacher_forced_loss
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.pipeline import quantize
from moqe_jax.quant.ste import fake_quant_params
from moqe_jax.training import MTData, qat_finetune

ASSETS = Path(__file__).resolve().parents[1] / "moqe_jax" / "assets" / "default"


@pytest.fixture(scope="module")
def bundled() -> tuple[Model, Tokenizer, list[dict]]:
    m = load_model(str(ASSETS / "moe"))
    m = m.replace(params=jax.tree.map(lambda a: np.asarray(a, np.float32), m.params))
    tok = Tokenizer(ASSETS / "tokenizer")
    rows = [json.loads(x) for x in (ASSETS / "sample.jsonl").read_text(encoding="utf-8").splitlines()]
    return m, tok, rows


def _ce(model: Model, ex: list) -> float:
    return teacher_forced_loss(model, ex, batch_size=64, max_src_len=32, max_tgt_len=32, progress=False)[0]


def test_bundled_model_sizes_and_vocab(bundled) -> None:
    m, tok, _ = bundled
    assert tok.vocab_size == m.config.vocab_size == 8000
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024
    dense = load_model(str(ASSETS / "dense"))
    assert dense.config.d_ff == m.config.d_ff and not dense.config.sparse_layers("encoder")


def test_qat_2bit_recovers_rtn_loss_and_exports_packed(bundled) -> None:
    m, tok, rows = bundled
    test = [r for r in rows if r["split"] == "test"]
    train_rows = [r for r in rows if r["split"] == "train"]
    ex = [(list(s), list(t)) for s, t in zip(*encode_pairs(test, tok, 32), strict=True)]
    spec = QuantSpec(bits=2)
    ce_float = _ce(m, ex)
    ce_rtn = _ce(quantize(m, spec, components=("experts",), method="rtn"), ex)
    src, tgt = encode_pairs(train_rows, tok, 32)
    data = MTData(BucketBatcher(src, tgt, 32, (16, 32), seed=0), [])
    q, res = qat_finetune(m, data, bits=2, steps=12, lr=1e-3, tokens_per_batch=None, log=lambda s: None)
    ce_qat = _ce(q, ex)
    print(f"teacher-forced CE: float {ce_float:.4f}  RTN-2bit {ce_rtn:.4f}  QAT-2bit {ce_qat:.4f}")
    assert ce_rtn > ce_float  # 2-bit RTN of the experts costs loss
    assert ce_qat < ce_rtn - 0.5 * (ce_rtn - ce_float)  # QAT recovers most of it
    # packed export: every expert kernel is a QuantizedTensor with uint8 codes, nothing else is quantized
    flat = jax.tree_util.tree_flatten_with_path(q.params, is_leaf=lambda x: isinstance(x, QuantizedTensor))[0]
    packed = {jax.tree_util.keystr(k): v for k, v in flat if isinstance(v, QuantizedTensor)}
    assert len(packed) == 4 and all("expert" in k for k in packed)
    assert all(v.packed.dtype == np.uint8 and v.spec.bits == 2 for v in packed.values())
    # the packed model's forward equals the fake-quant forward the QAT loss saw
    fq = Model(m.config, fake_quant_params(jax.tree.map(np.asarray, res.params), spec, ("experts",)))
    x = np.asarray([s[:16] for s, _ in ex[:4] if len(s) >= 16] or [ex[0][0][:8]])
    y = np.asarray([t[:8] for _, t in ex[:len(x)]]) if all(len(t) >= 8 for _, t in ex[:len(x)]) else x[:, :8]
    np.testing.assert_allclose(q.logits(x, y), fq.logits(x, y), rtol=1e-4, atol=1e-4)


def test_qat_recipe_tokenizer_fallback(tmp_path: Path) -> None:
    """train/qat.py tokenizes its training data with the model's tokenizer (the one it evaluates with):
    --tokenizer, MODEL/tokenizer, MODEL/../tokenizer, then DATA/tokenizer; none is one DataError naming the flag,
    raised before the model is read."""
    from moqe_jax.errors import DataError
    from train.qat import main, resolve_tokenizer

    model, data = tmp_path / "m" / "moe", tmp_path / "d"
    model.mkdir(parents=True)
    data.mkdir()
    with pytest.raises(DataError, match="pass --tokenizer"):
        main(["--model", str(model), "--data", str(data), "--runs", "qat", "--out", str(tmp_path / "o")])
    (data / "tokenizer").mkdir()
    assert resolve_tokenizer(None, str(model), str(data)) == data / "tokenizer"
    (model.parent / "tokenizer").mkdir()
    assert resolve_tokenizer(None, str(model), str(data)) == model.parent / "tokenizer"
    (model / "tokenizer").mkdir()
    assert resolve_tokenizer(None, str(model), str(data)) == model / "tokenizer"
    assert resolve_tokenizer(str(ASSETS / "tokenizer"), str(model), str(data)) == ASSETS / "tokenizer"
    with pytest.raises(DataError, match="pass --tokenizer"):
        resolve_tokenizer(str(tmp_path / "nope"), str(model), str(data))


def test_export_default_eval_only_refuses_without_models(tmp_path: Path) -> None:
    """``train/export_default.py --eval-only`` evaluates what is already exported: without --data or the
    exported model directories it stops with one message naming what is missing, and writes nothing."""
    from train.export_default import main

    with pytest.raises(SystemExit, match=r"--eval-only needs --data DIR .*missing: moe, dense, tokenizer"):
        main(["--eval-only", "--data", str(tmp_path), "--out", str(tmp_path / "assets")])
    with pytest.raises(SystemExit, match="--eval-only needs --data DIR"):
        main(["--eval-only", "--out", str(ASSETS)])
    assert list(tmp_path.iterdir()) == []
