"""eval/dead_inputs.py: its FFN-input capture is the calibration driver's, and its per-expert errors split by
dead inputs as the solver behaves (docs/QMOE.md §3.9)."""

from __future__ import annotations

import numpy as np
from _helpers import random_tiny_model

from eval.dead_inputs import capture_ffn_inputs, layer_errors, summarize
from moqe_jax.calibration import gptq_quantize_model, synthetic_batches
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.gptq_ffn import GPTQOptions, compress_ffn

TERN = QuantSpec(bits="ternary")


def test_capture_matches_the_driver_and_errors_split_by_dead_inputs(seed):
    tiny = random_tiny_model(seed % 1000)
    cfg = tiny.config
    enc_layer = next(f"layers_{i}" for i in range(cfg.num_layers) if cfg.is_sparse("encoder", i))
    p = tiny.params
    lp = p["encoder"][enc_layer]
    wi = np.asarray(lp["mlp"]["expert"]["wi"]["kernel"]).copy()
    wi[0, :, :3] = 0.0  # hidden units 0-2 of expert 0 never fire: dead inputs of its wo, on every token
    ex = dict(lp["mlp"]["expert"], wi={"kernel": wi})
    tiny = tiny.replace(params=dict(p, encoder=dict(p["encoder"], **{enc_layer: dict(lp, mlp=dict(
        lp["mlp"], expert=ex))})))
    calib = synthetic_batches(cfg.vocab_size, 16, 12, 8, seed=seed % 1000)
    held = synthetic_batches(cfg.vocab_size, 16, 12, 8, seed=seed % 1000 + 1)
    cal_x, held_x = capture_ffn_inputs(tiny, calib), capture_ffn_inputs(tiny, held)
    enc = [k for k in cal_x if k.startswith("encoder/")]
    assert enc[0] == f"encoder/{enc_layer}/mlp" and set(cal_x) == set(held_x)
    name = f"encoder/{enc_layer}/mlp"  # the first sparse layer sees the float model's inputs in the driver too
    stack, layer = name.split("/")[:2]
    mlp = tiny.params[stack][layer]["mlp"]
    got, _ = gptq_quantize_model(tiny, TERN, calib)  # dead inputs kept: the QMoE default
    mine, _ = compress_ffn(mlp, True, *cal_x[name], TERN, GPTQOptions(), name, None)
    for k in ("wi", "wo"):
        np.testing.assert_array_equal(np.asarray(got.params[stack][layer]["mlp"]["expert"][k]["kernel"].codes()),
                                      np.asarray(mine[k].codes()))
    rows = layer_errors(mlp, cal_x[name], held_x[name], TERN, name)
    e = mlp["expert"]["wi"]["kernel"].shape[0]
    assert len(rows) == 2 * e and all(r["dead"] == 0 for r in rows if r["kernel"] == "wi" and r["calib_tokens"])
    for r in rows:  # no dead input: no dead-input step, the two solutions are the same
        if r["calib_tokens"] and r["dead"] == 0:
            assert r["heldout_keep"] == r["heldout_zero"] and r["calib_keep"] == r["calib_zero"]
    forced = next(r for r in rows if r["kernel"] == "wo" and r["expert"] == 0)
    assert forced["dead"] >= 3
    if forced["dead"] == 3 and forced["heldout_tokens"]:  # only the units that never fire are dead
        assert forced["dead_fire_rate"] == 0.0
    s = {(x["kernel"], x["class"]): x for x in summarize(rows)}
    assert s[("wo", "with dead inputs")]["experts"] >= 1 and s[("wi", "with dead inputs")]["experts"] == 0
    for k in ("wi", "wo"):
        assert s[(k, "all")]["experts"] == s[(k, "with dead inputs")]["experts"] + s[(k, "without")]["experts"]
