"""T5X checkpoints in every layout and compressor, and untrusted-checkpoint confinement (issues 15, 16).

Parity: a tiny Switch model writes its parameters with orbax-checkpoint (OCDBT, per-parameter zarr +
``_METADATA``, the 2023 ``PLACEHOLDER://`` layout) and with tensorstore (legacy T5X, gzip / zlib / zstd /
blosc chunks); ``load_model("t5x:...")`` must give back bit-identical parameters and logits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zlib

import jax
import ml_dtypes
import numpy as np
import pytest

from moqe_jax import api
from moqe_jax.checkpoint.t5x import T5XCheckpoint
from moqe_jax.checkpoint.t5x_writer import write_orbax_t5x, write_t5x_checkpoint
from moqe_jax.checkpoint.zarr import ZarrArray, write_zarr
from moqe_jax.errors import CheckpointError
from moqe_jax.tree import flatten_params

WI = "encoder/layers_1/mlp/expert/wi/kernel"


@pytest.fixture
def tiny(seed):
    m = api.Model.init("tiny", seed=seed % 1000)
    flat = {p: np.asarray(v, np.float32) for p, v in flatten_params(m.params).items()}
    # experts stored in bf16 (as T5X does), read back as float32: the reference is the bf16-rounded model
    flat = {p: v.astype(ml_dtypes.bfloat16) if "expert" in p else v for p, v in flat.items()}
    ref = {p: np.asarray(v, np.float32) for p, v in flat.items()}
    return m.config, flat, ref


def _ids(cfg, seed):
    rs = np.random.RandomState(seed)
    return rs.randint(2, cfg.vocab_size, (2, 9)), rs.randint(2, cfg.vocab_size, (2, 5))


def _check_model(path, cfg, ref, seed):
    m = api.load_model(f"t5x:{path}", cfg)
    got = {p: np.asarray(v) for p, v in flatten_params(m.params).items()}
    assert set(got) == set(ref)
    for p, v in ref.items():
        assert got[p].dtype == np.float32 and np.array_equal(got[p], v), p
    x, y = _ids(cfg, seed)
    want = api.Model(cfg, jax.tree.map(np.asarray, _unflat(ref))).logits(x, y)
    np.testing.assert_array_equal(np.asarray(m.logits(x, y)), np.asarray(want))


def _unflat(flat):
    from moqe_jax.tree import unflatten_params
    return unflatten_params(dict(flat))


@pytest.mark.parametrize("layout,prefix,item", [("ocdbt", "checkpoint_", "state"), ("zarr", "", ""),
                                                ("placeholder", "", "")])
def test_orbax_layouts_parity(tmp_path, tiny, seed, layout, prefix, item):
    cfg, flat, ref = tiny
    step = write_orbax_t5x(str(tmp_path / "run"), flat, step=4, layout=layout, item=item)
    if prefix:  # T5X names Orbax steps checkpoint_<N>; a CheckpointManager names them <N>
        os.rename(step, str(tmp_path / "run" / f"{prefix}4"))
    write_orbax_t5x(str(tmp_path / "run"), {p: v * 0 for p, v in flat.items()}, step=2, layout=layout, item=item)
    names = os.listdir(step if not prefix else tmp_path / "run" / f"{prefix}4" / item)
    if layout == "placeholder":
        assert "checkpoint" in names and "_METADATA" not in names
        assert any(n.startswith("_optimizer.target.") for n in names)
        zarray = json.load(open(tmp_path / "run" / "4" / f"_optimizer.target.{WI.replace('/', '.')}" / ".zarray"))
        assert zarray["compressor"]["id"] == "zstd"  # orbax's zarr chunks
    elif layout == "ocdbt":
        assert "manifest.ocdbt" in names
    ck = T5XCheckpoint(str(tmp_path / "run"))  # the highest step (4), not step 2
    assert ck.layout == ("orbax-msgpack" if layout == "placeholder" else "orbax") and ck.step in (4, None)
    assert ck.shapes()[WI] == (flat[WI].shape, np.dtype(ml_dtypes.bfloat16))
    _check_model(tmp_path / "run", cfg, ref, seed)
    # lazy access: one layer, one expert (tensorstore on the same arrays), cast on read
    layer = ck.read_layer("encoder/layers_1", np.float32)
    assert set(layer) == {p for p in flat if p.startswith("encoder/layers_1/")}
    assert all(np.array_equal(v, ref[p]) for p, v in layer.items())
    e = int(np.random.default_rng(seed).integers(flat[WI].shape[0]))
    got = ck.read_slice(WI, (e, slice(3, 9)))
    assert got.dtype == np.dtype(ml_dtypes.bfloat16) and np.array_equal(got, flat[WI][e, 3:9])


@pytest.mark.parametrize("compressor", ["zstd", "blosc", "gzip", "zlib"])
def test_legacy_compressors_parity(tmp_path, tiny, seed, compressor):
    cfg, flat, ref = tiny
    out = write_t5x_checkpoint(str(tmp_path), flat, step=3, chunks="odd", compressor=compressor)
    zarray = json.load(open(os.path.join(out, "target." + WI.replace("/", "."), ".zarray")))
    assert zarray["compressor"]["id"] == compressor
    _check_model(tmp_path, cfg, ref, seed)


# ---- confinement (issue 16) ------------------------------------------------------------------------------

def _small(rng):
    return {"token_embedder/embedding": rng.standard_normal((6, 4)).astype(np.float32),
            "encoder/encoder_norm/scale": rng.standard_normal(4).astype(np.float32)}


def _one_line(e):
    assert "\n" not in str(e.value)
    return str(e.value)


def test_spec_paths_leaving_the_checkpoint(tmp_path, seed):
    rng = np.random.default_rng(seed)
    small = _small(rng)
    other = tmp_path / "elsewhere"
    secret = rng.standard_normal((6, 4)).astype(np.float32)
    write_zarr(str(other / "arr"), secret, (3, 4))
    E = "token_embedder/embedding"
    cases = {"abs": {"driver": "file", "path": str(other / "arr") + "/"},
             "dotdot": {"driver": "file", "path": "../../elsewhere/arr/"},
             "url": "file://" + str(other / "arr") + "/"}
    for name, kv in cases.items():
        def hook(p, spec, kv=kv):
            if p == E:
                spec["kvstore"] = kv
            return spec
        d = write_t5x_checkpoint(str(tmp_path / name), small, spec_hook=hook)
        with pytest.raises(CheckpointError, match="leaves the checkpoint directory") as e:
            T5XCheckpoint(d)
        assert "allow_outside=True" in _one_line(e)
        np.testing.assert_array_equal(T5XCheckpoint(d, allow_outside=True).read(E), secret)  # explicit opt-in
    # a real gs:// bucket: refused by default, passed to tensorstore unchanged with the opt-in
    gcs = {"bucket": "my-bucket", "driver": "gcs", "path": "run/checkpoint_1/target.token_embedder.embedding/"}
    d = write_t5x_checkpoint(str(tmp_path / "gcs"), small,
                             spec_hook=lambda p, s: {**s, "kvstore": gcs} if p == E else s)
    shutil.rmtree(os.path.join(d, "target.token_embedder.embedding"))
    with pytest.raises(CheckpointError, match="gs://my-bucket/run/checkpoint_1/target.token_embedder.embedding"):
        T5XCheckpoint(d)
    info = T5XCheckpoint(d, allow_outside=True).info(E)
    assert info.ts_spec == {"driver": "zarr", "kvstore": gcs} and info.zarr_dir is None


def test_symlinks_and_fifos_in_array_dirs(tmp_path, seed):
    rng = np.random.default_rng(seed)
    small = _small(rng)
    E = "token_embedder/embedding"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(zlib.compress(rng.standard_normal(12).astype(np.float32).tobytes()))
    # a chunk symlinked to a file outside the checkpoint
    d = write_t5x_checkpoint(str(tmp_path / "chunk"), small, chunks={E: (3, 4)}, compressor="zlib")
    chunk = os.path.join(d, "target.token_embedder.embedding", "1.0")
    os.remove(chunk)
    os.symlink(outside, chunk)
    ck = T5XCheckpoint(d)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as e:
        ck.read(E)
    _one_line(e)
    np.testing.assert_array_equal(ck.read("encoder/encoder_norm/scale"), small["encoder/encoder_norm/scale"])
    # the whole array directory symlinked elsewhere
    d = write_t5x_checkpoint(str(tmp_path / "dir"), small)
    z = os.path.join(d, "target.token_embedder.embedding")
    shutil.move(z, tmp_path / "moved")
    os.symlink(tmp_path / "moved", z)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        T5XCheckpoint(d).read(E)
    np.testing.assert_array_equal(T5XCheckpoint(d, allow_outside=True).read(E), small[E])
    # a symlink that stays inside the checkpoint is fine
    d = write_t5x_checkpoint(str(tmp_path / "inside"), small)
    z = os.path.join(d, "target.token_embedder.embedding")
    shutil.move(z, os.path.join(d, "real_arr"))
    os.symlink(os.path.join(d, "real_arr"), z)
    np.testing.assert_array_equal(T5XCheckpoint(d).read(E), small[E])
    # a FIFO as a chunk file or as the msgpack file: refused, never opened (would hang)
    d = write_t5x_checkpoint(str(tmp_path / "fifo"), small)
    chunk = os.path.join(d, "target.token_embedder.embedding", "0.0")
    os.remove(chunk)
    os.mkfifo(chunk)
    with pytest.raises(CheckpointError, match="not a regular file"):
        T5XCheckpoint(d).read(E)
    os.remove(os.path.join(d, "checkpoint"))
    os.mkfifo(os.path.join(d, "checkpoint"))
    with pytest.raises(CheckpointError, match="not a regular file"):
        T5XCheckpoint(d)


def test_orbax_names_leaving_the_checkpoint(tmp_path, seed):
    small = _small(np.random.default_rng(seed))
    step = write_orbax_t5x(str(tmp_path), small, layout="placeholder")
    from flax.serialization import msgpack_restore, msgpack_serialize
    f = os.path.join(step, "checkpoint")
    tree = msgpack_restore(open(f, "rb").read())
    tree["_optimizer"]["target"]["token_embedder"]["embedding"] = "PLACEHOLDER://../../elsewhere"
    open(f, "wb").write(msgpack_serialize(tree))
    with pytest.raises(CheckpointError, match="leaving the checkpoint directory") as e:
        T5XCheckpoint(step)
    _one_line(e)


def test_missing_chunks_need_a_fill_value_and_the_opt_in(tmp_path, seed):
    a = np.random.default_rng(seed).standard_normal((4, 6)).astype(np.float32) + 2
    write_zarr(str(tmp_path / "null"), a, (2, 3))  # fill_value null, as T5X writes
    os.remove(tmp_path / "null" / "1.1")
    with pytest.raises(CheckpointError, match="missing"):
        ZarrArray.open(str(tmp_path / "null")).read()
    with pytest.raises(CheckpointError, match="needs a declared fill_value"):
        ZarrArray.open(str(tmp_path / "null"), allow_missing_chunks=True)
    write_zarr(str(tmp_path / "fill"), a, (2, 3), fill_value=-1.5)
    os.remove(tmp_path / "fill" / "1.1")
    with pytest.raises(CheckpointError, match="1.1: zarr chunk file is missing"):
        ZarrArray.open(str(tmp_path / "fill")).read()
    want = a.copy()
    want[2:, 3:] = -1.5
    np.testing.assert_array_equal(ZarrArray.open(str(tmp_path / "fill"), allow_missing_chunks=True).read(), want)
    # Orbax: a missing array directory is an error too
    step = write_orbax_t5x(str(tmp_path / "orb"), _small(np.random.default_rng(seed)), layout="zarr")
    shutil.rmtree(os.path.join(step, "target.token_embedder.embedding"))
    with pytest.raises(CheckpointError) as e:
        T5XCheckpoint(step).read("token_embedder/embedding")
    assert "target.token_embedder.embedding" in _one_line(e)


def test_gzip_bomb_bounded_by_declared_chunk_size(tmp_path):
    """A 256 MiB gzip expansion in a chunk declared as 16 floats: one clear error, memory never inflates."""
    d = str(tmp_path / "bomb")
    write_zarr(d, np.ones(16, np.float32), (16,))
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    blk = b"\0" * 2**20
    open(os.path.join(d, "0"), "wb").write(b"".join([co.compress(blk) for _ in range(256)] + [co.flush()]))
    code = textwrap.dedent(f"""
        import json
        from moqe_jax.checkpoint.zarr import ZarrArray
        from moqe_jax.errors import CheckpointError
        def hwm():
            return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) // 1024
        za = ZarrArray.open({d!r})
        base = hwm()
        try:
            za.read()
            msg = None
        except CheckpointError as e:
            msg = str(e)
        print(json.dumps({{"msg": msg, "grew_mb": hwm() - base}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["msg"] is not None and "bomb/0: corrupt gzip chunk" in r["msg"] and "\n" not in r["msg"]
    assert r["grew_mb"] < 64, r  # inflating it would take 256 MiB


def test_trust_options_through_load_model_and_cli(tmp_path, tiny, seed):
    """``allow_outside`` / ``allow_missing_chunks`` reach the T5X reader from ``load_model`` and the CLI
    (``--allow-outside``), and are refused for sources they do not apply to."""
    from moqe_jax.cli import main
    from moqe_jax.errors import ConfigError

    cfg, flat, ref = tiny
    E = "token_embedder/embedding"
    moved = tmp_path / "moved"
    d = write_t5x_checkpoint(str(tmp_path / "ck"), flat, step=2)
    shutil.move(os.path.join(d, "target.token_embedder.embedding"), moved)

    def hook(p, spec):
        if p == E:
            spec["kvstore"] = {"driver": "file", "path": str(moved) + "/"}
        return spec
    d = write_t5x_checkpoint(str(tmp_path / "ck"), flat, step=2, spec_hook=hook)
    shutil.rmtree(os.path.join(d, "target.token_embedder.embedding"), ignore_errors=True)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    with pytest.raises(CheckpointError, match="--allow-outside") as e:
        api.load_model(f"t5x:{tmp_path / 'ck'}", cfg)
    _one_line(e)
    m = api.load_model(f"t5x:{tmp_path / 'ck'}", cfg, allow_outside=True)
    x, y = _ids(cfg, seed)
    want = api.Model(cfg, jax.tree.map(np.asarray, _unflat(ref))).logits(x, y)
    np.testing.assert_array_equal(np.asarray(m.logits(x, y)), np.asarray(want))
    assert main(["info", f"t5x:{tmp_path / 'ck'}", "--config", str(cfg_file), "--allow-outside"]) == 0
    assert main(["info", f"t5x:{tmp_path / 'ck'}", "--config", str(cfg_file)]) == 2
    with pytest.raises(ConfigError, match="t5x: checkpoints only"):
        api.load_model(str(tmp_path / "nowhere"), allow_missing_chunks=True)
    # from the CLI, the same (one) check names the flags
    import argparse

    from moqe_jax.commands.common import load_model_args
    for src in ("init:tiny", str(tmp_path / "nowhere")):
        with pytest.raises(ConfigError, match="--allow-outside/--allow-missing-chunks apply to t5x: ") as e:
            load_model_args(argparse.Namespace(model=src, allow_outside=True))
        assert "allow_outside/" not in _one_line(e).replace("--allow-outside/", "")
