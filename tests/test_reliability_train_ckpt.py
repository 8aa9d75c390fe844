"""Training checkpoints (`moqe train`'s Orbax `OUT/checkpoints`) on a full disk, on Ctrl-C and on a resume with
another config (issue 16, finding 11): one line naming the run directory and the fix (exit 2; Ctrl-C exit 130),
the last good checkpoint intact, no partial step directory left, and the rerun reaches the uninterrupted result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from _helpers import enospc, wrapped_enospc

from moqe_jax.checkpoint.store import load_params
from moqe_jax.cli import main
from moqe_jax.tree import flatten_params

_ARGS = ["train", "--config", "tiny", "--set", 'dtype="float32"', "--data", "synthetic", "--steps", "3",
         "--batch-size", "8", "--warmup", "10", "--log-every", "1", "--eval-every", "0", "--save-every", "1"]


def _failing_save(at_step: int, exc_factory, partial: bool):
    """CheckpointManager.save failing at ``at_step``: either after writing only a partial temporary step
    directory (``partial``: what a full disk or a Ctrl-C mid-write leaves), or after a real (async) save."""
    real = ocp.CheckpointManager.save

    def save(self, step, *a, **k):
        if step != at_step:
            return real(self, step, *a, **k)
        if partial:
            tmp = Path(str(self.directory)) / f"{step}.orbax-checkpoint-tmp-1700000000000000"
            (tmp / "state").mkdir(parents=True)
            (tmp / "state" / "half_written").write_bytes(b"\0" * 100)
        else:
            real(self, step, *a, **k)
        raise exc_factory()
    return save


def _ckdir_entries(run: Path) -> list[str]:
    return sorted(os.listdir(run / "checkpoints"))


def _model(run: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten_params(load_params(str(run / "model"))[0]).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    """The uninterrupted run's exported model."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(_ARGS + ["--out", str(run)]) == 0
    return _model(run)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("exc,partial", [(enospc, True), (wrapped_enospc, False)], ids=["partial", "wrapped"])
def test_full_disk_during_training_checkpoint(tmp_path, monkeypatch, capsys, reference, exc, partial):
    run = tmp_path / "run"
    monkeypatch.setattr(ocp.CheckpointManager, "save", _failing_save(2, exc, partial))
    rc = main(_ARGS + ["--out", str(run)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(run) in err and "free disk space" in err and "rerun the same command" in err
    kept = 1 if partial else 2  # a real (async) write that finished before the error is a good checkpoint
    assert f"last good checkpoint (step {kept})" in err
    assert not (run / "model").exists()
    rc = main(_ARGS + ["--out", str(run)])  # the rerun resumes and reaches the uninterrupted result
    out = capsys.readouterr().out
    assert rc == 0 and f"step {kept}" in out.split("resumed from", 1)[1].splitlines()[0]
    _assert_same(reference, _model(run))
    assert _ckdir_entries(run) == ["1", "2", "3"]  # the partial directory was cleaned up
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][-1] == 3


@pytest.mark.parametrize("partial", [True, False], ids=["mid-write", "after-write"])
def test_ctrl_c_during_training_checkpoint(tmp_path, monkeypatch, capsys, reference, partial):
    run = tmp_path / "run"
    monkeypatch.setattr(ocp.CheckpointManager, "save", _failing_save(2, KeyboardInterrupt, partial))
    rc = main(_ARGS + ["--out", str(run)])
    monkeypatch.undo()
    cap = capsys.readouterr()
    assert rc == 130 and "Traceback" not in cap.err
    lines = [x for x in cap.out.splitlines() if "interrupted" in x]
    kept = 1 if partial else 2
    assert len(lines) == 1 and str(run) in lines[0] and f"last good checkpoint (step {kept})" in lines[0] \
        and "rerun the same command" in lines[0], cap.out
    assert _ckdir_entries(run) == [str(s) for s in range(1, kept + 1)]  # no partial step directory
    assert main(_ARGS + ["--out", str(run)]) == 0
    capsys.readouterr()
    _assert_same(reference, _model(run))
    assert _ckdir_entries(run) == ["1", "2", "3"]


def test_resume_with_another_config_without_config_record_is_one_line(tmp_path, capsys):
    """`model_config.json` lost (or written by an older version): Orbax's restore error becomes one line."""
    run = tmp_path / "run"
    assert main(_ARGS + ["--steps", "1", "--out", str(run)]) == 0
    (run / "model_config.json").unlink()
    (run / "train_config.json").unlink()
    capsys.readouterr()
    for extra in (["--set", "d_ff=96"], ["--optimizer", "adamw"]):
        rc = main(_ARGS + extra + ["--out", str(run)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert str(run) in err and "cannot resume step 1" in err and "fresh --out" in err
        assert _ckdir_entries(run) == ["1"]
