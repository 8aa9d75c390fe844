"""Size report (moqe_jax.quant.report): projected (no allocation) vs real nbytes; MoQE / QMoE headline sizes."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from moqe_jax import api
from moqe_jax.config import SwitchConfig
from moqe_jax.model.api import param_shapes
from moqe_jax.model.components import component_of
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.policy import quantize_model_rtn
from moqe_jax.quant.report import moqe_5p3b_config, projected_report, size_report
from moqe_jax.tree import flatten_params


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def test_projected_switch_base_128_2bit_experts_without_allocation():
    before = _live_bytes()
    rep = projected_report("switch-base-128", QuantSpec(2))
    assert _live_bytes() - before < 1 << 20  # nothing close to the 14.8 GB of weights was allocated
    shapes = param_shapes(rep_cfg := SwitchConfig.preset("switch-base-128"))
    assert rep.name == rep_cfg.name and rep.projected
    # independent count from the parameter shapes: packed 2-bit codes along K + one fp32 scale per (expert, column)
    n_exp = sum(math.prod(s) for p, s in shapes.items() if component_of(p) == "experts")
    b_exp = sum(s[0] * (-(-s[1] // 8) * 8) * s[2] // 4 + 4 * s[0] * s[2]
                for p, s in shapes.items() if component_of(p) == "experts")
    n_all = sum(math.prod(s) for s in shapes.values())
    assert rep["experts"].params == n_exp and rep.total.params == n_all
    assert abs(n_all / 1e9 - 7.415) < 1e-3  # docs/T5X_SWITCH.md §2 count
    assert rep["experts"].bytes_after == b_exp
    assert rep["experts"].quantized_params == n_exp and rep["dense"].quantized_params == 0
    assert rep.total.bytes_after == b_exp + 2 * (n_all - n_exp)
    assert rep["experts"].bits_per_param == pytest.approx(2.026, abs=1e-3)
    assert rep.total.reduction_vs_16bit == pytest.approx(0.854, abs=1e-3)
    table = rep.format_table()
    assert "experts" in table and "int2-linear-sym-channel" in table and "-85.4%" in table


def test_moqe_5p3b_headline_79_6_percent():
    """docs/MOQE.md §3: 5.31B params, 91.0 % experts; % of the fp16 MoE = 54.5 / 31.8 / 26.1 / 20.4 at 8/4/3/2 bits."""
    cfg = moqe_5p3b_config()
    base = projected_report(cfg, None)
    assert base.total.params / 1e9 == pytest.approx(5.31, abs=0.01)
    assert base["experts"].params / base.total.params == pytest.approx(0.910, abs=0.001)
    for bits, pct in ((8, 54.5), (4, 31.8), (3, 26.1), (2, 20.4)):
        rep = projected_report(cfg, QuantSpec(bits))
        frac = rep.total.bytes_after / base.total.bytes_16bit
        # the paper's table ignores the fp32 per-channel scales (+0.02-0.03 bits/param on experts)
        assert 100 * frac == pytest.approx(pct, abs=0.2), (bits, 100 * frac)
    assert rep.total.reduction_vs_16bit == pytest.approx(0.796, abs=0.002)


def _random_tiny(seed: int):
    cfg = SwitchConfig.preset("tiny")
    rng = np.random.default_rng(seed)
    flat = {p: rng.standard_normal(s).astype(np.float32) for p, s in param_shapes(cfg).items()}
    params: dict = {}
    for path, v in flat.items():
        node = params
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.numpy.asarray(v)
    return api.Model(cfg, params)


@pytest.mark.parametrize("spec,comps", [(QuantSpec(3, granularity=16), ("experts",)),
                                        (QuantSpec("ternary"), ("experts", "dense", "self_attn"))])
def test_real_tiny_report_equals_nbytes_and_projection(spec, comps, seed):
    model = _random_tiny(seed)
    q = quantize_model_rtn(model, spec, comps)
    rep = q.size_report()
    flat = flatten_params(q.params)
    real = {}
    for path, leaf in flat.items():
        c = component_of(path)
        nb = leaf.nbytes if hasattr(leaf, "packed") else 2 * leaf.size
        real[c] = real.get(c, 0) + nb
    for c, nb in real.items():
        assert rep[c].bytes_after == nb, c
    assert rep.total.bytes_after == sum(real.values())
    # the no-allocation projection agrees with the real packed arrays, component by component
    proj = projected_report("tiny", spec, comps)
    for c in real:
        assert proj[c].bytes_after == rep[c].bytes_after and proj[c].params == rep[c].params
    # actual dtype accounting: float32 leaves at 4 bytes
    rep32 = size_report(q, float_dtype=None)
    assert rep32["norms"].bytes_after == 4 * rep32["norms"].params
    assert rep32["experts"].bytes_after == rep["experts"].bytes_after
    d = rep.to_dict()
    assert d["total"]["bytes_bf16"] == 2 * d["total"]["params"] and "experts" in d["components"]
