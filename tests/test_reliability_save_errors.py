"""Full disk and SIGINT during a save (issue 16, finding 11): one-line CheckpointError naming the directory and
the fix (ENOSPC), KeyboardInterrupt re-raised after cleanup (CLI exit 130); the previous model stays intact
(bit-exact) and no temporary directory is left."""

from __future__ import annotations

import errno
import logging
import os

import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from _helpers import assert_failed_save_message, changed_model, enospc, same_params, tiny_fixture, wrapped_enospc

from moqe_jax import api
from moqe_jax.cli import main
from moqe_jax.errors import CheckpointError

tiny = tiny_fixture(5)


def _other(tiny):
    return changed_model(tiny, scale=2.0, shift=1.0)


def _after_real_save(exc_factory):
    """CheckpointManager.save that writes (partially: the async writer is still running) and then fails."""
    real = ocp.CheckpointManager.save

    def save(self, *a, **k):
        real(self, *a, **k)
        raise exc_factory()
    return save


@pytest.mark.parametrize("wrap", [False, True], ids=["oserror", "wrapped"])
def test_orbax_save_on_full_disk_is_one_line_and_keeps_old_model(tmp_path, tiny, monkeypatch, wrap):
    d = tmp_path / "m"
    api.save_model(tiny, d, format="orbax")

    monkeypatch.setattr(ocp.CheckpointManager, "save", _after_real_save(wrapped_enospc if wrap else enospc))
    with pytest.raises(CheckpointError) as ei:
        api.save_model(_other(tiny), d, format="orbax")
    monkeypatch.undo()
    assert_failed_save_message(str(ei.value), d, "free disk space")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no .m.tmp-* / .m.old-* left
    assert same_params(tiny.params, api.load_model(d).params)


def test_orbax_save_interrupted_reraises_and_keeps_old_model(tmp_path, tiny, monkeypatch, caplog):
    d = tmp_path / "m"
    api.save_model(tiny, d, format="safetensors")
    monkeypatch.setattr(ocp.CheckpointManager, "save", _after_real_save(KeyboardInterrupt))
    with caplog.at_level(logging.WARNING, logger="moqe_jax.checkpoint.store"), pytest.raises(KeyboardInterrupt):
        api.save_model(_other(tiny), d, format="orbax")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert same_params(tiny.params, api.load_model(d).params)
    lines = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and str(d) in lines[0] and "rerun" in lines[0]
    api.save_model(_other(tiny), d, format="orbax")  # the next save completes
    assert same_params(_other(tiny).params, api.load_model(d).params)


def test_safetensors_save_on_full_disk_is_one_line(tmp_path, tiny, monkeypatch):
    d = tmp_path / "m"
    api.save_model(tiny, d, format="safetensors")

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise enospc()
    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    with pytest.raises(CheckpointError) as ei:
        api.save_model(_other(tiny), d, format="safetensors")
    monkeypatch.undo()
    assert "\n" not in str(ei.value) and "model.safetensors" in str(ei.value) and "free disk space" in str(ei.value)
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert same_params(tiny.params, api.load_model(d).params)


def test_cli_convert_full_disk_exit_2_and_sigint_exit_130(tmp_path, tiny, monkeypatch, capsys):
    src = str(api.save_model(tiny, tmp_path / "src", format="safetensors"))
    out = tmp_path / "out"
    api.save_model(tiny, out, format="orbax")
    for exc, rc in ((enospc, 2), (KeyboardInterrupt, 130)):
        monkeypatch.setattr(ocp.CheckpointManager, "save", _after_real_save(exc))
        capsys.readouterr()
        assert main(["convert", "--from", src, "--to", str(out), "--format", "orbax", "--overwrite"]) \
            == rc
        monkeypatch.undo()
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert rc == 130 or ("free disk space" in err and str(out) in err)
        assert sorted(os.listdir(tmp_path)) == ["out", "src"]
        assert same_params(tiny.params, api.load_model(out).params)


def test_full_disk_while_copying_user_files_or_writing_manifest(tmp_path, tiny, monkeypatch):
    from moqe_jax.checkpoint import store

    d = tmp_path / "m"
    api.save_model(tiny, d, format="safetensors")
    (d / "tokenizer.model").write_bytes(b"user")

    def full(*a, **k):
        raise enospc()
    monkeypatch.setattr(store, "_copy_user_files", full)
    with pytest.raises(CheckpointError) as ei:
        api.save_model(_other(tiny), d, format="safetensors")
    monkeypatch.undo()
    assert_failed_save_message(str(ei.value), d, "free disk space")
    assert sorted(os.listdir(tmp_path)) == ["m"] and (d / "tokenizer.model").read_bytes() == b"user"
    assert same_params(tiny.params, api.load_model(d).params)


@pytest.mark.parametrize("which", [1, 2], ids=["move-old-aside", "rename-new-in"])
def test_failed_commit_rename_is_one_line_and_keeps_old_model(tmp_path, tiny, monkeypatch, which):
    """A rename of the commit fails (EACCES, EBUSY, EXDEV...): one CheckpointError, old model back in place,
    no hidden leftovers; the next save works."""
    from moqe_jax.checkpoint import store

    d = tmp_path / "m"
    api.save_model(tiny, d, format="safetensors")
    real, calls = store._rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == which:
            raise OSError(errno.EACCES, "Permission denied", dst)
        real(src, dst)
    monkeypatch.setattr(store, "_rename", rename)
    with pytest.raises(CheckpointError) as ei:
        api.save_model(_other(tiny), d, format="safetensors")
    monkeypatch.undo()
    assert_failed_save_message(str(ei.value), d, "Permission denied")
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert same_params(tiny.params, api.load_model(d).params)
    assert main(["info", str(d)]) == 0
    api.save_model(_other(tiny), d, format="safetensors")
    assert same_params(_other(tiny).params, api.load_model(d).params)
