"""Save / load (quantized) models: Orbax or safetensors, plus a JSON manifest; never pickle.

Directory written by :func:`save_params` (``moqe_jax.api.save_model``, ``Model.save``)::

    DIR/moqe_model.json        manifest: format version, storage format, SwitchConfig, one entry per leaf
    DIR/params/0/...           format="orbax": ocp.CheckpointManager (async save, OCDBT), step 0
    DIR/model.safetensors      format="safetensors": one file, tensors named ``path`` / ``path::field``

Float leaves are stored as they are (bf16 allowed). Packed-weight leaves (``QuantizedTensor``,
``Sub1Tensor``, …) implement the storage protocol ``to_arrays() -> (arrays, meta)`` /
``cls.from_arrays(arrays, meta)``; ``meta["type"]`` names the class and is dispatched through
``moqe_jax.packed.packed_type`` (the registry, never unpickling). The manifest is written last, and the whole
directory is built under a temporary name and renamed into place, so a failed or killed save leaves
the previous checkpoint loadable (:func:`load` also recovers a save killed between its two renames).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import uuid
from typing import Any

import ml_dtypes
import numpy as np

from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError
from moqe_jax.packed import is_packed, packed_type
from moqe_jax.tree import flatten_params, unflatten_params

__all__ = ["load", "save_params", "load_params", "read_manifest", "disk_size", "MANIFEST", "write_safetensors",
           "read_safetensors"]

MANIFEST = "moqe_model.json"
FORMAT_VERSION = 1
SAFETENSORS_FILE = "model.safetensors"
ORBAX_DIR = "params"
_log = logging.getLogger(__name__)


def _dtype_name(dt: Any) -> str:
    return np.dtype(dt).name


def _np_dtype(name: str, where: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError as e:
        raise CheckpointError(f"{where}: unknown dtype {name!r}") from e


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x)


def _entries(params: dict) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Storage tensors ``{name: array}`` and per-leaf manifest entries."""
    tensors: dict[str, np.ndarray] = {}
    leaves: dict[str, dict] = {}
    for path, leaf in flatten_params(params).items():
        if leaf is None:
            leaves[path] = {"kind": "none"}
        elif is_packed(leaf):
            arrays, meta = leaf.to_arrays()
            meta = json.loads(json.dumps(meta))  # must be JSON-serialisable
            if "type" not in meta:
                raise CheckpointError(f"{path}: {type(leaf).__name__}.to_arrays() meta has no 'type'")
            fields = {}
            for name, a in arrays.items():
                if a is None:
                    continue
                if "/" in name or "::" in name:
                    raise CheckpointError(f"{path}: packed field name {name!r} contains '/' or '::'")
                a = _to_numpy(a)
                tensors[f"{path}::{name}"] = a
                fields[name] = {"shape": list(a.shape), "dtype": _dtype_name(a.dtype)}
            leaves[path] = {"kind": "packed", "type": meta["type"], "meta": meta, "fields": fields}
        else:
            a = _to_numpy(leaf)
            if a.dtype.hasobject:
                raise CheckpointError(f"{path}: cannot store a {type(leaf).__name__} leaf")
            tensors[path] = a
            leaves[path] = {"kind": "array", "shape": list(a.shape), "dtype": _dtype_name(a.dtype)}
    return tensors, leaves


def _rebuild(tensors: dict[str, Any], leaves: dict[str, dict], where: str) -> dict:
    flat: dict[str, Any] = {}
    for path, ent in leaves.items():
        kind = ent.get("kind")
        if kind == "none":
            flat[path] = None
        elif kind == "array":
            if path not in tensors:
                raise CheckpointError(f"{where}: tensor {path} listed in the manifest is missing")
            flat[path] = tensors[path]
        elif kind == "packed":
            arrays = {}
            for name in ent["fields"]:
                key = f"{path}::{name}"
                if key not in tensors:
                    raise CheckpointError(f"{where}: tensor {key} listed in the manifest is missing")
                arrays[name] = tensors[key]
            try:
                cls = packed_type(ent.get("type"))
            except KeyError as e:
                raise CheckpointError(f"{where}: {path}: {e.args[0]}") from None
            try:
                flat[path] = cls.from_arrays(arrays, ent["meta"])
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - the class validates its arrays
                msg = f"{where}: {path}: {ent.get('type')}.from_arrays failed: {e}"
                raise CheckpointError(msg.splitlines()[0]) from e
        else:
            raise CheckpointError(f"{where}: {path}: unknown manifest leaf kind {kind!r}")
    return unflatten_params(flat)


# ---- safetensors (own codec: bf16 without torch, explicit validation) ------------------------------

_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
              "uint8": "U8", "bool": "BOOL"}
