"""SwitchConfig, presets, parameter counts (spec §2–§3) and ``moqe info``."""

from __future__ import annotations

import json

import pytest

from moqe_jax.cli import main
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import ConfigError
from moqe_jax.model.api import param_counts

PAPER = {"switch-base-8": 0.619e9, "switch-base-128": 7.415e9, "switch-large-128": 26.309e9,
         "switch-xxl-128": 394.675e9, "switch-c-2048": 1571.33e9}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_param_counts_match_paper(name):
    counts = param_counts(SwitchConfig.preset(name))
    assert abs(sum(counts.values()) - PAPER[name]) / PAPER[name] < 1e-3


def test_param_count_components_by_formula():
    c = SwitchConfig.preset("switch-base-8")
    n = param_counts(c)
    d, f, e, j = c.d_model, c.d_ff, c.num_experts, c.inner_dim
    assert n["experts"] == 12 * e * 2 * d * f  # 6 sparse enc + 6 sparse dec layers
    assert n["dense"] == 12 * 2 * d * f
    assert n["router"] == 12 * d * e
    assert n["self_attn"] == 24 * 4 * d * j and n["cross_attn"] == 12 * 4 * d * j
    assert n["embeddings"] == 32128 * d and n["logits"] == 0 and n["relpos"] == 2 * 12 * 32
    xxl = param_counts(SwitchConfig.preset("switch-xxl-128"))
    assert xxl["logits"] == 4096 * 32128
    assert xxl["experts"] == 24 * 128 * 3 * 4096 * 10240  # gated: wi_0, wi_1, wo


def test_presets_and_roundtrip():
    for name in ("tiny", "small-mt", "small-mt-dense", "switch-xxl-128"):
        c = SwitchConfig.preset(name)
        assert SwitchConfig.from_dict(c.to_dict()) == c
    assert SwitchConfig.preset("small-mt-dense").sparse_layers("encoder") == ()
    assert SwitchConfig.preset("small-mt").sparse_layers("encoder") == (1, 3)
    xxl = SwitchConfig.preset("switch-xxl-128")
    assert xxl.gated and not xxl.tie_word_embeddings and xxl.min_expert_capacity == 2
    assert xxl.eval_capacity_factor == 4.0
    c = SwitchConfig.preset("switch-c-2048")
    assert c.inner_dim == 1920 and c.max_group_size == 2048 and c.train_capacity_factor == 1.0
    assert SwitchConfig.preset("small-mt", d_model=128).d_model == 128
    assert hash(SwitchConfig.preset("tiny")) == hash(SwitchConfig.preset("tiny"))


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="num_experts"):
        SwitchConfig(num_experts=0)
    with pytest.raises(ConfigError, match="routing_mode"):
        SwitchConfig(routing_mode="gshard")
    with pytest.raises(ConfigError, match="activation"):
        SwitchConfig(activation="swish")
    with pytest.raises(ConfigError, match="unknown preset"):
        SwitchConfig.preset("switch-base-9")
    with pytest.raises(ConfigError, match="unknown SwitchConfig field"):
        SwitchConfig.preset("tiny").replace(nonsense=1)
    with pytest.raises(ConfigError, match="model_type"):
        SwitchConfig.from_hf({"model_type": "t5"})


def test_info_cli_json(capsys):
    assert main(["info", "--preset", "switch-c-2048", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert abs(d["total_params"] - PAPER["switch-c-2048"]) / PAPER["switch-c-2048"] < 1e-3
    assert d["components"]["experts"]["bytes_bf16"] == 2 * d["components"]["experts"]["params"]
    assert main(["info", "--preset", "switch-base-8"]) == 0
    assert "experts" in capsys.readouterr().out


def test_info_cli_bad_path(capsys, tmp_path):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moqe: error:") and "missing" in err and "\n" not in err
    assert main(["info", "hf:" + str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path) in err


def test_info_dict_quantized_model():
    import numpy as np

    from moqe_jax.api import Model
    from moqe_jax.commands.info import info_dict
    from moqe_jax.packed.qtensor import QuantizedTensor
    from moqe_jax.packed.spec import QuantSpec

    m = Model.init("tiny", 0)
    m.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"] = QuantizedTensor.from_codes(
        np.random.RandomState(0).randint(0, 16, (4, 32, 64)), np.ones((4, 1, 64)), None, QuantSpec(bits=4))
    d = info_dict(m.config, m)
    assert d["dtypes"]["float32"] == 48 and any(k.startswith("QuantizedTensor") for k in d["dtypes"])
    if "size_report" in d:  # moqe_jax.quant.report present
        assert d["size_report"]["total"]["params"] == d["total_params"]
