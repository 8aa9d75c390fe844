"""QMoE-format export (``moqe convert --to-qmoe`` / ``Model.to_qmoe``) and its reader (``qmoe:DIR``): the bundled
model, compressed with ``moqe compress``, written in QMoE's layout (docs/QMOE.md §1.6, §1.8) as safetensors and as
torch ``.pt``, read back with identical sub-1-bit bytes and identical logits."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from test_sub1_codec import _qmoe_reference_layout
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from moqe_jax.api import load_model, save_model
from moqe_jax.checkpoint.qmoe import load_qmoe
from moqe_jax.checkpoint.store import read_safetensors
from moqe_jax.cli import main
from moqe_jax.errors import CheckpointError
from moqe_jax.packed.sub1 import Sub1Tensor
from moqe_jax.tree import flatten_params, unflatten_params

BF16 = np.dtype(ml_dtypes.bfloat16)
# QMoE's load_sub1 torch.loads every file of the directory except these (IST-DASLab/qmoe sub1.py)
QMOE_SKIPPED = {"sizes.pt", "config.json", "README.md", ".gitattributes", ".git"}


def _bf16_scales(st: Sub1Tensor) -> Sub1Tensor:
    """What QMoE's bf16 ``ter_minmax`` keeps of our float32 scales."""
    return dataclasses.replace(st, scales=np.asarray(st.scales).astype(BF16), zeros=np.asarray(st.zeros).astype(BF16))


def _assert_same_model(a, b):
    fa, fb = flatten_params(a.params), flatten_params(b.params)
    assert sorted(fa) == sorted(fb)
    for k, x in fa.items():
        y = fb[k]
        if isinstance(x, Sub1Tensor):
            assert isinstance(y, Sub1Tensor) and (x.k, x.dtype, x.spec) == (y.k, y.dtype, y.spec), k
            for leaf in ("codewords", "offsets", "scales", "zeros"):
                u, v = np.asarray(getattr(x, leaf)), np.asarray(getattr(y, leaf))
                assert u.dtype == v.dtype and u.tobytes() == v.tobytes(), (k, leaf)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)


