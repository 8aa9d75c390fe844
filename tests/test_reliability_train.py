"""Reliability of training (issue 16, findings 1, 7, 11): never save an all-NaN model, keep the last good
checkpoint, validate options and vocabularies, flush metrics, one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _helpers import tiny_f32_config, tiny_train_config

from moqe_jax.cli import main
from moqe_jax.errors import ConfigError, DataError, MoqeError
from moqe_jax.training import SyntheticData, TrainConfig, train

_ARGS = ["train", "--config", "tiny", "--set", 'dtype="float32"', "--data", "synthetic", "--steps", "2",
         "--batch-size", "8", "--warmup", "10", "--log-every", "1", "--eval-every", "0", "--save-every", "1"]


_cfg = tiny_f32_config


def _tc(**kw) -> TrainConfig:
    return tiny_train_config(**{"save_every": 1, **kw})


@dataclass
class _NaNAt(SyntheticData):
    """Synthetic batches whose loss weights turn NaN from batch ``bad`` on (a diverging run)."""

    bad: int = 2

    def batch(self, index: int):
        b = super().batch(index)
        if index >= self.bad:
            b["weights"] = np.full_like(b["weights"], np.nan, dtype=np.float32)
        return b


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = _cfg()
    data = _NaNAt(cfg.vocab_size, 8, 16, seed=1, bad=2)
    with pytest.raises(MoqeError, match=r"non-finite loss .*step 3") as ei:
        train(cfg, _tc(), data, out_dir=tmp_path)
    assert "\n" not in str(ei.value) and "step 2" in str(ei.value)  # names the last good checkpoint
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 2]


def test_cli_nan_run_exits_nonzero_without_a_model(tmp_path: Path, capsys, monkeypatch) -> None:
    import moqe_jax.training as training

    monkeypatch.setattr(training, "SyntheticData", lambda v, b, n, s: _NaNAt(v, b, n, s, bad=1))
    rc = main(_ARGS + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite loss" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("flag,value,msg", [("--lr", "nan", "learning rate"), ("--lr", "-1", "learning rate"),
                                            ("--keep", "0", "keep"), ("--batch-size", "0", "batch"),
                                            ("--steps", "0", "steps")])
def test_bad_numeric_options_rejected(tmp_path: Path, capsys, flag: str, value: str, msg: str) -> None:
    args = list(_ARGS)
    if flag in args:
        i = args.index(flag)
        del args[i:i + 2]
    rc = main(args + [flag, value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tokens_outside_the_vocabulary_rejected(tmp_path: Path) -> None:
    cfg = _cfg()
    data = SyntheticData(cfg.vocab_size + 50, 8, 16, seed=1)  # ids up to 177 for a 128-token model
    with pytest.raises(DataError, match="vocab"):
        train(cfg, _tc(steps=1), data, out_dir=tmp_path)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_mt_loader_checks_tokenizer_vocabulary(tmp_path: Path) -> None:
    from moqe_jax.training import load_mt_data

    class Tok:
        vocab_size = 700
        path = str(tmp_path / "spm.model")

    (tmp_path / "train.jsonl").write_text("")
    import moqe_jax.data.tokenizer as tk

    orig = tk.Tokenizer
    tk.Tokenizer = lambda *_a, **_k: Tok()  # type: ignore[assignment,misc]
    try:
        with pytest.raises(DataError, match=r"tokenizer .*700.*128"):
            load_mt_data(tmp_path, _tc(), vocab_size=128)
    finally:
        tk.Tokenizer = orig  # type: ignore[misc]


def test_metrics_flushed_line_by_line(tmp_path: Path) -> None:
    cfg = _cfg()
    seen = []

    @dataclass
    class Peek(SyntheticData):
        def batch(self, index: int):
            f = tmp_path / "metrics.jsonl"
            seen.append(len(f.read_text().splitlines()) if f.exists() else 0)
            return super().batch(index)

    train(cfg, _tc(steps=3, save_every=0), Peek(cfg.vocab_size, 8, 16, seed=1), out_dir=tmp_path)
    assert seen == [0, 1, 2]


def test_resume_with_another_config_is_one_line(tmp_path: Path) -> None:
    data = SyntheticData(128, 8, 16, seed=1)
    train(_cfg(), _tc(steps=1), data, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="another model config") as ei:
        train(_cfg(d_ff=96), _tc(steps=2), data, out_dir=tmp_path)
    assert "\n" not in str(ei.value)


def test_truncated_token_cache_is_rebuilt(tmp_path: Path) -> None:
    from moqe_jax.training.data import _encode_split

    class Tok:
        path = str(tmp_path / "spm.model")

        def encode_batch(self, texts):
            return [[3 + (ord(c) % 50) for c in t] for t in texts]

    Path(Tok.path).write_bytes(b"model")
    rows = [{"src": "ab", "tgt": "cd", "direction": "en-de", "en": "ab"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import moqe_jax.data.batching as batching

    src, tgt = batching.encode_pairs(rows, Tok(), 16)
    _encode_split(tmp_path, "train", Tok(), 16)
    cache = next(tmp_path.glob(".train.*.npz"))
    cache.write_bytes(cache.read_bytes()[:40])
    s2, t2 = _encode_split(tmp_path, "train", Tok(), 16)
    assert [list(x) for x in s2] == [list(x) for x in src] and [list(x) for x in t2] == [list(x) for x in tgt]


def test_init_weights_must_fit_the_config(tmp_path: Path, capsys) -> None:
    from moqe_jax import api

    m = api.Model.init(_cfg(), seed=0)
    m.save(tmp_path / "m", format="safetensors")
    rc = main(["train", "--init", str(tmp_path / "m"), "--set", "d_model=48", "--data", "synthetic", "--steps", "1",
               "--batch-size", "8", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "config" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "model").exists()
