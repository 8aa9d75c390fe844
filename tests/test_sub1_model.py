"""End to end: RTN-ternary tiny Switch -> compress_sub1 -> identical logits, save/load through the store."""

import jax
import numpy as np

import moqe_jax
from moqe_jax.api import Model, load_model
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.packed.sub1 import Sub1Tensor


def test_compress_model_logits_and_store(tmp_path, seed):
    m = Model.init("tiny", seed=0)
    q = moqe_jax.quantize(m, QuantSpec(bits="ternary"), method="rtn")
    c, rep = moqe_jax.compress_sub1(q, verbose=False)
    flat = jax.tree_util.tree_leaves(c.params, is_leaf=lambda x: isinstance(x, (Sub1Tensor, QuantizedTensor)))
    leaves = [x for x in flat if isinstance(x, Sub1Tensor)]
    assert leaves and rep.tensors == len(leaves)
    assert 0 < rep.bits_per_param < 16
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 100, (2, 7))
    dids = rng.integers(2, 100, (2, 5))
    a = q.logits(ids, dids)
    np.testing.assert_array_equal(c.logits(ids, dids), a)
    c.save(tmp_path / "m")
    r = load_model(tmp_path / "m")
    np.testing.assert_array_equal(r.logits(ids, dids), a)


def test_compress_cli_format_sub1(tmp_path, capsys, monkeypatch):
    from moqe_jax.cli import main

    monkeypatch.setenv("MOQE_NO_PROGRESS", "1")
    out = tmp_path / "s1"
    rc = main(["compress", "init:tiny", "--bits", "ternary", "--method", "rtn", "--format", "sub1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "bits/param" in text and "vs bf16" in text
    m = load_model(str(out))
    leaf = m.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    assert isinstance(leaf, Sub1Tensor) and leaf.spec.is_ternary
    ref = moqe_jax.quantize(Model.init("tiny", seed=0), QuantSpec(bits="ternary"), method="rtn")
    np.testing.assert_array_equal(np.asarray(leaf.codes()),
                                  np.asarray(ref.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"].codes()))
    assert main(["compress", "init:tiny", "--bits", "2", "--method", "rtn", "--format", "sub1",
                 "--out", str(tmp_path / "x")]) == 2
