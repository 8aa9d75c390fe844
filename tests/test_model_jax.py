"""JAX-native `Model`: a pytree usable inside a caller's jit/grad, kernel mode as static trace data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moqe_jax import ops
from moqe_jax.api import Model
from moqe_jax.config import SwitchConfig
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.rtn import quantize_tensor
from moqe_jax.tree import flatten_params, unflatten_params


@pytest.fixture
def model(seed: int) -> Model:
    return Model.init(SwitchConfig.preset("tiny").replace(dtype="float32"), seed=seed % (1 << 30))


def _ids(seed: int, cfg: SwitchConfig, shape: tuple[int, int]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(2, cfg.vocab_size, shape), jnp.int32)


def _quantize_experts(m: Model) -> Model:
    flat = {k: quantize_tensor(v, QuantSpec(4, symmetric=False), k) if "expert" in k and k.endswith("kernel") else v
            for k, v in flatten_params(m.params).items()}
    return m.replace(params=unflatten_params(flat))


def test_jit_of_logits_equals_eager(model: Model, seed: int) -> None:
    ids, dec = _ids(seed, model.config, (2, 7)), _ids(seed + 1, model.config, (2, 5))
    eager = model.logits(ids, dec)
    assert isinstance(eager, jax.Array) and eager.shape == (2, 5, model.config.vocab_size)
    jitted = jax.jit(lambda m, i, d: m.logits(i, d))(model, ids, dec)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
    leaves, treedef = jax.tree_util.tree_flatten(model)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.config == model.config and back.kernels == model.kernels


def test_grad_through_model_matches_finite_difference(model: Model, seed: int) -> None:
    ids, dec = _ids(seed, model.config, (2, 6)), _ids(seed + 1, model.config, (2, 4))
    labels = _ids(seed + 2, model.config, (2, 4))

    def loss(m: Model) -> jax.Array:
        logp = jax.nn.log_softmax(m.logits(ids, dec), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))

    g = jax.jit(jax.grad(loss))(model)
    assert isinstance(g, Model)
    gl = jax.tree_util.tree_leaves(g.params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in gl)
    # one coordinate of the decoder's output-norm scale, central difference in float32
    path = ("decoder", "decoder_norm", "scale")
    i = int(np.random.default_rng(seed).integers(model.config.d_model))

    def at(delta: float) -> float:
        p = jax.tree_util.tree_map(lambda x: x, model.params)
        p[path[0]][path[1]][path[2]] = p[path[0]][path[1]][path[2]].at[i].add(delta)
        return float(loss(model.replace(params=p)))

    eps = 1e-2
    fd = (at(eps) - at(-eps)) / (2 * eps)
    analytic = float(g.params[path[0]][path[1]][path[2]][i])
    assert analytic == pytest.approx(fd, rel=5e-2, abs=2e-4)


def test_kernel_mode_switch_retraces_jitted_logits(model: Model, seed: int) -> None:
    qm = _quantize_experts(model)
    ids, dec = _ids(seed, qm.config, (2, 6)), _ids(seed + 1, qm.config, (2, 4))

    def jaxpr(m: Model) -> str:
        return str(jax.make_jaxpr(lambda mm, i, d: mm.logits(i, d))(m, ids, dec))

    assert "pallas_call" in jaxpr(qm.with_kernels("interpret"))
    assert "pallas_call" not in jaxpr(qm.with_kernels("xla"))
    # one jitted function: the mode is static aux data, so switching it retraces instead of reusing a trace
    traces = []

    @jax.jit
    def logits(m: Model, i: jax.Array, d: jax.Array) -> jax.Array:
        traces.append(m.kernels)
        return m.logits(i, d)

    y_xla = logits(qm.with_kernels("xla"), ids, dec)
    y_int = logits(qm.with_kernels("interpret"), ids, dec)
    assert traces == ["xla", "interpret"]
    np.testing.assert_allclose(np.asarray(y_int), np.asarray(y_xla), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="kernel mode"):
        qm.with_kernels("cuda")


def test_quantized_tensor_vmap_and_index_under_jit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    e, k, n = 4, 32, 24
    spec = QuantSpec(3, symmetric=False, granularity=16)
    qt = QuantizedTensor.from_codes(rng.integers(0, 8, (e, k, n)), rng.uniform(0.1, 1, (e, 2, n)),
                                    rng.integers(0, 8, (e, 2, n)).astype(np.float32), spec)
    full = np.asarray(qt.dequantize())
    x = jnp.asarray(rng.standard_normal((e, 3, k)), jnp.float32)
    y = jax.vmap(lambda xe, we: ops.qmatmul(xe, we, mode="xla"))(x, qt)
    np.testing.assert_allclose(np.asarray(y), np.einsum("eck,ekn->ecn", np.asarray(x), full), rtol=1e-5, atol=1e-5)
    y_k = jax.vmap(lambda xe, we: ops.qmatmul(xe, we, mode="interpret"))(x, qt)
    np.testing.assert_allclose(np.asarray(y_k), np.asarray(y), rtol=1e-5, atol=1e-5)
    i = int(rng.integers(e))
    got = jax.jit(lambda t, j: t[j].dequantize())(qt, jnp.int32(i))
    np.testing.assert_array_equal(np.asarray(got), full[i])
    ids = jnp.asarray(rng.integers(0, e, 3), jnp.int32)
    xi = jnp.asarray(rng.standard_normal((3, 2, k)), jnp.float32)
    yi = jax.jit(lambda a, w, j: ops.indexed_qmatmul(a, w, j, mode="interpret"))(xi, qt, ids)
    ref = np.einsum("ack,akn->acn", np.asarray(xi), full[np.asarray(ids)])
    np.testing.assert_allclose(np.asarray(yi), ref, rtol=1e-5, atol=1e-5)
