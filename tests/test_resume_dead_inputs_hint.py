"""``--resume`` of GPTQ progress written with the other dead-input option: the fingerprint-mismatch error names
``--dead-inputs`` (progress from before dead inputs were kept by default was made with ``zero``)."""

from __future__ import annotations

import numpy as np
import pytest

from moqe_jax.api import Model
from moqe_jax.calibration import gptq_quantize_model
from moqe_jax.errors import CheckpointError
from moqe_jax.packed.spec import QuantSpec


def _calib(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(2, 128, size=(2, 8), dtype=np.int32),
             "decoder_input_ids": rng.integers(0, 128, size=(2, 5), dtype=np.int32)}]


def test_mismatch_names_dead_inputs_option(tmp_path, seed):
    tiny = Model.init("tiny", seed=0)
    spec = QuantSpec(bits=2, symmetric=False)
    calib = _calib(seed)

    class Boom(RuntimeError):
        pass

    def crash(name: str) -> None:
        raise Boom(name)

    ck = tmp_path / "ck"
    with pytest.raises(Boom):  # an old-style run: dead inputs zeroed, killed after its first layer
        gptq_quantize_model(tiny, spec, calib, checkpoint_dir=ck, dead_inputs="zero", on_layer_done=crash)
    with pytest.raises(CheckpointError, match=r"only|another option") as e:
        gptq_quantize_model(tiny, spec, calib, checkpoint_dir=ck)  # today's default: keep
    assert "pass --dead-inputs zero" in str(e.value) and "fingerprint mismatch" in str(e.value)
    # other data: cannot tell, but the hint is there
    with pytest.raises(CheckpointError, match="fingerprint mismatch") as e:
        gptq_quantize_model(tiny, spec, _calib(seed + 1), checkpoint_dir=ck)
    assert "another model/spec/calibration data" in str(e.value) and "--dead-inputs zero" in str(e.value)
    # the named fix resumes it
    seen: list[str] = []
    _, rep = gptq_quantize_model(tiny, spec, calib, checkpoint_dir=ck, dead_inputs="zero", on_layer_done=seen.append)
    assert rep.resumed_layers == 1 and "encoder/layers_0" not in seen
    # and the reverse direction (a keep run resumed with zero) names --dead-inputs keep
    ck2 = tmp_path / "ck2"
    with pytest.raises(Boom):
        gptq_quantize_model(tiny, spec, calib, checkpoint_dir=ck2, on_layer_done=crash)
    with pytest.raises(CheckpointError, match="pass --dead-inputs keep"):
        gptq_quantize_model(tiny, spec, calib, checkpoint_dir=ck2, dead_inputs="zero")
