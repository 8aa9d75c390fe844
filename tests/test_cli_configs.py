"""Every command reads back every format it writes, with no hand-written config: the bundled model -> T5X
(``moqe convert --to-t5x`` writes ``config.json`` next to ``checkpoint_<step>/``) -> info / convert / quantize /
compress / eval (and its QMoE export of a sub-1-bit compression, ``qmoe:DIR``), and
``--config``/``--set``/``default`` accepted by every model-taking command."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from moqe_jax import QuantSpec, load_model, quantize
from moqe_jax.cli import main
from moqe_jax.data.locate import BUNDLED
from moqe_jax.errors import ConfigError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfgs")
    t5x = root / "t5x"
    assert main(["convert", "--from", "default", "--to-t5x", str(t5x)]) == 0
    assert (t5x / "config.json").is_file() and (t5x / "checkpoint_0").is_dir()
    return root, f"t5x:{t5x}"


def _ids(seed, vocab):
    rs = np.random.default_rng(seed)
    ids = rs.integers(2, vocab, (2, 9))
    dec = rs.integers(2, vocab, (2, 5))
    dec[:, 0] = 0
    return ids, dec


@jax.jit
def _logits(model, ids, dec):
    return model.logits(ids, dec)


def _same_logits(a, b, seed):
    ids, dec = _ids(seed, b.config.vocab_size)
    ref = a if isinstance(a, np.ndarray) else np.asarray(_logits(a, ids, dec))
    np.testing.assert_array_equal(np.asarray(_logits(b, ids, dec)), ref)
    return ref


def test_t5x_export_reads_back_everywhere(exported, seed, capsys):
    root, src = exported
    orig = load_model(BUNDLED / "moe")
    # Python API: the config comes from config.json (dir, step dir and checkpoint file all find it)
    for s in (src, src + "/checkpoint_0", src + "/checkpoint_0/checkpoint"):
        m = load_model(s)
        assert m.config == orig.config and m.config.name == orig.config.name
    ref = _same_logits(orig, load_model(src), seed)
    # info
    capsys.readouterr()
    assert main(["info", src, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"] == orig.config.to_dict() and info["disk_bytes"] > 0
    # convert back to a saved model
    assert main(["convert", "--from", src, "--to", str(root / "saved")]) == 0
    _same_logits(ref, load_model(root / "saved"), seed)
    # quantize: same codes as quantizing the original
    assert main(["quantize", src, "--bits", "4", "--out", str(root / "q4")]) == 0
    _same_logits(quantize(orig, QuantSpec(bits=4)), load_model(root / "q4"), seed)
    # compress (RTN ternary, no calibration)
    assert main(["compress", src, "--method", "rtn", "--bits", "ternary", "--out", str(root / "tern")]) == 0
    assert load_model(root / "tern").config == orig.config
    # HF export of the same model, read back by info
    assert main(["convert", "--from", src, "--to-hf", str(root / "hf")]) == 0
    capsys.readouterr()
    assert main(["info", f"hf:{root / 'hf'}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == info["total_params"]
    # QMoE export of a sub-1-bit compression of it (RTN ternary: no calibration), read back by info and convert
    s1, qm = root / "sub1", root / "qmoe"
    assert main(["compress", src, "--method", "rtn", "--bits", "ternary", "--format", "sub1", "--out", str(s1)]) == 0
    assert main(["convert", "--from", str(s1), "--to-qmoe", str(qm)]) == 0
    capsys.readouterr()
    assert main(["info", f"qmoe:{qm}", "--json"]) == 0
    qinfo = json.loads(capsys.readouterr().out)
    assert qinfo["config"] == orig.config.to_dict() and qinfo["total_params"] == info["total_params"]
    assert main(["convert", "--from", f"qmoe:{qm}", "--to", str(root / "from_qmoe")]) == 0
    # the bundled model's ternary scales are bf16-exact, so the QMoE round trip keeps the logits exactly
    _same_logits(load_model(s1), load_model(root / "from_qmoe"), seed)


def _tiny_corpus(d):
    rows = [json.loads(x) for x in (BUNDLED / "sample.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["direction"] in ("en-de", "de-en")][:6]
    assert len(rows) >= 2
    d.mkdir()
    (d / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return d


def test_eval_t5x_export_equals_default(exported):
    root, src = exported
    data = _tiny_corpus(root / "corpus")
    res = {}
    for name, model in (("default", "default"), ("t5x", src)):
        out = root / f"eval_{name}.json"
        assert main(["eval", model, "--data", str(data), "--samples", "3", "--directions", "en-de", "--no-bleu",
                     "--mt-loss", "--json", str(out)]) == 0  # teacher-forced CE: no decoding compile (~15 s)
        res[name] = json.loads(out.read_text(encoding="utf-8"))
    assert res["t5x"]["mt_ce"] == res["default"]["mt_ce"] > 0
    assert res["t5x"]["directions"]["en-de"]["ce"] == res["default"]["directions"]["en-de"]["ce"]
    assert res["t5x"]["mt_ce_tokens"] == res["default"]["mt_ce_tokens"] > 0


def test_config_and_set_everywhere(exported, tmp_path, capsys):
    root, src = exported
    # --set on a saved model / t5x / default; --config FILE.json (the exported config.json)
    capsys.readouterr()
    assert main(["info", "default", "--set", "routing_mode=hf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["routing_mode"] == "hf"
    cfg_file = src[4:] + "/config.json"
    assert main(["info", src + "/checkpoint_0", "--config", cfg_file, "--set", "eval_capacity_factor=4.0",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["eval_capacity_factor"] == 4.0
    assert main(["info", "--config", cfg_file, "--json"]) == 0  # a config alone: counts only
    assert json.loads(capsys.readouterr().out)["name"] == "small-mt"
    assert main(["quantize", "--config", cfg_file, "--bits", "2", "--report"]) == 0  # projected from a file
    # a config whose shapes disagree with the weights: one line naming the parameter
    with pytest.raises(ConfigError, match="expects"):
        from moqe_jax.commands.common import load_model_args

        class A:
            model, config, set = "default", "tiny", []

        load_model_args(A())
    assert main(["info", "default", "--set", "d_ff=7"]) == 2
    assert "expects" in capsys.readouterr().err
    # a T5X dir without config.json: the error says how to pass one
    (tmp_path / "bare").mkdir()
    import shutil

    shutil.copytree(src[4:] + "/checkpoint_0", tmp_path / "bare" / "checkpoint_0")
    assert main(["info", f"t5x:{tmp_path / 'bare'}"]) == 2
    assert "--config" in capsys.readouterr().err


def test_version_and_units(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    from moqe_jax import __version__

    assert capsys.readouterr().out.strip() == f"moqe {__version__}"
    assert main(["info", "default"]) == 0
    out = capsys.readouterr().out
    assert "MB = 10^6" in out and "MiB" not in out
