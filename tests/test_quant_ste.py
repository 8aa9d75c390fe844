"""STE QAT (moqe_jax.quant.ste): forward = packed quantizer, backward = identity, QAT beats RTN at 2 bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import random_tiny_model

from moqe_jax import api, ops
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.rtn import quantize_tensor
from moqe_jax.quant.ste import export_qat, fake_quant, fake_quant_params

SPECS = [QuantSpec(2), QuantSpec(3, symmetric=False, granularity=8), QuantSpec(4, "log", mse=True),
         QuantSpec("ternary"), QuantSpec(2, symmetric=False, mse=True)]


@pytest.mark.parametrize("spec", SPECS, ids=[s.describe() for s in SPECS])
def test_fake_quant_forward_is_the_packed_quantizer_and_grad_is_straight_through(spec, seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((3, 16, 8)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)
    fq = fake_quant(w, spec)
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(quantize_tensor(w, spec).dequantize()))

    def loss_of(v):
        return jnp.sum(jnp.tanh(jnp.einsum("eck,ekn->ecn", x, v)) * y)

    g_ste = jax.jit(jax.grad(lambda v: loss_of(fake_quant(v, spec))))(w)
    g_deq = jax.jit(jax.grad(loss_of))(fq)  # float gradient wrt the dequantized weight tensor
    np.testing.assert_allclose(np.asarray(g_ste), np.asarray(g_deq), rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(g_ste).sum()) > 0
    # clipped STE: zero exactly where w lies outside the grid's representable range, identical elsewhere
    g_clip = jax.jit(jax.grad(lambda v: loss_of(fake_quant(v, spec, True))))(w)
    qt = quantize_tensor(w, spec)
    k, gs = 16, spec.group_size(16)
    s = np.repeat(np.asarray(qt.scales, np.float64), gs, axis=-2)
    z = None if qt.zeros is None else np.repeat(np.asarray(qt.zeros, np.float64), gs, axis=-2)
    if spec.is_ternary:
        lo, hi = z, s
    elif spec.scheme == "log":
        lo, hi = -s, s
    elif spec.symmetric:
        lo, hi = -s * 2 ** (int(spec.bits) - 1), s * (2 ** (int(spec.bits) - 1) - 1)
    else:
        lo, hi = s * (0 - z), s * (spec.maxq - z)
    wn = np.asarray(w, np.float64)
    inside = (wn >= lo) & (wn <= hi)
    assert k == w.shape[-2]
    np.testing.assert_array_equal(np.asarray(g_clip)[~inside], 0.0)
    np.testing.assert_allclose(np.asarray(g_clip)[inside], np.asarray(g_deq)[inside], rtol=1e-6, atol=1e-7)
    if spec == QuantSpec(2):  # FT's clip at +absmax: the positive channel maxima are outside
        assert (~inside).sum() >= 1


def _moe_tree(rng, e=4, d=16, f=32):
    """A T5X-path params tree with one MoE layer (experts) and a dense layer (never quantized here)."""
    dense = jnp.asarray(rng.standard_normal((d, d)) / 4, jnp.float32)
    return {"encoder": {"layers_0": {"mlp": {"wi": {"kernel": dense}}},
                        "layers_1": {"mlp": {"expert": {
                            "wi": {"kernel": jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), jnp.float32)},
                            "wo": {"kernel": jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), jnp.float32)}}}}}}


def _forward(params, x):
    """x [E, C, D] -> residual dense + expert MLP (each expert gets its own tokens), via moqe_jax.ops."""
    h = x + jnp.tanh(ops.qmatmul(x, params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"], mode="xla"))
    ex = params["encoder"]["layers_1"]["mlp"]["expert"]
    a = jax.nn.relu(ops.grouped_qmatmul(h, ex["wi"]["kernel"], mode="xla"))
    return ops.grouped_qmatmul(a, ex["wo"]["kernel"], mode="xla")


def test_qat_recovers_2bit_loss_and_export_is_identical():
    """Teacher = the float model; 2-bit RTN of its experts loses; 300 steps of STE QAT get most of it back."""
    rng = np.random.default_rng(0)
    teacher = _moe_tree(rng, f=128)
    spec = QuantSpec(2)  # MoQE 2-bit, FT absmax channel-wise
    x_tr = jnp.asarray(rng.standard_normal((4, 2048, 16)), jnp.float32)
    x_te = jnp.asarray(rng.standard_normal((4, 256, 16)), jnp.float32)
    y_tr, y_te = _forward(teacher, x_tr), _forward(teacher, x_te)

    def mse(p, x, y):
        return jnp.mean((_forward(p, x) - y) ** 2)

    rtn = export_qat(teacher, spec)  # = RTN of the float weights
    assert isinstance(rtn["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"], QuantizedTensor)
    assert not isinstance(rtn["encoder"]["layers_0"]["mlp"]["wi"]["kernel"], QuantizedTensor)
    loss_rtn = float(mse(rtn, x_te, y_te))
    opt = optax.adam(3e-3)  # clipped STE, lr 3e-3: RTN 0.22 -> QAT 0.09 at seed 0
    params, state = teacher, opt.init(teacher)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: mse(fake_quant_params(p, spec, clip_grad=True), x_tr, y_tr))(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    for _ in range(300):
        params, state, _ = step(params, state)
    fq = fake_quant_params(params, spec)
    loss_qat = float(mse(fq, x_te, y_te))
    exported = export_qat(params, spec)
    out_fq = np.asarray(jax.jit(_forward)(fq, x_te))
    out_ex = np.asarray(jax.jit(_forward)(exported, x_te))
    print(f"2-bit expert MSE vs float teacher: RTN {loss_rtn:.4f}, QAT {loss_qat:.4f}")
    assert loss_qat < 0.6 * loss_rtn, (loss_rtn, loss_qat)
    np.testing.assert_array_equal(out_ex, out_fq)  # export after QAT: identical forward


def test_fake_quant_params_policy_and_tiny_switch_export(seed):
    """On the `tiny` Switch preset: fake-quant model and exported model give identical logits."""
    model = random_tiny_model(seed)
    spec = QuantSpec(2, symmetric=False)
    comps = ("experts", "dense")
    fq = api.Model(model.config, fake_quant_params(model.params, spec, comps))
    ex = export_qat(model, spec, comps)
    assert isinstance(ex, api.Model)
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, model.config.vocab_size, size=(2, 7))
    dids = rng.integers(2, model.config.vocab_size, size=(2, 5))
    np.testing.assert_array_equal(ex.with_kernels("xla").logits(ids, dids), fq.with_kernels("xla").logits(ids, dids))
