"""HF Switch import and parity vs ``transformers.SwitchTransformersForConditionalGeneration`` (f32, CPU)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from _helpers import hf_inputs
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from moqe_jax.api import load_model
from moqe_jax.checkpoint.hf import read_safetensors
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError

V = 96


def load_hf(d, cfg=None):
    return load_model(f"hf:{d}", cfg)


def _make_hf(path, expert_capacity=64, seed=0, tie=True):
    c = SwitchTransformersConfig(vocab_size=V, d_model=16, d_ff=24, d_kv=8, num_heads=2, num_layers=4,
                                 num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
                                 num_experts=4, expert_capacity=expert_capacity, dropout_rate=0.0,
                                 router_jitter_noise=0.0, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = SwitchTransformersForConditionalGeneration(c).eval()
    with torch.no_grad():  # make routing non-trivial and the relpos bias visible
        if not tie:  # transformers 5 unties embed_tokens too when tie_word_embeddings=False; Switch shares them
            m.encoder.embed_tokens.weight.copy_(m.shared.weight)
            m.decoder.embed_tokens.weight.copy_(m.shared.weight)
        for n, p in m.named_parameters():
            if "classifier" in n or "relative_attention_bias" in n:
                p.mul_(8.0)
    m.save_pretrained(path)
    return m


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf") / "tiny-switch")
    m = _make_hf(d)
    return d, m


def _inputs(seed=0, b=3, l=12, t=7):
    return hf_inputs(np.random.RandomState(seed).randint, V, b, l, t, {1: 8, 2: 5}, {2: 5})


def _hf_out(m, ids, am, dec, dm):
    with torch.no_grad():
        return m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am), decoder_input_ids=torch.tensor(dec),
                 decoder_attention_mask=torch.tensor(dm))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_config_from_hf(hf_dir):
    d, _ = hf_dir
    cfg = SwitchConfig.from_hf(d)
    assert cfg.sparse_layers("encoder") == (1, 3) and cfg.sparse_layers("decoder") == (1, 3)
    assert cfg.hf_expert_capacity == 64 and cfg.tie_word_embeddings and cfg.vocab_size == V
    # C-2048 Hub file: steps derived from num_sparse_* with the Flaxformer rule
    c = SwitchConfig.from_hf({"model_type": "switch_transformers", "num_layers": 15, "num_decoder_layers": 15,
                              "num_sparse_encoder_layers": 15, "num_sparse_decoder_layers": 15,
                              "encoder_sparse_step": 1, "decoder_sparse_step": 0, "d_model": 2080, "num_heads": 30})
    assert c.sparse_layers("decoder") == tuple(range(15))


def test_parity_with_transformers_no_drops(hf_dir):
    d, hf = hf_dir
    cfg = SwitchConfig.from_hf(d).replace(routing_mode="hf", dtype="float32")
    m = load_hf(d, cfg)
    ids, am, dec, dm = _inputs()
    out = _hf_out(hf, ids, am, dec, dm)
    logits, aux = m.apply(ids, dec, am, dm)
    enc = np.asarray(aux["encoder_output"])
    assert _rel(enc, out.encoder_last_hidden_state.numpy()) <= 1e-4
    assert _rel(np.asarray(logits), out.logits.numpy()) <= 1e-4
    assert float(aux["dropped_fraction"]) == 0.0


def test_parity_with_transformers_capacity_drops(tmp_path):
    """transformers 5.23 enforces the per-sequence capacity (the #48293 regression is fixed): match it."""
    d = str(tmp_path / "cap2")
    hf = _make_hf(d, expert_capacity=2, seed=1)
    cfg = SwitchConfig.from_hf(d).replace(routing_mode="hf", dtype="float32")
    assert cfg.hf_expert_capacity == 2
    m = load_hf(d, cfg)
    ids, am, dec, dm = _inputs(1)
    out = _hf_out(hf, ids, am, dec, dm)
    logits, aux = m.apply(ids, dec, am, dm)
    assert float(aux["dropped_fraction"]) > 0.2  # many tokens really dropped
    assert _rel(np.asarray(aux["encoder_output"]), out.encoder_last_hidden_state.numpy()) <= 1e-4
    assert _rel(np.asarray(logits), out.logits.numpy()) <= 1e-4


def test_parity_untied_lm_head_and_decoder_lm_head_alias(tmp_path):
    """Separate output layer (XXL/C style): no D^-0.5 scaling; ``decoder.lm_head.weight`` is accepted."""
    d = str(tmp_path / "untied")
    hf = _make_hf(d, seed=2, tie=False)
    cfg = SwitchConfig.from_hf(d).replace(routing_mode="hf", dtype="float32")
    assert not cfg.tie_word_embeddings
    _rewrite(d, lambda t: t.__setitem__("decoder.lm_head.weight", t.pop("lm_head.weight")))
    m = load_hf(d, cfg)
    ids, am, dec, dm = _inputs(2)
    out = _hf_out(hf, ids, am, dec, dm)
    logits, _ = m.apply(ids, dec, am, dm)
    assert _rel(np.asarray(logits), out.logits.numpy()) <= 1e-4
    np.testing.assert_array_equal(np.asarray(m.params["decoder"]["logits_dense"]["kernel"]),
                                  hf.lm_head.weight.detach().numpy().T)


def _copy(d, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(d, dst)
    return dst


def _rewrite(dst, fn):
    from safetensors.numpy import save_file

    p = os.path.join(dst, "model.safetensors")
    t = dict(read_safetensors(p))
    fn(t)
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, p)


def test_bin_sharded_and_mixed_dtypes(hf_dir, tmp_path):
    from safetensors.numpy import save_file

    d, hf = hf_dir
    ref = load_hf(d).params
    tensors = read_safetensors(os.path.join(d, "model.safetensors"))
    # .bin with bf16 experts + tied copies present
    dst = _copy(d, tmp_path, "bin")
    os.remove(os.path.join(dst, "model.safetensors"))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    sd = {k: (v.to(torch.bfloat16) if "experts" in k else v) for k, v in sd.items()}
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    sd["decoder.embed_tokens.weight"] = sd["shared.weight"]
    torch.save(sd, os.path.join(dst, "pytorch_model.bin"))
    p = load_hf(dst).params
    wo = p["decoder"]["layers_3"]["mlp"]["expert"]["wo"]["kernel"]
    want = torch.from_numpy(np.array(ref["decoder"]["layers_3"]["mlp"]["expert"]["wo"]["kernel"])).to(
        torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(wo), want)
    np.testing.assert_array_equal(np.asarray(p["token_embedder"]["embedding"]),
                                  np.asarray(ref["token_embedder"]["embedding"]))
    # sharded safetensors with an index
    dst = _copy(d, tmp_path, "sharded")
    os.remove(os.path.join(dst, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:])):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: np.ascontiguousarray(tensors[k]) for k in part}, os.path.join(dst, fn))
        wm.update(dict.fromkeys(part, fn))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    p = load_hf(dst).params
    np.testing.assert_array_equal(np.asarray(p["encoder"]["relpos_bias"]["rel_embedding"]),
                                  np.asarray(ref["encoder"]["relpos_bias"]["rel_embedding"]))
    np.testing.assert_array_equal(
        np.asarray(ref["encoder"]["relpos_bias"]["rel_embedding"]),
        hf.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.detach().numpy().T)


