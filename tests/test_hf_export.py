"""HF export (``Model.to_hf`` / ``moqe convert --to-hf``) vs ``transformers.SwitchTransformersForConditionalGeneration``
(torch CPU, f32): float, 4-bit RTN and sub-1-bit models, and our importer reading the export back."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _helpers import hf_inputs, random_tiny_model
from transformers import SwitchTransformersForConditionalGeneration

from moqe_jax import QuantSpec, compress_sub1, load_model, quantize
from moqe_jax.checkpoint.hf_export import hf_sparse_layers
from moqe_jax.cli import main
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError
from moqe_jax.packed import is_packed
from moqe_jax.tree import flatten_params


def _tiny(seed, **kw):
    m = random_tiny_model(seed, **kw)
    return m.replace(config=m.config.replace(routing_mode="hf", dtype="float32"))


def _inputs(seed, vocab, b=3, length=11, t=6):
    return hf_inputs(np.random.default_rng(seed).integers, vocab, b, length, t, {1: 7}, {2: 4})


def _hf_logits(d, ids, am, dec, dm):
    hf, info = SwitchTransformersForConditionalGeneration.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf = hf.eval().float()
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am), decoder_input_ids=torch.tensor(dec),
                  decoder_attention_mask=torch.tensor(dm)).logits.numpy()


def _check_parity(model, d, seed):
    ids, am, dec, dm = _inputs(seed, model.config.vocab_size)
    ours, aux = model.apply(ids, dec, am, dm)
    assert float(aux["dropped_fraction"]) == 0.0
    ref = _hf_logits(d, ids, am, dec, dm)
    err = float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))
    # f32 torch vs XLA: 1e-6..4e-6 on 12 of 13 seeds scanned; MOQE_TEST_SEED=3898055781 gives 3.0e-5 from one
    # decoder position (cause not found). A wrong activation or routing rule is >= 1e-2.
    assert err <= 5e-5, err


@pytest.mark.parametrize("tie", [True, False])
def test_float_export_parity_and_roundtrip(tmp_path, seed, tie):
    m = _tiny(seed, tie_word_embeddings=tie)
    d = m.to_hf(tmp_path / "hf")
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    _check_parity(m, d, seed)
    back = load_model(f"hf:{d}")  # our importer reads the export back bit-exactly, with the full config
    assert back.config == m.config and back.config.to_dict() == m.config.to_dict()
    a, b = flatten_params(m.params), flatten_params(back.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)


def test_4bit_export_parity(tmp_path, seed):
    q = quantize(_tiny(seed), QuantSpec(bits=4), components=("experts",))
    assert any(is_packed(x) for x in flatten_params(q.params).values())
    d = q.to_hf(tmp_path / "hf4")
    _check_parity(q, d, seed)


def test_sub1_export_parity(tmp_path, seed):
    tern = quantize(_tiny(seed), QuantSpec(bits="ternary"), components=("experts",))
    s1, _ = compress_sub1(tern, verbose=False)
    assert any(type(x).__name__ == "Sub1Tensor" for x in flatten_params(s1.params).values())
    d = tmp_path / "hf_sub1"
    saved = s1.save(tmp_path / "saved")
    assert main(["convert", "--from", saved, "--to-hf", str(d)]) == 0  # the CLI path: saved dir -> HF
    _check_parity(s1, str(d), seed)
    from safetensors.numpy import load_file

    w = load_file(os.path.join(d, "model.safetensors"))["encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight"]
    assert max(len(np.unique(row)) for row in w) <= 3  # still ternary per output channel after dequantization


def test_config_json_and_refusals(tmp_path):
    m = _tiny(0)
    d = m.to_hf(tmp_path / "hf")
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    assert c["model_type"] == "switch_transformers" and c["num_sparse_encoder_layers"] == 1
    assert SwitchConfig.from_hf(d).sparse_layers("encoder") == m.config.sparse_layers("encoder")
    assert c["moqe_jax_config"]["max_group_size"] == m.config.max_group_size
    c["expert_capacity"] = 7  # an edited HF config wins over the embedded one
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f)
    edited = load_model(f"hf:{d}").config
    assert edited.hf_expert_capacity == 7 and edited.max_group_size == SwitchConfig().max_group_size
    # HF's rule i % (L // n) == 1 vs Flaxformer's i % s == s - 1: equal for steps 1 and 2 only
    assert hf_sparse_layers(12, 6) == SwitchConfig(num_layers=12, encoder_sparse_step=2).sparse_layers("encoder")
    assert hf_sparse_layers(4, 0) == (1,)  # transformers' "0 sparse layers" still builds one
    for kw, needle in (({"activation": "gated-gelu"}, "gated-gelu"), ({"num_layers": 3, "encoder_sparse_step": 3},
                                                                        "encoder sparse layers [2]"),
                       ({"encoder_sparse_step": 0}, "encoder sparse layers []")):
        bad = random_tiny_model(0, **kw)
        with pytest.raises(CheckpointError) as ei:
            bad.to_hf(tmp_path / "bad")
        assert needle in str(ei.value) and "\n" not in str(ei.value)
    assert not (tmp_path / "bad").exists()
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="refusing"):
        m.to_hf(tmp_path / "other")
