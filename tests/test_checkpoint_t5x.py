"""T5X reader/writer: round trips over every leaf form, lazy slices, tensorstore/flax interop, bad input.

References: the arrays we wrote (random, never zeros), tensorstore's own zarr driver, flax.serialization.
"""

from __future__ import annotations

import gzip
import json
import os

import ml_dtypes
import msgpack
import numpy as np
import pytest
from flax.serialization import msgpack_restore, msgpack_serialize

from moqe_jax.checkpoint.t5x import T5XCheckpoint, check_against, flatten, load_t5x_params, resolve_checkpoint_file
from moqe_jax.checkpoint.t5x_writer import chunked, odd_chunk_shape, t5x_chunk_shape, write_t5x_checkpoint
from moqe_jax.checkpoint.zarr import ZarrArray, write_zarr
from moqe_jax.errors import CheckpointError

BF16 = ml_dtypes.bfloat16


def switch_tree(rng, D=16, H=2, K=4, F=24, E=4, L=2, V=40) -> dict[str, np.ndarray]:
    """Flat §2 param tree (odd layers sparse) with random float32 values."""
    J = H * K
    t = {"token_embedder/embedding": (V, D), "encoder/relpos_bias/rel_embedding": (H, 32),
         "decoder/relpos_bias/rel_embedding": (H, 32), "encoder/encoder_norm/scale": (D,),
         "decoder/decoder_norm/scale": (D,)}
    for stack in ("encoder", "decoder"):
        for i in range(L):
            pre = f"{stack}/layers_{i}"
            attns = ["attention"] if stack == "encoder" else ["self_attention", "encoder_decoder_attention"]
            norms = (["pre_attention_layer_norm"] if stack == "encoder"
                     else ["pre_self_attention_layer_norm", "pre_cross_attention_layer_norm"]) + ["pre_mlp_layer_norm"]
            for n in norms:
                t[f"{pre}/{n}/scale"] = (D,)
            for a in attns:
                for q in ("query", "key", "value"):
                    t[f"{pre}/{a}/{q}/kernel"] = (D, J)
                t[f"{pre}/{a}/out/kernel"] = (J, D)
            if i % 2 == 1:
                t[f"{pre}/mlp/router/router_weights/w/kernel"] = (D, E)
                t[f"{pre}/mlp/expert/wi/kernel"] = (E, D, F)
                t[f"{pre}/mlp/expert/wo/kernel"] = (E, F, D)
            else:
                t[f"{pre}/mlp/wi/kernel"] = (D, F)
                t[f"{pre}/mlp/wo/kernel"] = (F, D)
    return {k: (rng.standard_normal(s) + 0.5).astype(np.float32) for k, s in t.items()}


WI = "encoder/layers_1/mlp/expert/wi/kernel"
WO = "decoder/layers_1/mlp/expert/wo/kernel"


@pytest.fixture
def tree():
    return switch_tree(np.random.default_rng(0))


