"""Reliability of saved-model directories (issue 16, findings 4, 5, 7, 10, 11): interrupted saves, validation
against the config, checksums, user files kept, non-finite weights flagged, one-line errors."""

from __future__ import annotations

import json
import os
import random
import struct
import warnings

import numpy as np
import pytest
from _helpers import changed_model, same_params, tiny_fixture

from moqe_jax import api
from moqe_jax.checkpoint import store
from moqe_jax.errors import CheckpointError
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.policy import quantize_model_rtn
from moqe_jax.tree import flatten_params, unflatten_params

tiny = tiny_fixture(3)


def _other(tiny):
    return changed_model(tiny, shift=1.0)


# ---- finding 4: a save killed between its renames -----------------------------------------------------

def test_killed_between_renames_recovered_by_load_model_and_next_save(tmp_path, tiny, monkeypatch):
    d = tmp_path / "m"
    api.save_model(tiny, d, format="safetensors")
    calls = []
    real = os.rename

    def kill_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise SystemExit("killed")  # no cleanup runs after a SIGKILL: rmtree is disabled below
        real(src, dst)

    monkeypatch.setattr(store.os, "rename", kill_second)
    monkeypatch.setattr(store.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        api.save_model(_other(tiny), d, format="safetensors")
    monkeypatch.undo()
    assert not d.exists()
    m = api.load_model(str(d))  # the facade must let the store's recovery run
    assert same_params(m.params, tiny.params) or same_params(m.params, _other(tiny).params)
    api.save_model(tiny, d, format="safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no orphaned .m.old-* / .m.tmp-*


class _Kill(BaseException):
    pass


class _Killer:
    """Counts filesystem steps; raises :class:`_Kill` at step ``at`` and makes every later step a no-op (a
    SIGKILLed process runs no cleanup)."""

    def __init__(self, at: int):
        self.at, self.n, self.dead = at, 0, False

    def wrap(self, fn):
        def wrapped(*a, **k):
            if self.dead:
                return None
            self.n += 1
            if self.n == self.at:
                self.dead = True
                raise _Kill
            return fn(*a, **k)
        return wrapped


def test_kill_loop_always_leaves_old_or_new(tmp_path, tiny, monkeypatch):
    """Simulated SIGKILL before the i-th filesystem step of a save (rename/fsync/unlink): the old or the new
    model is loadable afterwards, nothing else in the parent is touched, no hidden dirs pile up."""
    new = _other(tiny)
    rng = random.Random(0)
    for i in range(8):
        d = tmp_path / f"k{i}"
        api.save_model(tiny, d, format="safetensors")
        (d / "tokenizer").mkdir()
        (d / "tokenizer" / "spm.model").write_bytes(b"user")
        (tmp_path / "keep.txt").write_text("user data")
        killer = _Killer(rng.randint(1, 12))
        monkeypatch.setattr(store.os, "rename", killer.wrap(os.rename))
        monkeypatch.setattr(store.os, "fsync", killer.wrap(os.fsync))
        monkeypatch.setattr(store.shutil, "rmtree", killer.wrap(store.shutil.rmtree))
        try:
            api.save_model(new, d, format="safetensors")
        except _Kill:
            pass
        monkeypatch.undo()
        m = api.load_model(str(d))
        assert same_params(m.params, tiny.params) or same_params(m.params, new.params), i
        assert (tmp_path / "keep.txt").read_text() == "user data"
        api.save_model(new, d, format="safetensors")  # the next save recovers and cleans up
        assert (d / "tokenizer" / "spm.model").read_bytes() == b"user"
        assert not [e for e in os.listdir(tmp_path) if e.startswith(f".k{i}.")], os.listdir(tmp_path)


# ---- finding 5: saved dirs checked against their config -------------------------------------------------

def _edit_manifest(d, fn):
    p = os.path.join(d, store.MANIFEST)
    man = json.load(open(p))
    fn(man)
    json.dump(man, open(p, "w"))


def test_wrong_d_model_in_manifest_is_rejected(tmp_path, tiny):
    d = api.save_model(tiny, tmp_path / "m", format="safetensors")
    _edit_manifest(d, lambda m: m["config"].update(d_model=48))
    with pytest.raises(CheckpointError, match=r"(?i)checksum|does not match"):
        api.load_model(d)


def test_shapes_checked_against_config_without_checksums(tmp_path, tiny):
    d = api.save_model(tiny, tmp_path / "m", format="safetensors")

    def edit(m):
        m.pop("checksums", None)
        m["config"]["d_model"] = 48
    _edit_manifest(d, edit)
    with pytest.raises(CheckpointError, match=r"shape .* config"):
        api.load_model(d)


def test_packed_scheme_edit_detected(tmp_path, tiny):
    m = quantize_model_rtn(tiny, QuantSpec(bits=4), ("experts",))
    d = api.save_model(m, tmp_path / "q", format="safetensors")

    def edit(man):
        for ent in man["leaves"].values():
            if ent["kind"] == "packed":
                ent["meta"]["spec"]["scheme"] = "log"
    _edit_manifest(d, edit)
    with pytest.raises(CheckpointError, match="checksum"):
        api.load_model(d)


def _rewrite_header(path, fn):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    fn(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    open(path, "wb").write(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def test_safetensors_aliasing_and_negative_dims_rejected(tmp_path):
    a = {"x": np.arange(4, dtype=np.float32), "y": np.arange(4, 8, dtype=np.float32)}
    p = str(tmp_path / "a.safetensors")
    store.write_safetensors(p, a)
    _rewrite_header(p, lambda h: h["y"].update(data_offsets=h["x"]["data_offsets"]))
    with pytest.raises(CheckpointError, match="overlap|contiguous"):
        store.read_safetensors(p)
    store.write_safetensors(p, a)
    _rewrite_header(p, lambda h: h["x"].update(shape=[-4]))
    with pytest.raises(CheckpointError, match="shape"):
        store.read_safetensors(p)
    store.write_safetensors(p, a)
    _rewrite_header(p, lambda h: h.update(z=[1, 2]))
    with pytest.raises(CheckpointError, match="bad safetensors entry"):
        store.read_safetensors(p)


def test_dtype_relabel_detected(tmp_path, tiny):
    d = api.save_model(tiny, tmp_path / "m", format="safetensors")
    key = "encoder/layers_1/mlp/expert/wi/kernel"

    def relabel(h):
        h[key]["dtype"] = "I32"
    _rewrite_header(os.path.join(d, store.SAFETENSORS_FILE), relabel)

    def man_relabel(m):
        m["leaves"][key]["dtype"] = "int32"
        m.pop("checksums", None)
    _edit_manifest(d, man_relabel)
    with pytest.raises(CheckpointError, match="dtype"):
        api.load_model(d)


def test_bit_flip_detected_by_checksum(tmp_path, tiny):
    d = api.save_model(tiny, tmp_path / "m", format="safetensors")
    f = os.path.join(d, store.SAFETENSORS_FILE)
    raw = bytearray(open(f, "rb").read())
    raw[-5] ^= 0x10
    open(f, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        api.load_model(d)


def test_sharded_orbax_restore_checks_crc(tmp_path, tiny):
    """A sharded restore (``load_model(..., sharding=)``) verifies each tensor's CRC-32 too (one process)."""
    import jax

    d = api.save_model(tiny, tmp_path / "m", format="orbax")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    api.load_model(d, sharding=sh)  # intact: loads
    f = os.path.join(d, store.MANIFEST)
    man = json.load(open(f))
    man["leaves"]["decoder/layers_0/mlp/wi/kernel"]["crc32"] ^= 1  # as if the stored bytes had changed
    man["checksums"]["manifest_sha256"] = store._manifest_digest(man)
    json.dump(man, open(f, "w"))
    with pytest.raises(CheckpointError, match=r"decoder/layers_0/mlp/wi/kernel fails its checksum"):
        api.load_model(d, sharding=sh)


# ---- finding 11: manifests validated as data -------------------------------------------------------------

@pytest.mark.parametrize("edit", [
    lambda m: m.__setitem__("leaves", []),
    lambda m: m["leaves"].__setitem__("token_embedder/embedding", [1, 2]),
    lambda m: m["leaves"]["token_embedder/embedding"].__setitem__("shape", "big"),
    lambda m: m.__setitem__("config", [1]),
])
def test_manifest_type_errors_are_one_line(tmp_path, tiny, edit):
    d = api.save_model(tiny, tmp_path / "m", format="safetensors")
    _edit_manifest(d, edit)
    with pytest.raises(CheckpointError) as ei:
        api.load_model(d)
    assert "\n" not in str(ei.value) and store.MANIFEST in str(ei.value)


def test_manifest_json_list(tmp_path, tiny):
    d = api.save_model(tiny, tmp_path / "m", format="safetensors")
    open(os.path.join(d, store.MANIFEST), "w").write("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        api.load_model(d)


# ---- finding 7: user files kept, foreign dirs refused -----------------------------------------------------

def test_resave_keeps_user_files_and_refuses_foreign_dir(tmp_path, tiny):
    d = tmp_path / "m"
    api.save_model(tiny, d, format="safetensors")
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "spm.model").write_bytes(b"spm")
    (d / "notes.txt").write_text("mine")
    api.save_model(_other(tiny), d, format="orbax")
    assert (d / "tokenizer" / "spm.model").read_bytes() == b"spm" and (d / "notes.txt").read_text() == "mine"
    assert not (d / store.SAFETENSORS_FILE).exists()  # the store's own old files are replaced
    assert same_params(api.load_model(d).params, _other(tiny).params)
    f = tmp_path / "foreign"
    f.mkdir()
    (f / "data.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="overwrite"):
        api.save_model(tiny, f)
    api.save_model(tiny, f, format="safetensors", overwrite=True)
    assert (f / "data.bin").read_bytes() == b"x" and same_params(api.load_model(f).params, tiny.params)


# ---- finding 10: non-finite weights flagged at load --------------------------------------------------------

def test_nonfinite_weights_warn_at_load(tmp_path, tiny):
    flat = {k: np.asarray(v).copy() for k, v in flatten_params(tiny.params).items()}
    flat["decoder/layers_0/mlp/wi/kernel"][0, 0] = np.nan
    d = api.save_model(tiny.replace(params=unflatten_params(flat)), tmp_path / "m", format="safetensors")
    with pytest.warns(UserWarning, match=r"non-finite.*decoder/layers_0/mlp/wi/kernel"):
        api.load_model(d)
    # the opt-in strict mode: one CheckpointError (API and CLI), and "ignore" skips the check
    with pytest.raises(CheckpointError, match=r"non-finite.*decoder/layers_0/mlp/wi/kernel.*refusing"):
        api.load_model(d, nonfinite="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api.load_model(d, nonfinite="ignore")
    from moqe_jax.cli import main
    assert main(["info", str(d), "--nonfinite", "error"]) == 2
    with pytest.raises(CheckpointError, match="nonfinite='maybe'"):
        api.load_model(d, nonfinite="maybe")


_SAVER = """
import itertools, sys
sys.path.insert(0, {tests!r})
from _helpers import changed_model, random_tiny_model
from moqe_jax import api
a = random_tiny_model(3)
b = changed_model(a, shift=1.0)
api.save_model(a, {d!r}, format="safetensors")
print("ready", flush=True)
for i in itertools.count():
    api.save_model(b if i % 2 == 0 else a, {d!r}, format="orbax" if i % 4 < 2 else "safetensors")
"""


def test_sigkill_loop_during_saves(tmp_path, tiny):
    """A real SIGKILL at random times while a process re-saves a model: always the old or the new model."""
    import signal
    import subprocess
    import sys
    import time

    tests = os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(1)
    new = _other(tiny)
    d = tmp_path / "m"
    (tmp_path / "keep.txt").write_text("user data")
    env = dict(os.environ, JAX_PLATFORMS="cpu", MOQE_NO_PROGRESS="1")
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", _SAVER.format(tests=tests, d=str(d))], stdout=subprocess.PIPE,
                             env=env, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        m = api.load_model(str(d))
        assert same_params(m.params, tiny.params) or same_params(m.params, new.params)
        assert (tmp_path / "keep.txt").read_text() == "user data"
    api.save_model(tiny, d, format="safetensors")
    assert sorted(os.listdir(tmp_path)) == ["keep.txt", "m"]


@pytest.mark.parametrize("damage, words", [
    (lambda raw: raw + b"\0" * 8, "do not fit the file size"),          # trailing bytes
    (lambda raw: raw[:-4], "do not fit the file size"),                 # truncated data
    (lambda raw: raw[:6], "truncated safetensors file"),                # no header length
    (lambda raw: struct.pack("<Q", 1 << 40) + raw[8:], "truncated safetensors file|exceeds"),
    (lambda raw: raw[:8] + b"\xff" + raw[9:], "corrupt|bad safetensors"),  # not JSON
])
def test_safetensors_library_errors_are_one_line(tmp_path, damage, words):
    p = str(tmp_path / "a.safetensors")
    store.write_safetensors(p, {"x": np.arange(4, dtype=np.float32)}, {"k": "v"})
    raw = open(p, "rb").read()
    open(p, "wb").write(damage(raw))
    with pytest.raises(CheckpointError, match=words) as ei:
        store.read_safetensors(p)
    assert "\n" not in str(ei.value) and p in str(ei.value)


def test_safetensors_fifo_and_non_string_metadata_refused(tmp_path):
    fifo = str(tmp_path / "f.safetensors")
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        store.read_safetensors(fifo)  # refused before opening (opening a FIFO would hang)
    p = str(tmp_path / "a.safetensors")
    store.write_safetensors(p, {"x": np.arange(4, dtype=np.float32)}, {"k": "v"})
    _rewrite_header(p, lambda h: h.update(__metadata__={"k": 1}))
    with pytest.raises(CheckpointError, match="bad safetensors entry") as ei:
        store.read_safetensors(p)
    assert "\n" not in str(ei.value)
