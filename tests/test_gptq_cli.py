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
