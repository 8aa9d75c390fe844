"""Logical axes / partition specs of the Switch param tree (incl. packed expert leaves)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from moqe_jax.api import Model, param_shapes
from moqe_jax.model.partitioning import logical_axes, partition_specs, shard_params
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec


def test_logical_axes_cover_every_param_with_matching_rank():
    from moqe_jax.config import SwitchConfig

    for name in ("tiny", "switch-xxl-128"):
        for path, shape in param_shapes(SwitchConfig.preset(name)).items():
            assert len(logical_axes(path)) == len(shape), path
    assert logical_axes("encoder/layers_1/mlp/expert/wo/kernel") == ("expert", "expert_mlp", "mlp_embed")


def test_partition_specs_and_shard_with_quantized_leaf():
    m = Model.init("tiny", 0)
    p = m.params
    qt = QuantizedTensor.from_codes(np.random.RandomState(0).randint(0, 16, (4, 32, 64)),
                                    np.ones((4, 1, 64)), None, QuantSpec(bits=4))
    p["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"] = qt
    s = partition_specs(p)
    assert s["encoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"] == PartitionSpec("expert", "model", None)
    assert s["token_embedder"]["embedding"] == PartitionSpec("model", None)
    assert s["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"].packed == PartitionSpec("expert")
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "expert", "model"))
    sp = shard_params(p, mesh)
    q2 = sp["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    assert isinstance(q2, QuantizedTensor)
    np.testing.assert_array_equal(np.asarray(q2.dequantize()), np.asarray(qt.dequantize()))
