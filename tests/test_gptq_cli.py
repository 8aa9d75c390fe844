"""``moqe compress`` end to end on the tiny preset (jsonl calibration data, GPTQ and RTN, resume flag)."""

from __future__ import annotations

import json

import numpy as np

from moqe_jax.api import load_model
from moqe_jax.cli import main
from moqe_jax.packed.qtensor import QuantizedTensor


def test_compress_cli_gptq_and_rtn(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOQE_NO_PROGRESS", "1")
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.jsonl"
    with open(data, "w") as f:
        for _ in range(6):
            n = int(rng.integers(5, 12))
            f.write(json.dumps({"input_ids": rng.integers(2, 128, n).tolist(),
                                "targets": rng.integers(2, 128, 6).tolist()}) + "\n")
    out = tmp_path / "tern"
    rc = main(["compress", "init:tiny", "--bits", "ternary", "--calib-data", str(data), "--samples", "6",
               "--batch-size", "3", "--resume", "--json", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "encoder/layers_1/mlp" in text and "relerr GPTQ" in text
    m = load_model(str(out))
    leaf = m.params["decoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"]
    assert isinstance(leaf, QuantizedTensor) and leaf.spec.is_ternary
    rep = json.loads((out / "compress_report.json").read_text())
    assert [r["name"] for r in rep["layers"]] == ["encoder/layers_1/mlp", "decoder/layers_1/mlp"]
    assert not (tmp_path / "tern.gptq-progress").exists()
    rc = main(["compress", "init:tiny", "--bits", "2", "--method", "rtn", "--out", str(tmp_path / "rtn")])
    assert rc == 0
    rtn = load_model(str(tmp_path / "rtn"))
    assert rtn.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"].spec.bits == 2
    assert main(["compress", "init:tiny", "--calib-data", str(tmp_path / "missing.jsonl"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "cannot read calibration data" in capsys.readouterr().err


def test_compress_cli_group_size(tmp_path, capsys, monkeypatch, seed):
    """``--group-size N [--dynamic-groups]`` reach GPTQ (spy on the real solver call): the saved experts are
    group-wise and closer to the float weights than RTN's; bad values are one-line errors."""
    import moqe_jax.calibration as calibration
    from moqe_jax.api import Model
    from moqe_jax.packed.spec import QuantSpec
    from moqe_jax.quant.rtn import quantize_tensor
    from moqe_jax.tree import flatten_params

    monkeypatch.setenv("MOQE_NO_PROGRESS", "1")
    rng = np.random.default_rng(seed)
    data = tmp_path / "calib.jsonl"
    with open(data, "w") as f:
        for _ in range(4):
            f.write(json.dumps({"input_ids": rng.integers(2, 128, int(rng.integers(5, 12))).tolist(),
                                "targets": rng.integers(2, 128, 6).tolist()}) + "\n")
    seen, real = [], calibration.gptq_quantize_model

    def spy(model, spec, calib, **kw):
        seen.append((spec, kw))
        return real(model, spec, calib, **kw)
    monkeypatch.setattr(calibration, "gptq_quantize_model", spy)
    out = tmp_path / "g16"
    rc = main(["compress", "init:tiny", "--bits", "4", "--group-size", "16", "--dynamic-groups", "--calib-data",
               str(data), "--samples", "4", "--batch-size", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    spec = QuantSpec(bits=4, symmetric=False, granularity=16)
    assert len(seen) == 1 and seen[0][0] == spec and seen[0][1]["static_groups"] is False
    k = "encoder/layers_1/mlp/expert/wi/kernel"
    leaf = flatten_params(load_model(str(out)).params)[k]
    assert isinstance(leaf, QuantizedTensor) and leaf.spec.granularity == 16
    w = np.asarray(flatten_params(Model.init("tiny", seed=0).params)[k], np.float32)
    err = np.abs(np.asarray(leaf.dequantize(), np.float32) - w).max()
    rtn8 = np.abs(np.asarray(quantize_tensor(w, QuantSpec(bits=2, symmetric=False)).dequantize(), np.float32) - w).max()
    assert err < rtn8  # 4-bit g16 GPTQ of the same weights beats 2-bit per-channel RTN (it is those weights)
    capsys.readouterr()
    for bad, msg in ((["--group-size", "12"], "multiple of 8"), (["--group-size", "x"], "'channel' or"),
                     (["--dynamic-groups"], "needs --group-size N"),
                     (["--group-size", "16", "--format", "sub1"], "needs --group-size channel")):
        assert main(["compress", "init:tiny", "--out", str(tmp_path / "bad"), *bad]) == 2
        err_text = capsys.readouterr().err
        assert err_text.count("\n") == 1 and msg in err_text, (bad, err_text)
