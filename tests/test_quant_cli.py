"""``moqe quantize``: projected report from a preset, save/load round trip of a quantized model, errors."""

from __future__ import annotations

import numpy as np
import pytest

from moqe_jax import api
from moqe_jax.cli import main
from moqe_jax.config import SwitchConfig
from moqe_jax.model.api import param_shapes
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.policy import quantize_model_rtn
from moqe_jax.tree import flatten_params


def test_projected_report_from_preset(capsys):
    assert main(["quantize", "--preset", "switch-base-128", "--bits", "2", "--report"]) == 0
    out = capsys.readouterr().out
    assert "projected" in out and "int2-linear-sym-channel" in out and "-85.4%" in out
    assert main(["quantize", "--preset", "moqe-5.3b", "--bits", "2", "--report"]) == 0
    assert "-79.5%" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--preset", "tiny", "--bits", "5"], "unsupported bits"),
    (["--preset", "tiny", "--granularity", "group:24"], "does not divide"),
    (["--preset", "small-mt-dense", "--bits", "2"], "'experts' matches no parameter"),
    (["--preset", "tiny", "--components", "experts,norms"], "never quantized"),
    (["--preset", "tiny", "--override", "nomatch=8"], "matches no parameter"),
    (["--preset", "tiny", "--out", "/tmp/x"], "--out needs a MODEL"),
    ([], "give a MODEL"),
])
def test_cli_errors_are_one_line(argv, msg, capsys):
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moqe: error:") and msg in err and "\n" not in err


def test_quantize_saved_model_roundtrip(tmp_path, capsys, seed):
    cfg = SwitchConfig.preset("tiny")
    rng = np.random.default_rng(seed)
    params: dict = {}
    for path, shape in param_shapes(cfg).items():
        node = params
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = rng.standard_normal(shape).astype(np.float32)
    model = api.Model(cfg, params)
    src, out = tmp_path / "float", tmp_path / "q"
    model.save(src)
    argv = ["quantize", str(src), "--bits", "3", "--scheme", "log", "--granularity", "group:16", "--mse",
            "--components", "experts,self_attn", "--override", "^decoder/layers_1/mlp/expert=8", "--out", str(out),
            "--report"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "int3-log-g16-mse" in text and "self_attn" in text
    loaded = api.load_model(str(out))
    spec = QuantSpec(3, "log", 16, mse=True)
    ref = quantize_model_rtn(api.load_model(str(src)), spec, ("experts", "self_attn"),
                             overrides={"^decoder/layers_1/mlp/expert": QuantSpec(8, "log", 16, mse=True)})
    fl = flatten_params(loaded.params)
    fr = flatten_params(ref.params)
    assert fl.keys() == fr.keys()
    nq = 0
    for path, leaf in fr.items():
        if isinstance(leaf, QuantizedTensor):
            got = fl[path]
            assert isinstance(got, QuantizedTensor) and got.spec == leaf.spec, path
            np.testing.assert_array_equal(np.asarray(got.packed), np.asarray(leaf.packed))
            np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(leaf.scales))
            nq += 1
        else:
            np.testing.assert_array_equal(np.asarray(fl[path]), np.asarray(leaf))
    assert nq == 4 + 4 * 4  # expert wi/wo x 2 MoE layers + q/k/v/o self-attention x 4 layers
    assert fl["decoder/layers_1/mlp/expert/wi/kernel"].spec.bits == 8