_ST_NP = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write the safetensors format (8-byte LE header length, JSON header, raw little-endian data)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    names = sorted(tensors)
    for n in names:
        a = tensors[n]
        dn = _dtype_name(a.dtype)
        if dn not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {n} has dtype {dn}, not storable in safetensors")
        header[n] = {"dtype": _ST_DTYPES[dn], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n in names:
            a = np.ascontiguousarray(tensors[n])
            if a.dtype.byteorder == ">":
                a = a.byteswap().view(a.dtype.newbyteorder("<"))
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file (memory-mapped) -> ``(tensors, metadata)``; validates every offset."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing safetensors file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
    out = {}
    for name, ent in header.items():
        try:
            dt = _np_dtype(_ST_NP[ent["dtype"]], path)
            shape = tuple(int(s) for s in ent["shape"])
            b, e = (int(x) for x in ent["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: bad safetensors entry for {name} ({err!r})") from err
        if e - b != int(np.prod(shape, dtype=np.int64)) * dt.itemsize or b < 0 or base + e > size:
            raise CheckpointError(f"{path}: tensor {name} offsets [{b}, {e}) do not fit {dt.name}{list(shape)} "
                                  f"or the file size {size}")
        out[name] = np.asarray(data[base + b:base + e]).view(dt.newbyteorder("<") if dt.itemsize > 1 and
                                                              dt.kind != "V" else dt).reshape(shape)
    return out, meta


# ---- atomic directory replacement -------------------------------------------------------------------

def _fsync_tree(root: str) -> None:
    for d, _, files in os.walk(root):
        for fn in files:
            with open(os.path.join(d, fn), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _siblings(directory: str, tag: str) -> list[str]:
    parent, name = os.path.split(directory)
    pre = f".{name}.{tag}-"
    return [os.path.join(parent, e) for e in os.listdir(parent or ".") if e.startswith(pre)]


def _rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def _commit(tmp: str, directory: str) -> None:
    """Swap ``tmp`` into ``directory``: old -> .NAME.old-ID, tmp -> NAME, delete old."""
    parent = os.path.dirname(directory) or "."
    old = None
    if os.path.exists(directory):
        old = os.path.join(parent, f".{os.path.basename(directory)}.old-{uuid.uuid4().hex[:8]}")
        _rename(directory, old)
    _rename(tmp, directory)
    _fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---- public API ---------------------------------------------------------------------------------------

def save_params(params: dict, directory: str | os.PathLike, config: dict | None = None, format: str = "orbax",
                extra: dict | None = None) -> str:
    """Atomically write ``params`` (float and/or packed leaves) + manifest to ``directory``; return it."""
    if format not in ("orbax", "safetensors"):
        raise CheckpointError(f"unknown checkpoint format {format!r} (orbax or safetensors)")
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"{directory} exists and is not a directory")
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.exists(os.path.join(directory, MANIFEST)):
        raise CheckpointError(f"{directory} is a non-empty directory that is not a saved model; refusing to replace it")
    for stale in _siblings(directory, "tmp"):  # leftovers of killed saves
        shutil.rmtree(stale, ignore_errors=True)
    tensors, leaves = _entries(params)
    manifest = {"format_version": FORMAT_VERSION, "format": format, "config": config, "leaves": leaves,
                **(extra or {})}
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        if format == "safetensors":
            write_safetensors(os.path.join(tmp, SAFETENSORS_FILE), tensors,
                              {"format": "moqe", "moqe_manifest": json.dumps(manifest, sort_keys=True)})
        else:
            _orbax_save(os.path.join(tmp, ORBAX_DIR), tensors)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_tree(tmp)
        _commit(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _orbax_tree(tensors: dict[str, Any]) -> dict:
    """``{'a/b::f': x}`` -> nested dict (packed fields become a sub-dict of the leaf)."""
    return unflatten_params({k.replace("::", "/"): v for k, v in tensors.items()})


def _orbax_save(path: str, tensors: dict[str, np.ndarray]) -> None:
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=True, create=True))
    try:
        mngr.save(0, args=ocp.args.StandardSave(_orbax_tree(tensors)))
        mngr.wait_until_finished()
    finally:
        mngr.close()


def _orbax_restore(path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]], sharding: Any) -> dict[str, Any]:
    import jax
    import orbax.checkpoint as ocp

    if not specs:
        return {}
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"{path}: no Orbax checkpoint step found")
        if sharding is None:
            args = ocp.args.PyTreeRestore(restore_args=_orbax_tree(
                {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in specs}))
        else:
            def sds(name: str, shape: tuple[int, ...], dt: np.dtype) -> jax.ShapeDtypeStruct:
                sh = sharding(name, shape) if callable(sharding) else sharding
                return jax.ShapeDtypeStruct(shape, dt, sharding=sh)
            args = ocp.args.StandardRestore(_orbax_tree({k: sds(k, s, d) for k, (s, d) in specs.items()}))
        tree = mngr.restore(step, args=args)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged dir
        raise CheckpointError(f"{path}: Orbax restore failed ({type(e).__name__}: {e})".splitlines()[0]) from e
    finally:
        mngr.close()
    flat = {}
    for k in specs:
        node = tree
        for part in k.replace("::", "/").split("/"):
            node = node[part]
        flat[k] = node
    return flat