def _one_line_error(fn, *needles):
    with pytest.raises(CheckpointError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_bad_checkpoints(hf_dir, tmp_path):
    d, _ = hf_dir
    # truncated safetensors
    dst = _copy(d, tmp_path, "trunc")
    p = os.path.join(dst, "model.safetensors")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    _one_line_error(lambda: load_hf(dst), "model.safetensors", "truncated")
    # missing expert tensor
    dst = _copy(d, tmp_path, "missing")
    _rewrite(dst, lambda t: t.pop("encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight"))
    _one_line_error(lambda: load_hf(dst), "encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight", "missing")
    # wrong shape
    dst = _copy(d, tmp_path, "shape")
    _rewrite(dst, lambda t: t.__setitem__("decoder.block.2.layer.0.SelfAttention.q.weight",
                                          np.zeros((16, 8), np.float32)))
    _one_line_error(lambda: load_hf(dst), "decoder.block.2.layer.0.SelfAttention.q.weight", "model.safetensors",
                    "shape")
    # unexpected extra tensor
    dst = _copy(d, tmp_path, "extra")
    _rewrite(dst, lambda t: t.__setitem__("encoder.block.9.layer.0.SelfAttention.q.weight",
                                          np.zeros((16, 16), np.float32)))
    _one_line_error(lambda: load_hf(dst), "encoder.block.9.layer.0.SelfAttention.q.weight")
    # tied copy that is not a copy
    dst = _copy(d, tmp_path, "untied-embed")
    _rewrite(dst, lambda t: t.__setitem__("encoder.embed_tokens.weight", t["shared.weight"] + 1.0))
    _one_line_error(lambda: load_hf(dst), "encoder.embed_tokens.weight", "differs")
    # no weights at all / not a directory
    dst = _copy(d, tmp_path, "empty")
    os.remove(os.path.join(dst, "model.safetensors"))
    _one_line_error(lambda: load_hf(dst), "no model.safetensors")
    _one_line_error(lambda: load_hf(str(tmp_path / "nope")), "nope")


def test_weight_files_confined_to_the_model_dir(hf_dir, tmp_path):
    """Shard-index entries must be files inside the model directory; a FIFO is refused, not opened (issue 16)."""
    from safetensors.numpy import save_file

    d, _ = hf_dir
    tensors = read_safetensors(os.path.join(d, "model.safetensors"))
    outside = str(tmp_path / "outside.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, outside)
    for name, entry in (("abs", outside), ("dotdot", "../outside.safetensors"), ("link", "model-1.safetensors")):
        dst = _copy(d, tmp_path, name)
        os.remove(os.path.join(dst, "model.safetensors"))
        if name == "link":
            os.symlink(outside, os.path.join(dst, entry))
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": dict.fromkeys(tensors, entry)}, f)
        msg = _one_line_error(lambda dst=dst: load_hf(dst), "model.safetensors.index.json" if name != "link" else
                              "model-1.safetensors")
        assert ("outside the checkpoint directory" if name == "link" else "leaving the model directory") in msg
    dst = _copy(d, tmp_path, "fifo")
    os.remove(os.path.join(dst, "model.safetensors"))
    os.mkfifo(os.path.join(dst, "model.safetensors"))
    _one_line_error(lambda: load_hf(dst), "model.safetensors", "not a regular file")
    _one_line_error(lambda: read_safetensors(os.path.join(dst, "model.safetensors")), "not a regular file")
