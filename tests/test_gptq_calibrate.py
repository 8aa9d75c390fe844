"""Layer-by-layer GPTQ calibration (QMoE §3): Hessians, masking, tiny-model quality, resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from moqe_jax.api import Model
from moqe_jax.calibration import gptq_quantize_model
from moqe_jax.errors import CheckpointError, DataError, QuantizationError
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.gptq_ffn import GPTQOptions, compress_ffn
from moqe_jax.quant.hessians import cap_and_sort, expert_hessians, token_mask
from moqe_jax.quant.policy import quantize_model_rtn

TERN = QuantSpec(bits="ternary")


def _zipf_batches(seed: int, n: int, vocab: int = 128, b: int = 4, l: int = 16, t: int = 12) -> list[dict]:
    """Calibration-like token streams: Zipf-distributed ids with local repetition (not uniform noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = np.minimum(rng.zipf(1.3, size=(b, l + t)), vocab - 1).astype(np.int32)
        ids = np.where(rng.random(ids.shape) < 0.3, np.roll(ids, 1, axis=1), ids)
        ids = np.maximum(ids, 2)
        out.append({"input_ids": ids[:, :l], "decoder_input_ids": np.concatenate(
            [np.zeros((b, 1), np.int32), ids[:, l:l + t - 1]], axis=1)})
    return out


@pytest.fixture(scope="module")
def tiny() -> Model:
    return Model.init("tiny", seed=0)


def test_expert_hessians_and_token_cap_match_numpy_loops():
    rng = np.random.default_rng(0)
    e, d, n = 5, 6, 90
    x = rng.standard_normal((n, d)).astype(np.float32)
    ex = rng.choice(e, size=n, p=[0.6, 0.2, 0.1, 0.1, 0.0])  # skewed load, expert 4 empty
    keep, counts, cap = cap_and_sort(ex, e, factor=2.0)
    assert cap == int(2.0 * n / e)
    h = expert_hessians(x[keep], counts, range(e))
    for j in range(e):
        toks = np.nonzero(ex == j)[0][:cap]  # first tokens in order win
        assert counts[j] == len(toks)
        xe = x[toks].astype(np.float64)
        want = 2 * xe.T @ xe if len(toks) else np.eye(d)
        np.testing.assert_allclose(h[j], want, rtol=2e-5, atol=1e-5)
    assert counts[0] == cap < np.sum(ex == 0)  # the hot expert was capped


def test_token_mask_padding_and_sentinels():
    ids = np.array([[5, 7, 3000, 9, 0, 0]])
    valid = ids > 0
    np.testing.assert_array_equal(token_mask(ids, valid, 3000, decoder=False), [[1, 1, 0, 1, 0, 0]])
    dec = np.array([[0, 5, 3001, 6, 7, 8]])
    np.testing.assert_array_equal(token_mask(dec, np.ones_like(dec, bool), 3000, decoder=True),
                                  [[1, 0, 1, 1, 1, 0]])  # position before the sentinel and the last one
    np.testing.assert_array_equal(token_mask(ids, valid, None, decoder=False), valid)


def _kl_to_float(float_model: Model, q_model: Model, batches: list[dict]) -> float:
    tot = 0.0
    for b in batches:
        p = np.asarray(float_model.logits(b["input_ids"], b["decoder_input_ids"]), np.float64)
        q = np.asarray(q_model.logits(b["input_ids"], b["decoder_input_ids"]), np.float64)
        lp = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
        lq = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
        tot += float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    return tot / len(batches)


def test_tiny_model_ternary_gptq_beats_rtn_on_heldout(tiny):
    calib, heldout = _zipf_batches(1, 6), _zipf_batches(2, 3)
    g, rep = gptq_quantize_model(tiny, TERN, calib)
    r = quantize_model_rtn(tiny, TERN)
    for stack in ("encoder", "decoder"):
        for k in ("wi", "wo"):
            leaf = g.params[stack]["layers_1"]["mlp"]["expert"][k]["kernel"]
            assert isinstance(leaf, QuantizedTensor) and leaf.shape[0] == tiny.config.num_experts
            # GPTQ keeps RTN's grid (min-max of the original rows) but moves codes
            np.testing.assert_array_equal(np.asarray(leaf.scales),
                                          np.asarray(r.params[stack]["layers_1"]["mlp"]["expert"][k]["kernel"].scales))
    assert not isinstance(g.params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"], QuantizedTensor)
    assert [lr.name for lr in rep.layers] == ["encoder/layers_1/mlp", "decoder/layers_1/mlp"]
    for lr in rep.layers:
        assert lr.solved + lr.fallbacks + lr.zero_token == lr.experts and lr.tokens > 0
        assert lr.rel_err_gptq < lr.rel_err_rtn
    kl_g, kl_r = _kl_to_float(tiny, g, heldout), _kl_to_float(tiny, r, heldout)
    assert kl_g < kl_r, (kl_g, kl_r)
    assert "encoder/layers_1/mlp" in rep.table() and rep.peak_rss_mb > 0


def test_resume_after_crash_gives_identical_model(tiny, tmp_path):
    calib = _zipf_batches(3, 2)
    spec = QuantSpec(bits=2, symmetric=False)
    kw = dict(components=("experts", "dense"), group_experts=2)
    full, full_rep = gptq_quantize_model(tiny, spec, calib, **kw)

    class Boom(RuntimeError):
        pass

    def crash(name: str) -> None:
        if name == "decoder/layers_0":
            raise Boom(name)

    ck = tmp_path / "ck"
    with pytest.raises(Boom):
        gptq_quantize_model(tiny, spec, calib, checkpoint_dir=ck, on_layer_done=crash, **kw)
    seen = []
    res, rep = gptq_quantize_model(tiny, spec, calib, checkpoint_dir=ck, on_layer_done=seen.append, **kw)
    assert seen == ["decoder/layers_1"] and rep.resumed_layers == 3
    assert [lr.name for lr in rep.layers] == [lr.name for lr in full_rep.layers]
    import jax

    a = jax.tree_util.tree_leaves(full.params)
    b = jax.tree_util.tree_leaves(res.params)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        gptq_quantize_model(tiny, spec, _zipf_batches(4, 1), checkpoint_dir=ck, **kw)


def test_padding_only_zero_token_expert_and_bad_inputs(tiny):
    pad = [{"input_ids": np.zeros((2, 8), np.int32), "decoder_input_ids": np.zeros((2, 5), np.int32),
            "decoder_attention_mask": np.zeros((2, 5), np.int32)}]
    out, rep = gptq_quantize_model(tiny, TERN, pad)
    assert all(lr.zero_token == lr.experts and lr.solved == 0 for lr in rep.layers)
    assert any("no usable encoder token" in w for w in rep.warnings)
    assert "received no calibration token" in rep.table()
    rtn = quantize_model_rtn(tiny, TERN)
    leaf = out.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    np.testing.assert_array_equal(np.asarray(leaf.packed),
                                  np.asarray(rtn.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"].packed))

    # an expert whose router column ties with expert 0 is never chosen (argmax takes the lowest index)
    p = tiny.params
    mlp = p["encoder"]["layers_1"]["mlp"]
    w = np.asarray(mlp["router"]["router_weights"]["w"]["kernel"]).copy()
    w[:, 3] = w[:, 0]
    mlp = dict(mlp, router={"router_weights": {"w": {"kernel": w}}})
    model = tiny.replace(params=dict(p, encoder=dict(p["encoder"], layers_1=dict(p["encoder"]["layers_1"], mlp=mlp))))
    _, rep = gptq_quantize_model(model, TERN, _zipf_batches(5, 2))
    assert rep.layers[0].zero_token >= 1 and rep.layers[0].solved == 4 - rep.layers[0].zero_token

    # NaN activations for one expert -> NaN Hessian -> that expert falls back to RTN, reported
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, tiny.config.d_model)).astype(np.float32)
    ex = np.arange(40) % 4
    x[ex == 2] = np.nan
    _, lrep = compress_ffn(p["encoder"]["layers_1"]["mlp"], True, x, ex, TERN,
                           GPTQOptions(max_tokens_factor=4, percdamp=0.1, actorder=False, group_experts=4,
                                       blocksize=128, true_sequential=False), "enc1", None)
    assert lrep.fallbacks == 1 and lrep.solved == 3 and "fell back to RTN" in lrep.notes[0]

    with pytest.raises(DataError, match="decoder_input_ids"):
        gptq_quantize_model(tiny, TERN, [{"input_ids": np.ones((1, 4), np.int32)}])
    with pytest.raises(DataError, match="empty"):
        gptq_quantize_model(tiny, TERN, [])
    bad = dict(p, encoder=dict(p["encoder"], layers_1=dict(p["encoder"]["layers_1"], mlp=dict(
        p["encoder"]["layers_1"]["mlp"], expert=dict(p["encoder"]["layers_1"]["mlp"]["expert"], wi={
            "kernel": np.full(np.shape(p["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]), np.nan,
                              np.float32)})))))
    with pytest.raises(QuantizationError, match="encoder/layers_1/mlp/wi/kernel: NaN"):
        gptq_quantize_model(tiny.replace(params=bad), TERN, _zipf_batches(6, 1))