def test_qmoe_export_round_trip_and_errors(tmp_path, seed, capsys, monkeypatch):
    monkeypatch.setenv("MOQE_NO_PROGRESS", "1")
    s1, q, q2, qp = (str(tmp_path / n) for n in ("s1", "q", "q2", "qp"))
    assert main(["compress", "default", "--bits", "ternary", "--method", "rtn", "--format", "sub1", "--out", s1]) == 0
    capsys.readouterr()
    assert main(["convert", "--from", s1, "--to-qmoe", q]) == 0
    src, got = load_model(s1), load_model(f"qmoe:{q}")
    assert "note:" not in capsys.readouterr().err  # RTN scales of bf16 weights are bf16-exact: no rounding note
    # float32 scales that bf16 cannot hold: one note line on stderr, with the count of changed values
    nudged = src.replace(params=unflatten_params({
        k: dataclasses.replace(v, scales=np.asarray(v.scales, np.float32) * np.float32(1 + 2 ** -12))
        if isinstance(v, Sub1Tensor) else v for k, v in flatten_params(src.params).items()}))
    changed = sum(int(np.count_nonzero(np.asarray(a, np.float64) != np.asarray(a).astype(BF16).astype(np.float64)))
                  for v in flatten_params(nudged.params).values() if isinstance(v, Sub1Tensor)
                  for a in (v.scales, v.zeros))
    save_model(nudged, str(tmp_path / "nudged"))
    assert main(["convert", "--from", str(tmp_path / "nudged"), "--to-qmoe", str(tmp_path / "qn")]) == 0
    err = capsys.readouterr().err
    assert changed > 0 and f"{changed} scale value(s) are rounded" in err and "bf16-rounded scales" in err
    assert len([ln for ln in err.splitlines() if "note:" in ln]) == 1
    assert got.config == src.config
    # the reference: the source with its scales rounded to bf16 (the format's ter_minmax); all else unchanged
    ref = src.replace(params=unflatten_params({k: _bf16_scales(v) if isinstance(v, Sub1Tensor) else v
                                               for k, v in flatten_params(src.params).items()}))
    _assert_same_model(got, ref)
    rng = np.random.default_rng(seed)
    ids, dids = rng.integers(2, src.config.vocab_size, (2, 9)), rng.integers(2, src.config.vocab_size, (2, 5))
    logits = jax.jit(lambda m, a, b: m.logits(a, b))  # one program for both (same pytree structure)
    np.testing.assert_array_equal(np.asarray(logits(got, ids, dids)), np.asarray(logits(ref, ids, dids)))
    # the layout against an independent transcription of QMoE's Sub1Linear buffers: 16 random rows of one random
    # expert per matrix (the pure-Python reference encoder is slow), plus the totals
    sd = read_safetensors(os.path.join(q, "exp00.safetensors"))[0]
    sizes = json.loads((tmp_path / "q" / "sizes.json").read_text())
    st_all = flatten_params(src.params)
    for w in ("wi", "wo"):
        st = st_all[f"encoder/layers_1/mlp/expert/{w}/kernel"]
        j, r0 = int(rng.integers(st.shape[0])), int(rng.integers(st.n - 16))
        rows = slice(r0, r0 + 16)
        want = _qmoe_reference_layout(np.asarray(st[j].decode().codes())[:, rows], np.asarray(st.zeros)[j, rows],
                                      np.asarray(st.scales)[j, rows])
        name = f"encoder.block.1.layer.1.mlp.experts.expert_{j}.{w}"
        w_comp, row_off, mm = (sd[f"{name}.{key}"] for key in ("w_comp", "row_off", "ter_minmax"))
        assert (w_comp.dtype, row_off.dtype, mm.dtype) == (np.int16, np.int32, BF16)
        assert row_off[0] == 0 and row_off.shape == (st.n + 1,) and mm.shape == (2 * st.n,)
        assert w_comp[row_off[r0]:row_off[r0 + 16]].tobytes() == want["w_comp"].tobytes()
        np.testing.assert_array_equal(row_off[r0:r0 + 17] - row_off[r0], want["row_off"])
        assert mm[2 * r0:2 * r0 + 32].tobytes() == want["ter_minmax"].tobytes()
        assert sd[f"{name}.weight"].shape == (0,) and sd[f"{name}.weight"].dtype == BF16
        assert sizes[name] == w_comp.size == row_off[-1]
    # exporting what was read back writes the same bytes; info reads the directory
    assert main(["convert", "--from", f"qmoe:{q}", "--to-qmoe", q2]) == 0
    assert "ter_minmax" not in capsys.readouterr().err  # scales already bf16-exact: no note
    assert sorted(os.listdir(q)) == sorted(os.listdir(q2))
    assert all(filecmp.cmp(os.path.join(q, f), os.path.join(q2, f), shallow=False) for f in os.listdir(q))
    capsys.readouterr()
    assert main(["info", f"qmoe:{q}"]) == 0 and "total" in capsys.readouterr().out
    # torch .pt files: exactly the files QMoE's loader reads, keys and dtypes of Sub1Linear; same model back
    assert main(["convert", "--from", s1, "--to-qmoe", qp, "--qmoe-format", "pt"]) == 0
    assert {f for f in os.listdir(qp) if f not in QMOE_SKIPPED} == {"noexp.pt", "exp00.pt", "exp01.pt"}
    assert json.loads((tmp_path / "qp" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    pt = torch.load(os.path.join(qp, "exp00.pt"), weights_only=True)
    assert {k: v.dtype for k, v in pt.items() if k.startswith("encoder.block.1.layer.1.mlp.experts.expert_0.wi.")} \
        == {f"encoder.block.1.layer.1.mlp.experts.expert_0.wi.{k}": t for k, t in (
            ("w_comp", torch.int16), ("row_off", torch.int32), ("ter_minmax", torch.bfloat16),
            ("weight", torch.bfloat16))}
    assert torch.load(os.path.join(qp, "sizes.pt"), weights_only=True) == sizes
    _assert_same_model(load_model(f"qmoe:{qp}"), got)
    # what QMoE's loader does with them (sub1.py load_sub1): an HF Switch model from config.json in bf16, every
    # noexp key copied into its state dict (same shape), expert buffers into Sub1Linear modules at the experts'
    # wi/wo; keys it does not load are only the tied copies of shared.weight
    hf_cfg = SwitchTransformersConfig.from_pretrained(qp)
    assert hf_cfg.dtype == torch.bfloat16
    hf = SwitchTransformersForConditionalGeneration(hf_cfg)
    hf_sd, mods = hf.state_dict(), dict(hf.named_modules())
    noexp = torch.load(os.path.join(qp, "noexp.pt"), weights_only=True)
    assert all(k in hf_sd and hf_sd[k].shape == v.shape for k, v in noexp.items())
    assert {k for k in hf_sd if k not in noexp and ".experts." not in k} <= {
        "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    assert all(k.rsplit(".", 1)[0] in mods for k in pt)
    # a model with float experts: one line saying to compress first, nothing written
    capsys.readouterr()
    assert main(["convert", "--from", "default", "--to-qmoe", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "not sub-1-bit" in err and "moqe compress" in err and "\n" not in err.strip()
    assert not (tmp_path / "f").exists()
    with pytest.raises(CheckpointError, match="not a QMoE checkpoint"):
        load_model(f"qmoe:{tmp_path}")
    # an export missing one layer's experts names what is missing; a foreign directory is never replaced
    os.remove(os.path.join(q2, "exp01.safetensors"))
    with pytest.raises(CheckpointError, match="no exp"):
        load_qmoe(q2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="not a QMoE export"):
        got.to_qmoe(tmp_path / "other")
