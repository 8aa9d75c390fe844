"""`moqe data build` and `moqe train` end to end (synthetic locale dir / synthetic data, tiny preset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moqe_jax.cli import main
from moqe_jax.data.corpus import write_mo


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzäöéß"), size=rng.integers(2, 9)))


def test_moqe_data_build(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    msgs = [" ".join(_word(rng) for _ in range(rng.integers(2, 8))) + " %s" for _ in range(300)]
    for lang in ("fr", "de"):
        write_mo(tmp_path / "loc" / lang / "LC_MESSAGES" / "x.mo",
                 [(m, " ".join(_word(rng) for _ in range(len(m.split())))) for m in msgs])
    rc = main(["data", "build", "--locale-dir", str(tmp_path / "loc"), "--out", str(tmp_path / "c"), "--vocab", "700"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fr         300    54500" in out and "DATA.md" in out and "vocab 700" in out
    assert (tmp_path / "c" / "tokenizer" / "spm.model").is_file() and (tmp_path / "c" / "train.jsonl").is_file()
    # `moqe train` without --data: the default corpus search ($MOQE_DATA, ..., the demo's cache) and its tokenizer
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MOQE_CACHE_DIR", raising=False)  # the demo's cached corpus lives under this root
    train = ["train", "--config", "tiny", "--set", "vocab_size=700", "--steps", "1", "--batch-size", "4",
             "--warmup", "1", "--log-every", "1", "--eval-every", "1", "--save-every", "1"]
    monkeypatch.delenv("MOQE_DATA", raising=False)
    rc = main(train + ["--out", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "moqe data build" in err
    monkeypatch.setenv("MOQE_DATA", str(tmp_path / "c"))
    rc = main(train + ["--out", str(tmp_path / "run")])
    assert rc == 0 and "step 1: loss" in capsys.readouterr().out
    rc = main(["data", "build", "--locale-dir", str(tmp_path / "loc"), "--out", str(tmp_path / "d"),
               "--vocab", "90000"])
    assert rc == 2 and "SentencePiece training failed for vocab_size=90000" in capsys.readouterr().err


def test_moqe_data_build_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["data", "build", "--locale-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "locale directory does not exist" in err


def test_moqe_train_synthetic_and_bad_mesh(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moqe_jax.api import load_model

    args = ["train", "--config", "tiny", "--set", 'dtype="float32"', "--data", "synthetic", "--steps", "2",
            "--batch-size", "8", "--warmup", "10", "--log-every", "1", "--eval-every", "2", "--save-every", "2"]
    rc = main(args + ["--mesh", "expert=3", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "num_experts=4 is not divisible by the mesh expert axis (3)" in err
    assert not (tmp_path / "bad" / "checkpoints").exists()
    rc = main(args + ["--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0 and "step 2: loss" in out and "eval step 2" in out
    m = load_model(str(tmp_path / "run" / "model"))
    assert m.config.num_experts == 4 and (tmp_path / "run" / "checkpoints" / "2").is_dir()
