"""The one sharding rule table (moqe_jax.sharding) on the Switch param tree, packed expert leaves included."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from moqe_jax import sharding as shd
from moqe_jax.api import Model, param_shapes
from moqe_jax.config import SwitchConfig
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec


def test_every_param_has_a_rule_with_matching_rank():
    for name in ("tiny", "switch-xxl-128"):
        for path, shape in param_shapes(SwitchConfig.preset(name)).items():
            axes = shd.logical_axes(path, len(shape))
            assert len(axes) == len(shape) and any(a is not None for a in axes), path
    assert shd.logical_axes("encoder/layers_1/mlp/expert/wo/kernel", 3) == ("expert", "mlp", "embed")


def test_specs_and_shard_with_quantized_expert_leaf(seed):
    m = Model.init("tiny", 0)
    p = m.params
    e, d, f = m.config.num_experts, m.config.d_model, m.config.d_ff
    spec = QuantSpec(4, symmetric=False)
    rng = np.random.default_rng(seed)
    qt = QuantizedTensor.from_codes(rng.integers(0, 16, (e, d, f)), np.ones((e, 1, f)),
                                    rng.integers(0, 16, (e, 1, f)).astype(np.float32), spec)
    p["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"] = qt
    specs = shd.param_specs(p, AbstractMesh((1, 2, 2), shd.MESH_AXES))
    ex = specs["encoder"]["layers_1"]["mlp"]["expert"]
    assert ex["wo"]["kernel"] == P("expert", "model", None)
    assert specs["token_embedder"]["embedding"] == P("model", None)
    assert isinstance(ex["wi"]["kernel"], QuantizedTensor)
    assert ex["wi"]["kernel"].packed == P("expert", None, None)
    assert ex["wi"]["kernel"].scales == ex["wi"]["kernel"].zeros == P("expert", None, None)
    axes = shd.param_axes(p)["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    assert axes == ("expert", "embed", "mlp")
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), shd.MESH_AXES)
    sp = jax.device_put(p, shd.param_shardings(p, mesh))
    q2 = sp["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    assert isinstance(q2, QuantizedTensor)
    np.testing.assert_array_equal(np.asarray(q2.dequantize()), np.asarray(qt.dequantize()))