def test_roundtrip_every_branch(tmp_path, tree):
    tree = dict(tree)
    tree["extra/int_table"] = np.random.default_rng(1).integers(-1000, 1000, (5, 7)).astype(np.int32)
    tree["extra/f64_table"] = np.random.default_rng(2).standard_normal((3, 5, 2))
    dtypes = {"token_embedder/embedding": BF16, WO: BF16}
    grid = [-(-n // c) for n, c in zip(tree[WI].shape, odd_chunk_shape(tree[WI].shape), strict=True)]
    assert all(g > 1 for g in grid)  # edge chunks padded
    out = write_t5x_checkpoint(
        str(tmp_path), tree, step=7, chunks="odd", dtypes=dtypes,
        inline=["encoder/encoder_norm/scale"], legacy_path=["decoder/decoder_norm/scale"],
        gcs=["encoder/relpos_bias/rel_embedding"], gfile=["decoder/relpos_bias/rel_embedding"],
        chunked_array=["encoder/layers_0/mlp/wi/kernel"], skip_chunks={WI: {(1, 0, 1)}}, fill_value=0)
    assert os.path.basename(out) == "checkpoint_7"
    raw = msgpack_restore(open(os.path.join(out, "checkpoint"), "rb").read())
    tgt = raw["optimizer"]["target"]
    assert raw["version"] == 3 and set(raw) == {"version", "optimizer"}
    assert "path" in tgt["decoder"]["decoder_norm"]["scale"]
    assert tgt["encoder"]["relpos_bias"]["rel_embedding"]["kvstore"] == {
        "bucket": "t5x-dummy-bucket", "driver": "gcs", "path": "target.encoder.relpos_bias.rel_embedding/"}
    assert not os.path.exists(os.path.join(out, "target.encoder.layers_1.mlp.expert.wi.kernel", "1.0.1"))

    with pytest.raises(CheckpointError, match=r"1\.0\.1: zarr chunk file is missing") as e:
        T5XCheckpoint(str(tmp_path)).read(WI)  # a missing chunk is an error by default (issue 16)
    _one_line(e)
    ck = T5XCheckpoint(str(tmp_path), allow_missing_chunks=True)  # parent dir form
    assert ck.step == 7 and ck.version == 3 and set(ck) == set(tree)
    for p, want in tree.items():
        info = ck.info(p)
        dt = np.dtype(dtypes.get(p, want.dtype))
        assert info.shape == want.shape and info.dtype == dt, p
        got = ck.read(p)
        exp = want.astype(dt).copy()
        if p == WI:
            c = odd_chunk_shape(want.shape)
            exp[c[0]:2 * c[0], :c[1], c[2]:2 * c[2]] = 0  # missing chunk = the declared fill value 0
        assert got.dtype == dt and np.array_equal(got, exp), p
    # nested float32 tree for the model
    full = load_t5x_params(out, progress=False, allow_missing_chunks=True)
    assert full["decoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(full["token_embedder"]["embedding"],
                                  tree["token_embedder/embedding"].astype(BF16).astype(np.float32))


def test_lazy_slices_read_only_needed_chunks(tmp_path, tree):
    write_t5x_checkpoint(str(tmp_path), tree, chunks={WI: (1, 5, 7)})
    ck = T5XCheckpoint(str(tmp_path / "checkpoint_1"))
    za = ZarrArray.open(ck.info(WI).zarr_dir)
    w = tree[WI]
    assert za.chunks_for(2) == za.chunks_for() // w.shape[0]
    for idx in [2, -1, (slice(1, 3), slice(None), slice(2, 19)), (3, slice(4, 5), 0), (Ellipsis, slice(3, 9)), ()]:
        np.testing.assert_array_equal(ck.read_slice(WI, idx), w[idx], err_msg=str(idx))
    layer = ck.read_layer("encoder/layers_1")
    assert set(layer) == {p for p in tree if p.startswith("encoder/layers_1/")}
    assert ck.layers() == ["encoder/layers_0", "encoder/layers_1", "decoder/layers_0", "decoder/layers_1"]
    assert [p for p, _ in ck.iter_layers()] == ck.layers()
    assert ck.shapes()[WI] == (w.shape, np.dtype(np.float32))
    with pytest.raises(CheckpointError, match="unit-step"):
        ck.read_slice(WI, slice(0, 4, 2))
    with pytest.raises(CheckpointError, match="out of range"):
        ck.read_slice(WI, 9)


def test_t5x_chunk_rule():
    assert t5x_chunk_shape((128, 768, 3072), 4) == (128, 256, 384)  # docs/T5X_SWITCH.md §1.6
    assert t5x_chunk_shape((8, 768, 3072), 4) == (8, 768, 1536)
    assert t5x_chunk_shape((32128, 768), 4) == (16064, 768)


def test_tensorstore_interop(tmp_path):
    import tensorstore as ts
    rng = np.random.default_rng(3)
    for dt, chunks in [(np.float32, [3, 4]), (BF16, [2, 5]), (np.int32, [7, 3]), (np.float64, [5, 5])]:
        a = (rng.standard_normal((7, 9)) * 100).astype(dt)
        d = str(tmp_path / f"ts_{np.dtype(dt).name}")
        t = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": d},
                     "metadata": {"compressor": {"id": "gzip"}, "chunks": chunks}},
                    create=True, dtype=ts.bfloat16 if dt is BF16 else np.dtype(dt), shape=a.shape).result()
        t.write(a).result()
        got = ZarrArray.open(d).read()
        assert got.dtype == np.dtype(dt) and np.array_equal(got, a)
        # and the other way: our writer -> tensorstore
        d2 = str(tmp_path / f"ours_{np.dtype(dt).name}")
        write_zarr(d2, a, tuple(chunks))
        back = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": d2}}).result().read().result()
        assert np.array_equal(np.asarray(back), a)
    # scalar (rank 0, chunk key "0")
    d = str(tmp_path / "scalar")
    write_zarr(d, np.array(3.5, np.float32))
    assert os.path.exists(os.path.join(d, "0")) and ZarrArray.open(d).read() == np.float32(3.5)
    back = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": d}}).result().read().result()
    assert float(back) == 3.5


