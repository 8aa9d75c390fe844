"""Component policy (moqe_jax.quant.policy) on T5X Switch trees; loud failures; quantize_model_rtn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_tiny_model

from moqe_jax import api
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import QuantizationError
from moqe_jax.model.components import component_of
from moqe_jax.model.switch import init_params
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.policy import parse_components, plan_quantization, quantize_model_rtn
from moqe_jax.quant.rtn import quantize_tensor
from moqe_jax.tree import flatten_params


def shapes(name="tiny", **kw):
    cfg = SwitchConfig.preset(name, **kw)
    return jax.eval_shape(lambda: init_params(cfg, 0))


def test_default_is_experts_only_and_components_select_exactly():
    tree = shapes()
    flat = flatten_params(tree)
    plan = plan_quantization(tree, QuantSpec(4))
    experts = {p for p in flat if component_of(p) == "experts"}
    assert set(plan) == experts and len(experts) == 4  # wi/wo of the encoder and decoder MoE layers
    assert all("/expert/" in p and p.endswith("/kernel") for p in plan)
    comps = ("experts", "dense", "self_attn", "cross_attn", "embeddings")
    plan = plan_quantization(tree, QuantSpec(4), comps)
    assert set(plan) == {p for p in flat if component_of(p) in comps}
    assert not any(component_of(p) in ("router", "norms", "relpos") for p in plan)
    # the router and relpos table only when asked by name
    plan = plan_quantization(tree, QuantSpec(8), "router,relpos")
    assert {component_of(p) for p in plan} == {"router", "relpos"}
    assert parse_components("attention") == ("self_attn", "cross_attn")


def test_overrides_per_layer_and_exclusion():
    tree = shapes()
    plan = plan_quantization(tree, QuantSpec(2), ("experts", "self_attn"),
                             overrides={r"^encoder/layers_1/mlp/expert/wo": QuantSpec(8), r"^decoder/": None})
    assert plan["encoder/layers_1/mlp/expert/wo/kernel"] == QuantSpec(8)
    assert plan["encoder/layers_1/mlp/expert/wi/kernel"] == QuantSpec(2)
    assert not any(p.startswith("decoder/") for p in plan)
    # an override can also add a parameter outside the components
    plan = plan_quantization(tree, QuantSpec(4), overrides={"token_embedder": QuantSpec(8)})
    assert plan["token_embedder/embedding"] == QuantSpec(8)


def test_policy_fails_loudly():
    dense = shapes(encoder_sparse_step=0, decoder_sparse_step=0)
    with pytest.raises(QuantizationError, match="'experts' matches no parameter.*dense model"):
        plan_quantization(dense, QuantSpec(2))
    tree = shapes()
    with pytest.raises(QuantizationError, match="override 'layers_99' matches no parameter"):
        plan_quantization(tree, QuantSpec(2), overrides={"layers_99": QuantSpec(8)})
    with pytest.raises(QuantizationError, match="norm"):
        plan_quantization(tree, QuantSpec(2), ("experts", "norms"))
    with pytest.raises(QuantizationError, match="unknown component 'expertz'"):
        plan_quantization(tree, QuantSpec(2), "expertz")
    with pytest.raises(QuantizationError, match="1-D"):
        plan_quantization(tree, QuantSpec(2), overrides={"encoder_norm": QuantSpec(8)})
    with pytest.raises(QuantizationError, match="invalid quantization spec"):
        plan_quantization(tree, {"bits": 7})
    with pytest.raises(QuantizationError, match="bad override regex"):
        plan_quantization(tree, QuantSpec(2), overrides={"(": None})


def test_quantize_model_rtn_on_tiny_switch(seed):
    model = random_tiny_model(seed)
    spec = QuantSpec(8, symmetric=False)
    q = quantize_model_rtn(model, spec, ("experts", "dense"))
    assert isinstance(q, api.Model) and q.config == model.config
    fq = flatten_params(q.params)
    ff = flatten_params(model.params)
    assert fq.keys() == ff.keys()
    nq = 0
    for path, leaf in fq.items():
        if component_of(path) in ("experts", "dense"):
            assert isinstance(leaf, QuantizedTensor) and leaf.spec == spec and leaf.shape == ff[path].shape
            ref = quantize_tensor(ff[path], spec)
            np.testing.assert_array_equal(np.asarray(leaf.packed), np.asarray(ref.packed))
            nq += 1
        else:
            assert leaf is ff[path]
    assert nq == 4 + 4  # expert wi/wo x 2 stacks + dense wi/wo x 2 stacks
    # a params tree in -> a params tree out; re-quantizing a quantized leaf is refused
    qp = quantize_model_rtn(model.params, spec)
    assert isinstance(qp["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"], QuantizedTensor)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model_rtn(q, spec, ("experts",))
    # NaN in a weight: the error names the parameter path
    bad = jax.tree_util.tree_map(lambda x: x, model.params)
    bad["decoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"] = (
        bad["decoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"].at[1, 2, 3].set(jnp.nan))
    with pytest.raises(QuantizationError, match="decoder/layers_1/mlp/expert/wo/kernel.*NaN"):
        quantize_model_rtn(bad, spec)
    # the quantized model runs; 8-bit experts+dense stay close to the float logits
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, model.config.vocab_size, size=(2, 6))
    dids = rng.integers(2, model.config.vocab_size, size=(2, 4))
    lf, lq = model.logits(ids, dids), q.logits(ids, dids)
    assert np.isfinite(lq).all() and not np.array_equal(lf, lq)
    print("rel mean err", np.abs(lq - lf).mean() / np.abs(lf).mean())
    assert np.abs(lq - lf).mean() < 0.05 * np.abs(lf).mean()  # (max is dominated by rare top-1 routing flips)
