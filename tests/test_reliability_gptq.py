"""Reliability of GPTQ compression (issue 16, findings 6, 7, 8): whole-weight resume fingerprint, validated
numeric options, NaN activations named as such, progress never discarded silently."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import random_tiny_model

from moqe_jax.calibration import gptq_quantize_model, synthetic_batches
from moqe_jax.calibration.driver import _fingerprint
from moqe_jax.cli import main
from moqe_jax.errors import QuantizationError
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.tree import flatten_params, unflatten_params

SPEC = QuantSpec(bits="ternary")


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_model(5)


def _calib(model, seed=0):
    return synthetic_batches(model.config.vocab_size, 4, 8, 4, seed)


def _edit(model, path, fn):
    flat = {k: np.array(v) for k, v in flatten_params(model.params).items()}
    fn(flat[path])
    return model.replace(params=unflatten_params(flat))


def test_fingerprint_covers_whole_weight_spec_and_data(tiny):
    calib = _calib(tiny)
    fp = _fingerprint(tiny, SPEC, calib, {})
    path = "encoder/layers_1/mlp/expert/wo/kernel"
    assert np.asarray(flatten_params(tiny.params)[path]).size > 4096

    def last(a):
        a.reshape(-1)[-1] += 1.0
    assert _fingerprint(_edit(tiny, path, last), SPEC, calib, {}) != fp
    assert _fingerprint(tiny, QuantSpec(bits=2, symmetric=False), calib, {}) != fp
    assert _fingerprint(tiny, SPEC, _calib(tiny, seed=1), {}) != fp


@pytest.mark.parametrize("kw,msg", [({"percdamp": float("nan")}, "percdamp"), ({"percdamp": 0.0}, "percdamp"),
                                    ({"percdamp": float("inf")}, "percdamp"),
                                    ({"max_tokens_factor": 0.0}, "max_tokens_factor"),
                                    ({"max_tokens_factor": -2.0}, "max_tokens_factor"),
                                    ({"group_experts": -1}, "group_experts"), ({"blocksize": 0}, "blocksize")])
def test_numeric_options_validated(tiny, kw, msg):
    with pytest.raises(QuantizationError, match=msg):
        gptq_quantize_model(tiny, SPEC, _calib(tiny), **kw)


def test_cli_percdamp_nan_is_one_line(tmp_path, capsys):
    rc = main(["compress", "init:tiny", "--samples", "4", "--seq-len", "8", "--percdamp", "nan",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "percdamp" in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--batch-size", "--seq-len"])
def test_cli_zero_sizes_are_one_line(tmp_path, capsys, flag):
    rc = main(["compress", "init:tiny", "--samples", "4", "--seq-len", "8", flag, "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and err.count("\n") == 1


def test_nan_activations_reported_as_such(tiny):
    def poison(a):
        a[:] = np.nan
    bad = _edit(tiny, "encoder/layers_0/attention/query/kernel", poison)
    with pytest.raises(QuantizationError, match=r"NaN/inf activations") as ei:
        gptq_quantize_model(bad, SPEC, _calib(tiny))
    assert "no calibration token" not in str(ei.value)


def test_compress_refuses_to_discard_progress(tmp_path, capsys):
    out = tmp_path / "o"
    prog = tmp_path / "o.gptq-progress"
    prog.mkdir()
    (prog / "layer_x").mkdir()
    (prog / "layer_x" / "keep.bin").write_bytes(b"progress")
    args = ["compress", "init:tiny", "--samples", "4", "--seq-len", "8", "--out", str(out)]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert (prog / "layer_x" / "keep.bin").read_bytes() == b"progress"
    rc = main(args + ["--overwrite"])
    assert rc == 0 and (out / "moqe_model.json").is_file() and not prog.exists()
