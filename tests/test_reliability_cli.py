"""CLI reliability (issue 16, findings 7, 10, 11): convert never clobbers, eval flags NaN losses and writes
valid JSON, terminal output escapes untrusted strings, bad numbers are one line."""

from __future__ import annotations

import json

import pytest
from _helpers import random_tiny_model

from moqe_jax import api
from moqe_jax.cli import main
from moqe_jax.evaluate import DirectionResult, EvalResult, format_result


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "model"
    api.save_model(random_tiny_model(7), d, format="safetensors")
    return str(d)


def test_convert_to_t5x_refuses_to_replace_a_checkpoint(tmp_path, saved, capsys):
    out = tmp_path / "t5x"
    assert main(["convert", "--from", saved, "--to-t5x", str(out)]) == 0
    ck = out / "checkpoint_0" / "checkpoint"
    before = ck.read_bytes()
    (out / "checkpoint_0" / "mine.txt").write_text("x")
    capsys.readouterr()
    rc = main(["convert", "--from", saved, "--to-t5x", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and err.count("\n") == 1
    assert ck.read_bytes() == before and (out / "checkpoint_0" / "mine.txt").is_file()
    assert main(["convert", "--from", saved, "--to-t5x", str(out), "--overwrite"]) == 0


def test_convert_to_foreign_dir_needs_overwrite(tmp_path, saved, capsys):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    rc = main(["convert", "--from", saved, "--to", str(out)])
    assert rc == 2 and "overwrite" in capsys.readouterr().err
    assert main(["convert", "--from", saved, "--to", str(out), "--overwrite"]) == 0
    assert (out / "thesis.tex").read_text() == "keep me"


def _nan_result() -> EvalResult:
    r = EvalResult(mt_ce=float("nan"), mt_ce_tokens=10, mlm_loss=float("inf"), mlm_tokens=5)
    r.directions["en-de"] = DirectionResult("en-de", float("nan"), float("nan"), 3, ce=float("nan"))
    return r


def test_eval_nan_loss_printed_and_flagged():
    text = format_result(_nan_result())
    assert "nan" in text and "inf" in text and "warning: non-finite loss" in text
    d = _nan_result().to_dict()
    s = json.dumps(d, allow_nan=False)
    back = json.loads(s)
    assert back["mt_ce"] is None and "mt_ce" in back["nonfinite"] and "mlm_loss" in back["nonfinite"]
    ok = EvalResult(mt_ce=1.5)
    assert "warning" not in format_result(ok) and not any(k == "mt_ce" for k in ok.to_dict()["nonfinite"])


def test_eval_cli_writes_valid_json_for_nan(tmp_path, saved, capsys, monkeypatch):
    import moqe_jax.commands.eval as ev
    import moqe_jax.data.locate as locate
    import moqe_jax.evaluate as evaluate

    monkeypatch.setattr(locate, "resolve_data", lambda d: "corpus")
    monkeypatch.setattr(locate, "resolve_tokenizer", lambda *a: "tok")
    monkeypatch.setattr(ev, "load_model_args", lambda args, src: None)
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: _nan_result())
    out = tmp_path / "r.json"
    rc = main(["eval", saved, "--no-bleu", "--mt-loss", "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0 and "non-finite loss" in cap.err
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["nonfinite"]


@pytest.mark.parametrize("args,msg", [(["--batch-size", "0"], "--batch-size"), (["--beams", "0"], "--beams")])
def test_eval_bad_numbers_one_line(saved, capsys, args, msg):
    rc = main(["eval", saved, "--no-bleu"] + args)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1


def test_error_output_escapes_ansi(tmp_path, capsys):
    evil = str(tmp_path / "\x1b[2J\x1b[31mevil")
    rc = main(["info", evil])
    err = capsys.readouterr().err
    assert rc == 2 and "\x1b" not in err and "\\x1b[2J" in err