def test_flax_msgpack_interop(tmp_path, monkeypatch):
    """The reader decodes what flax writes (ext types, bf16, chunked leaves); the writer's chunked leaves are
    flax's own form."""
    from flax import serialization as ser
    rng = np.random.default_rng(4)
    tree = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": {"c": rng.standard_normal(5).astype(BF16),
            "s": np.int32(11), "z": 1 + 2j, "n": 7, "txt": "x"}, "big": rng.standard_normal((6, 5)).astype(np.float32)}
    monkeypatch.setattr(ser, "MAX_CHUNK_SIZE", 40)  # force flax to write __msgpack_chunked_array__ leaves
    d = tmp_path / "checkpoint_1"
    os.makedirs(d)
    target = {"a": tree["a"], "big": tree["big"], "b": {"c": tree["b"]["c"], "s": tree["b"]["s"]}}
    (d / "checkpoint").write_bytes(ser.msgpack_serialize({"version": 3, "optimizer": {"target": target},
                                                          "extra": tree}))
    ck = T5XCheckpoint(str(d))
    raw = ck._read_msgpack(str(d / "checkpoint"))["extra"]
    for got in (raw, {"a": ck.read("a"), "big": ck.read("big"), "b": {**raw["b"], "c": ck.read("b/c"),
                                                                        "s": ck.read("b/s")}}):
        np.testing.assert_array_equal(got["a"], tree["a"])
        np.testing.assert_array_equal(got["big"], tree["big"])
        assert got["b"]["c"].dtype == np.dtype(BF16) and np.array_equal(got["b"]["c"], tree["b"]["c"])
        assert got["b"]["s"] == 11 and got["b"]["z"] == 1 + 2j and got["b"]["n"] == 7
    # the writer's chunked form decodes with flax
    monkeypatch.setattr(ser, "MAX_CHUNK_SIZE", 2**30)
    np.testing.assert_array_equal(ser.msgpack_restore(ser.msgpack_serialize({"w": chunked(tree["big"], 24)}))["w"],
                                  tree["big"])


def test_checkpoint_path_forms(tmp_path, tree):
    small = {k: v for k, v in tree.items() if "layers" not in k}
    write_t5x_checkpoint(str(tmp_path), small, step=5)
    write_t5x_checkpoint(str(tmp_path), small, step=12)
    os.makedirs(tmp_path / "checkpoint_99.tmp-1234")  # unfinished save: ignored
    assert resolve_checkpoint_file(str(tmp_path)).endswith("checkpoint_12/checkpoint")
    assert resolve_checkpoint_file(f"t5x:{tmp_path}/checkpoint_5").endswith("checkpoint_5/checkpoint")
    f = str(tmp_path / "checkpoint_5" / "checkpoint")
    assert resolve_checkpoint_file(f) == f
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_file(str(tmp_path / "nope"))
    v2 = write_t5x_checkpoint(str(tmp_path / "v2"), small, version=2)  # version 2: fine without uint16
    assert T5XCheckpoint(v2).version == 2
    v1 = write_t5x_checkpoint(str(tmp_path / "v1"), small, version=1)
    with pytest.raises(CheckpointError, match="version 1 is not supported"):
        T5XCheckpoint(v1)


