"""Model store (Orbax / safetensors): bit-exact round trips of float + quantized + sub-1-bit leaves,
atomic saves, interop with the `safetensors` library, no pickle; T5X -> model logits."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moqe_jax import api
from moqe_jax.checkpoint import store
from moqe_jax.checkpoint.t5x_writer import write_t5x_checkpoint
from moqe_jax.errors import CheckpointError
from moqe_jax.packed import is_packed
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.tree import flatten_params


@pytest.fixture(scope="module")
def tiny():
    return api.Model.init("tiny", seed=1)


def _ids(cfg, b=2, t=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(2, cfg.vocab_size, (b, t)), rng.integers(2, cfg.vocab_size, (b, t))


def _qt(rng, shape, spec):
    *batch, k, n = shape
    g = spec.num_groups(k)
    codes = rng.integers(0, spec.maxq + 1, shape)
    scales = rng.uniform(0.01, 0.1, (*batch, g, n)).astype(np.float32)
    zeros = rng.integers(0, spec.maxq + 1, (*batch, g, n)).astype(np.float32) if spec.has_zeros else None
    if spec.is_ternary:
        zeros = -rng.uniform(0.01, 0.1, (*batch, g, n)).astype(np.float32)
    return QuantizedTensor.from_codes(codes, scales, zeros, spec)


def _quantized_model(tiny):
    """Tiny model with QuantizedTensor experts (3 specs) and a Sub1Tensor, codes from `from_codes`."""
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda x: x, tiny.params)
    enc = params["encoder"]["layers_1"]["mlp"]["expert"]
    dec = params["decoder"]["layers_1"]["mlp"]["expert"]
    enc["wi"]["kernel"] = _qt(rng, enc["wi"]["kernel"].shape, QuantSpec(bits=4, granularity=16))
    enc["wo"]["kernel"] = _qt(rng, enc["wo"]["kernel"].shape, QuantSpec(bits=3, symmetric=False))
    dec["wi"]["kernel"] = _qt(rng, dec["wi"]["kernel"].shape, QuantSpec(bits=2, scheme="log"))
    tern = _qt(rng, dec["wo"]["kernel"].shape, QuantSpec(bits="ternary"))
    try:
        from moqe_jax.quant.sub1 import encode
        dec["wo"]["kernel"] = encode(tern)
    except ImportError:
        dec["wo"]["kernel"] = tern
    params["token_embedder"]["embedding"] = jnp.asarray(params["token_embedder"]["embedding"], jnp.bfloat16)
    return api.Model(tiny.config, params)


def _leaves_equal(a, b):
    fa, fb = flatten_params(a), flatten_params(b)
    assert set(fa) == set(fb)
    for p in fa:
        x, y = fa[p], fb[p]
        assert type(x) is type(y) or not is_packed(x), p
        if is_packed(x):
            ax, mx = x.to_arrays()
            ay, my = y.to_arrays()
            assert mx == my, p
            for k in ax:
                assert np.asarray(ax[k]).dtype == np.asarray(ay[k]).dtype
                assert np.array_equal(np.asarray(ax[k]), np.asarray(ay[k])), (p, k)
        else:
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint8), y.view(np.uint8)), p


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_quantized_model_roundtrip_bit_exact(tmp_path, tiny, fmt, monkeypatch):
    m = _quantized_model(tiny)
    d = api.save_model(m, tmp_path / "m", format=fmt)

    def no_pickle(*a, **k):
        raise AssertionError("loading must never unpickle")

    import pickle
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(np, "load", no_pickle)
    back = api.load_model(d)
    monkeypatch.undo()
    assert back.config == m.config
    _leaves_equal(m.params, back.params)
    man = store.read_manifest(d)
    assert man["format"] == fmt and man["leaves"]["encoder/layers_1/mlp/expert/wi/kernel"]["type"] == "QuantizedTensor"
    assert store.disk_size(d) == sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def test_quantized_logits_after_roundtrip(tmp_path, tiny):
    m = _quantized_model(tiny)
    x, y = _ids(m.config)
    want = m.logits(x, y)
    back = api.load_model(api.save_model(m, tmp_path / "q", format="safetensors"))
    np.testing.assert_array_equal(back.logits(x, y), want)


def test_api_roundtrip_and_sharded_restore(tmp_path, tiny):
    d = tiny.save(tmp_path / "float")
    back = api.load_model(str(d))
    _leaves_equal(tiny.params, back.params)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    back2 = api.load_model(d, sharding=lambda name, shape: sh)
    leaf = back2.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    assert isinstance(leaf, jax.Array) and leaf.sharding == sh
    _leaves_equal(tiny.params, jax.tree.map(np.asarray, back2.params))


def test_safetensors_interop_with_library(tmp_path, tiny):
    m = _quantized_model(tiny)
    d = api.save_model(m, tmp_path / "st", format="safetensors")
    f = os.path.join(d, store.SAFETENSORS_FILE)
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    theirs = load_file(f)
    ours, meta = store.read_safetensors(f)
    assert set(theirs) == set(ours) and "moqe_manifest" in meta
    for k, t in theirs.items():
        a = ours[k]
        if a.dtype == np.dtype(ml_dtypes.bfloat16):
            assert t.dtype == torch.bfloat16
            assert np.array_equal(t.view(torch.int16).numpy(), a.view(np.int16)), k
        else:
            assert np.array_equal(t.numpy(), a), k
    with safe_open(f, framework="np") as sf:
        assert json.loads(sf.metadata()["moqe_manifest"])["format"] == "safetensors"
    # library-written file -> our reader
    from safetensors.numpy import save_file
    arrs = {"a": np.arange(12, dtype=np.int32).reshape(3, 4), "b::packed": np.arange(5, dtype=np.uint8)}
    save_file(arrs, str(tmp_path / "lib.safetensors"), metadata={"k": "v"})
    got, meta = store.read_safetensors(str(tmp_path / "lib.safetensors"))
    assert meta == {"k": "v"} and all(np.array_equal(got[k], v) for k, v in arrs.items())
    # the default read maps the file (no copy, read-only); mmap=False copies; both equal the library's arrays
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in ours.values() if a.size)
    copies, _ = store.read_safetensors(f, mmap=False)
    assert all(not isinstance(a, np.memmap) and np.array_equal(a.view(np.uint8), ours[k].view(np.uint8))
               for k, a in copies.items())
    empty = {"z": np.zeros((0, 3), np.float32), "x": np.ones(2, np.float16)}
    save_file(empty, str(tmp_path / "empty.safetensors"))
    got, _ = store.read_safetensors(str(tmp_path / "empty.safetensors"))
    assert got["z"].shape == (0, 3) and got["z"].dtype == np.float32 and np.array_equal(got["x"], empty["x"])


def test_atomic_save_failure_keeps_previous(tmp_path, tiny, monkeypatch):
    d = tmp_path / "atomic"
    api.save_model(tiny, d, format="safetensors")
    before = store.disk_size(d)
    m = _quantized_model(tiny)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(store, "write_safetensors", boom)
    with pytest.raises(OSError, match="simulated"):
        api.save_model(m, d, format="safetensors")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["atomic"]  # no tmp left behind
    _leaves_equal(tiny.params, api.load_model(d).params)
    assert store.disk_size(d) == before

    # killed between the two renames: previous checkpoint moved aside, new one not yet in place
    real_rename = store._rename
    calls = []

    def kill_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # simulated kill
        real_rename(src, dst)

    monkeypatch.setattr(store, "_rename", kill_on_second)
    with pytest.raises(KeyboardInterrupt):
        api.save_model(m, d, format="orbax")
    monkeypatch.undo()
    assert not d.exists()
    _leaves_equal(tiny.params, api.load_model(d).params)  # recovered from .atomic.old-*
    api.save_model(m, d, format="orbax")  # the next save completes normally
    _leaves_equal(m.params, api.load_model(d).params)


def test_store_bad_input(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="no such saved model"):
        api.load_model(tmp_path / "missing")
    os.makedirs(tmp_path / "junk")
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(CheckpointError, match="non-empty directory"):
        api.save_model(tiny, tmp_path / "junk")
    d = api.save_model(tiny, tmp_path / "st", format="safetensors")
    man = json.load(open(os.path.join(d, store.MANIFEST)))
    man["leaves"]["encoder/layers_1/mlp/expert/wi/kernel"] = {"kind": "packed", "type": "Evil", "meta": {},
                                                              "fields": {}}
    json.dump(man, open(os.path.join(d, store.MANIFEST), "w"))
    with pytest.raises(CheckpointError, match="unknown packed weight type 'Evil'"):
        api.load_model(d)
    f = os.path.join(d, store.SAFETENSORS_FILE)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(CheckpointError, match="do not fit"):
        store.read_safetensors(f)


def test_t5x_checkpoint_to_model_logits(tmp_path, tiny):
    """Fixture writer -> load_model("t5x:...") -> identical logits; mismatching preset names the path."""
    flat = flatten_params(tiny.params)
    bf = {p: np.asarray(v, np.float32).astype(ml_dtypes.bfloat16) for p, v in flat.items() if "expert" in p}
    src = {p: bf.get(p, np.asarray(v, np.float32)) for p, v in flat.items()}
    write_t5x_checkpoint(str(tmp_path / "t5x"), src, step=3, chunks="odd",
                         inline=["encoder/encoder_norm/scale"], gcs=["token_embedder/embedding"])
    m = api.load_model(f"t5x:{tmp_path / 't5x'}", "tiny")
    ref = api.Model(tiny.config, jax.tree.map(lambda x: x, tiny.params))
    for p in bf:  # the checkpoint stored experts in bf16
        node = ref.params
        *parents, last = p.split("/")
        for k in parents:
            node = node[k]
        node[last] = bf[p].astype(np.float32)
    x, y = _ids(tiny.config, seed=3)
    np.testing.assert_array_equal(m.logits(x, y), ref.logits(x, y))
    assert all(np.asarray(v).dtype == np.float32 for v in flatten_params(m.params).values())
    del src["decoder/layers_1/mlp/router/router_weights/w/kernel"]
    write_t5x_checkpoint(str(tmp_path / "t5x_bad"), src)
    with pytest.raises(CheckpointError, match="decoder/layers_1/mlp/router/router_weights/w/kernel of config tiny"):
        api.load_model(f"t5x:{tmp_path / 't5x_bad'}", "tiny")


def test_cli_convert(tmp_path, tiny, capsys):
    from moqe_jax.cli import main

    flat = {p: np.asarray(v, np.float32) for p, v in flatten_params(tiny.params).items()}
    write_t5x_checkpoint(str(tmp_path / "t5x"), flat, step=2)
    out = tmp_path / "conv"
    assert main(["convert", "--from", f"t5x:{tmp_path / 't5x'}", "--config", "tiny", "--to", str(out),
                 "--format", "safetensors"]) == 0
    _leaves_equal(tiny.params, jax.tree.map(np.asarray, api.load_model(out).params))
    # export back to T5X and read it again
    assert main(["convert", "--from", str(out), "--to-t5x", str(tmp_path / "re")]) == 0
    again = api.load_model(f"t5x:{tmp_path / 're'}", "tiny")
    _leaves_equal(tiny.params, again.params)
    # failures: one line, nothing partial left behind
    capsys.readouterr()
    assert main(["convert", "--from", f"t5x:{tmp_path / 't5x'}", "--config", "switch-base-8", "--to",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config switch-base-8" in err[0] and not (tmp_path / "bad").exists()
    assert main(["convert", "--from", f"t5x:{tmp_path / 't5x'}", "--to", str(tmp_path / "bad")]) == 2
    assert "--config" in capsys.readouterr().err and sorted(os.listdir(tmp_path)) == ["conv", "re", "t5x"]