def _resolve_dir(directory: str) -> str:
    """The directory to load; recovers a save that was killed between its two renames."""
    if os.path.isfile(os.path.join(directory, MANIFEST)):
        return directory
    olds = [d for d in _siblings(directory, "old") if os.path.isfile(os.path.join(d, MANIFEST))] \
        if os.path.isdir(os.path.dirname(directory) or ".") else []
    if not os.path.exists(directory) and olds:
        _log.warning("%s: recovering the previous checkpoint %s left by an interrupted save", directory, olds[0])
        return max(olds, key=os.path.getmtime)
    if not os.path.exists(directory):
        raise CheckpointError(f"{directory}: no such saved model directory")
    raise CheckpointError(f"{directory}: not a saved moqe model (no {MANIFEST})")


def read_manifest(directory: str | os.PathLike) -> dict:
    """The JSON manifest: ``format``, ``config`` (SwitchConfig dict), ``leaves`` (per-leaf kind/shape/dtype/meta)."""
    d = _resolve_dir(os.path.abspath(os.fspath(directory)))
    fn = os.path.join(d, MANIFEST)
    try:
        with open(fn, encoding="utf-8") as f:
            man = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{fn}: corrupt JSON ({e})") from e
    if not isinstance(man, dict) or man.get("format_version") != FORMAT_VERSION or "leaves" not in man:
        raise CheckpointError(f"{fn}: unsupported manifest (format_version {man.get('format_version')!r})")
    man["_dir"] = d
    return man


def load_params(directory: str | os.PathLike, sharding: Any = None) -> tuple[dict, dict]:
    """``(params, manifest)``. ``sharding``: None (NumPy arrays), a ``jax.sharding.Sharding`` for every
    tensor, or ``fn(name, shape) -> Sharding`` (Orbax sharded restore; safetensors is placed after reading)."""
    man = read_manifest(directory)
    d = man["_dir"]
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for path, ent in man["leaves"].items():
        if ent.get("kind") == "array":
            specs[path] = (tuple(ent["shape"]), _np_dtype(ent["dtype"], path))
        elif ent.get("kind") == "packed":
            for name, f in ent["fields"].items():
                specs[f"{path}::{name}"] = (tuple(f["shape"]), _np_dtype(f["dtype"], f"{path}::{name}"))
    if man["format"] == "safetensors":
        tensors, _ = read_safetensors(os.path.join(d, SAFETENSORS_FILE))
        for k, (shape, dt) in specs.items():
            if k in tensors and (tensors[k].shape != shape or tensors[k].dtype != dt):
                raise CheckpointError(f"{d}: tensor {k} is {tensors[k].dtype}{list(tensors[k].shape)}, manifest says "
                                      f"{dt}{list(shape)}")
        if sharding is not None:
            import jax

            tensors = {k: jax.device_put(v, sharding(k, v.shape) if callable(sharding) else sharding)
                       for k, v in tensors.items()}
    elif man["format"] == "orbax":
        tensors = _orbax_restore(os.path.join(d, ORBAX_DIR), specs, sharding)
    else:
        raise CheckpointError(f"{d}: unknown storage format {man['format']!r}")
    return _rebuild(tensors, man["leaves"], d), man


def load(directory: str | os.PathLike, sharding: Any = None) -> tuple[SwitchConfig, dict]:
    """``(config, params)`` of a directory written by :func:`save_params` with a config (bit-exact);
    ``sharding`` as in :func:`load_params`."""
    params, man = load_params(directory, sharding)
    if not isinstance(man.get("config"), dict):
        raise CheckpointError(f"{man['_dir']}: manifest has no model config")
    try:
        cfg = SwitchConfig.from_dict(man["config"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{man['_dir']}: bad config in {MANIFEST}: {e}".splitlines()[0]) from e
    return cfg, params


def disk_size(directory: str | os.PathLike) -> int:
    """True bytes on disk of a saved model (sum of the sizes of every file under the directory)."""
    d = os.fspath(directory)
    if os.path.isfile(d):
        return os.path.getsize(d)
    with contextlib.suppress(CheckpointError):
        d = _resolve_dir(os.path.abspath(d))
    total = 0
    for root, _, files in os.walk(d):
        for fn in files:
            p = os.path.join(root, fn)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total