def _write(tmp_path, tree, **kw) -> str:
    return write_t5x_checkpoint(str(tmp_path), tree, chunks="odd", **kw)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs(tmp_path, tree):
    small = {k: v for k, v in tree.items() if "layers" not in k or "layers_1/mlp/expert" in k}
    out = _write(tmp_path / "ok", small)
    ckfile = os.path.join(out, "checkpoint")
    data = open(ckfile, "rb").read()

    def variant(name: str, payload: bytes) -> str:
        d = tmp_path / name
        os.makedirs(d)
        for entry in os.listdir(out):
            if entry != "checkpoint":
                os.symlink(os.path.join(out, entry), d / entry)
        (d / "checkpoint").write_bytes(payload)
        return str(d)

    with pytest.raises(CheckpointError, match="not a valid msgpack") as e:
        T5XCheckpoint(variant("trunc", data[: len(data) // 2]))
    _one_line(e)
    tree_ = msgpack_restore(data)
    no_version = {"optimizer": tree_["optimizer"]}
    with pytest.raises(CheckpointError, match="no 'version'"):
        T5XCheckpoint(variant("nover", msgpack_serialize(no_version)))
    t1 = json.loads(json.dumps(tree_["optimizer"]["target"], default=lambda x: None))
    t1["token_embedder"]["embedding"]["dtype"] = "uint16"
    with pytest.raises(CheckpointError, match="uint16") as e:
        T5XCheckpoint(variant("u16", msgpack_serialize({"version": 2, "optimizer": {"target": t1}})))
    _one_line(e)

    d = _write(tmp_path / "nodir", small)
    import shutil
    shutil.rmtree(os.path.join(d, "target.token_embedder.embedding"))
    ck = T5XCheckpoint(d)  # the index still opens lazily ...
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.read("token_embedder/embedding")  # ... the read names the missing directory

    d = _write(tmp_path / "gz", small)
    chunk = os.path.join(d, "target.encoder.layers_1.mlp.expert.wi.kernel", "0.0.0")
    blob = bytearray(open(chunk, "rb").read())
    blob[len(blob) // 2:] = b"\x00" * (len(blob) - len(blob) // 2)
    open(chunk, "wb").write(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt gzip chunk") as e:
        T5XCheckpoint(d).read(WI)
    assert "0.0.0" in _one_line(e)

    d = _write(tmp_path / "shape", small)
    za = os.path.join(d, "target.decoder.decoder_norm.scale", ".zarray")
    meta = json.load(open(za))
    meta["shape"] = [meta["shape"][0] + 1]
    json.dump(meta, open(za, "w"))
    with pytest.raises(CheckpointError, match=r"shape \[17\] != spec metadata shape \[16\]"):
        T5XCheckpoint(d).read("decoder/decoder_norm/scale")

    # a gzip chunk whose payload has the wrong length
    d = _write(tmp_path / "len", small)
    chunk = os.path.join(d, "target.decoder.decoder_norm.scale", "0")
    open(chunk, "wb").write(gzip.compress(b"\x00" * 8))
    with pytest.raises(CheckpointError, match="expected"):
        T5XCheckpoint(d).read("decoder/decoder_norm/scale")


def test_orbax_format_errors(tmp_path):
    """Orbax-format checkpoints are read (tests/test_t5x_orbax.py); broken ones get one line naming Orbax."""
    d = tmp_path / "orbax" / "checkpoint_10"
    os.makedirs(d / "state")
    (d / "state" / "_METADATA").write_text("{}")
    (d / "state" / "manifest.ocdbt").write_bytes(b"")
    for p in (d, d.parent):
        with pytest.raises(CheckpointError, match="corrupt Orbax metadata") as e:
            T5XCheckpoint(str(p))
        _one_line(e)
    # a real Orbax CheckpointManager directory (and one of its steps) without T5X parameters
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(str(tmp_path / "real"), options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(3, args=ocp.args.StandardSave({"w": np.arange(4.0)}))
    mngr.wait_until_finished()
    mngr.close()
    for p in (tmp_path / "real", tmp_path / "real" / "3"):
        with pytest.raises(CheckpointError, match="Orbax-format T5X checkpoint without parameters under 'target'"):
            T5XCheckpoint(str(p))
    # early Orbax/Flax format: msgpack with PLACEHOLDER:// leaves whose array directory is missing
    d2 = tmp_path / "early"
    os.makedirs(d2)
    (d2 / "checkpoint").write_bytes(msgpack.packb({"_optimizer": {"target": {"w": "PLACEHOLDER://_optimizer.target.w"}},
                                                   "flax_mutables": None}))
    with pytest.raises(CheckpointError, match="_optimizer.target.w does not exist"):
        T5XCheckpoint(str(d2))
    # a run directory with neither layout says what it looked for, Orbax step dirs included
    os.makedirs(tmp_path / "empty" / "logs")
    with pytest.raises(CheckpointError, match=r"checkpoint_<step> or Orbax <step> directories"):
        T5XCheckpoint(str(tmp_path / "empty"))


def test_tree_mismatch_names_first_path(tmp_path, tree):
    out = _write(tmp_path, tree)
    ck = T5XCheckpoint(out)
    expected = {p: tuple(v.shape) for p, v in tree.items()}
    check_against(ck, expected, "tiny")
    bad = dict(expected)
    bad["decoder/layers_1/mlp/expert/wi/kernel"] = (8, 16, 24)
    with pytest.raises(CheckpointError, match=r"decoder/layers_1/mlp/expert/wi/kernel has shape \[4, 16, 24\], "
                                              r"config tiny expects \[8, 16, 24\]"):
        check_against(ck, bad, "tiny")
    bad = dict(expected)
    bad["decoder/logits_dense/kernel"] = (16, 40)
    with pytest.raises(CheckpointError, match="decoder/logits_dense/kernel of config tiny is missing"):
        check_against(ck, bad, "tiny")
    del expected["token_embedder/embedding"]
    with pytest.raises(CheckpointError, match="token_embedder/embedding .* is not in config"):
        check_against(ck, expected, "tiny")
    assert flatten({"a": {"b": 1}}) == {"a/b": 1}


@pytest.mark.parametrize("compressor", ["gzip", "zlib", None])
def test_zarr_partial_chunk_reads(tmp_path, compressor):
    """Regions smaller than a chunk are streamed (byte span only); compare against NumPy indexing."""
    rng = np.random.default_rng(6)
    a = rng.standard_normal((4, 9, 11)).astype(BF16 if compressor == "gzip" else np.float32)
    d = str(tmp_path / "z")
    write_zarr(d, a, (4, 4, 5), compressor=compressor)  # chunk spans all 4 "experts", like T5X
    za = ZarrArray.open(d)
    idxs = [1, -1, (2, slice(3, 8)), (slice(1, 3), 5, slice(2, 9)), (0, 0, 0), (slice(None), slice(8, 9))]
    for _ in range(8):
        lo = [int(rng.integers(0, n)) for n in a.shape]
        idxs.append(tuple(slice(x, int(rng.integers(x + 1, n + 1))) for x, n in zip(lo, a.shape, strict=True)))
    for idx in idxs:
        np.testing.assert_array_equal(za.read(idx), a[idx], err_msg=str(idx))
        np.testing.assert_array_equal(za.read(idx, np.float32), a[idx].astype(np.float32))
    if compressor == "gzip":
        # multi-member gzip chunk: valid gzip that no zarr writer produces (tensorstore, numcodecs and T5X
        # write one member); tensorstore reads only the first member, so it is one clear error, never zeros
        fn = os.path.join(d, "0.0.0")
        raw = gzip.decompress(open(fn, "rb").read())
        open(fn, "wb").write(gzip.compress(raw[:100]) + gzip.compress(raw[100:]))
        with pytest.raises(CheckpointError, match="0.0.0: corrupt gzip chunk") as e:
            za.read((3, slice(0, 4), slice(0, 5)))
        _one_line(e)
        # truncated chunk: streaming read fails with one line naming the file
        open(fn, "wb").write(gzip.compress(raw)[:40])
        with pytest.raises(CheckpointError, match="0.0.0") as e:
            za.read((3, slice(0, 4), slice(0, 5)))
        _one_line(e)
