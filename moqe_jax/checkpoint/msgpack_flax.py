"""Flax ``serialization`` msgpack codec, reimplemented so every branch is explicit (docs/T5X_SWITCH.md §1.2).

Ext types: 1 = ndarray, 2 = native complex, 3 = numpy scalar. Types 1 and 3 carry a msgpack
``[shape, dtype_name, raw_bytes]`` payload (C order, little endian; ``bfloat16`` via ml_dtypes).
Arrays above 2**30 bytes are stored as ``{'__msgpack_chunked_array__': True, 'shape': {...},
'chunks': {...}}`` maps of flat ext-1 chunks; :func:`unpackb` reassembles them.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import msgpack
import numpy as np

from moqe_jax.errors import CheckpointError

__all__ = ["unpackb", "packb", "chunk_array", "EXT_NDARRAY", "EXT_COMPLEX", "EXT_SCALAR", "CHUNKED_KEY",
           "MAX_CHUNK_BYTES"]

EXT_NDARRAY = 1
EXT_COMPLEX = 2
EXT_SCALAR = 3
CHUNKED_KEY = "__msgpack_chunked_array__"
MAX_CHUNK_BYTES = 2**30  # flax: arrays larger than this are chunked


def _dtype_from_name(name: Any, where: str) -> np.dtype:
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dt = np.dtype(name)
    except TypeError as e:
        raise CheckpointError(f"{where}: unknown array dtype {name!r} in msgpack ndarray") from e
    if dt.hasobject:
        raise CheckpointError(f"{where}: object dtype {name!r} is not allowed in a checkpoint")
    return dt


def _ndarray_from_payload(data: bytes, where: str) -> np.ndarray:
    try:
        shape, dtype_name, buf = msgpack.unpackb(data, raw=True)
    except Exception as e:  # noqa: BLE001 - any decoding problem is a corrupt file
        raise CheckpointError(f"{where}: corrupt ndarray payload in msgpack ({type(e).__name__})") from e
    dt = _dtype_from_name(dtype_name, where)
    shape = tuple(int(s) for s in shape)
    want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(buf) != want:
        raise CheckpointError(f"{where}: ndarray payload has {len(buf)} bytes, "
                              f"expected {want} for {dt.name}{list(shape)}")
    # copy: the msgpack buffer is read-only and would keep the whole file alive
    return np.frombuffer(buf, dtype=dt).reshape(shape, order="C").copy()


def _make_ext_hook(where: str):
    def hook(code: int, data: bytes) -> Any:
        if code == EXT_NDARRAY:
            return _ndarray_from_payload(data, where)
        if code == EXT_SCALAR:
            return _ndarray_from_payload(data, where)[()]
        if code == EXT_COMPLEX:
            try:
                re, im = msgpack.unpackb(data)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{where}: corrupt complex payload in msgpack") from e
            return complex(re, im)
        raise CheckpointError(f"{where}: unknown msgpack ext type {code}")
    return hook


def _unchunk(tree: Any, where: str) -> Any:
    """Reassemble ``__msgpack_chunked_array__`` leaves (flax ``_unchunk_array_leaves_in_place``)."""
    if isinstance(tree, dict):
        if tree.get(CHUNKED_KEY) is True:
            try:
                shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
                chunks = [np.asarray(tree["chunks"][str(i)]).reshape(-1) for i in range(len(tree["chunks"]))]
            except (KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{where}: malformed {CHUNKED_KEY} leaf ({e!r})") from e
            flat = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
            if flat.size != int(np.prod(shape, dtype=np.int64)):
                raise CheckpointError(f"{where}: chunked array has {flat.size} elements, shape {list(shape)}")
            return flat.reshape(shape)
        return {k: _unchunk(v, where) for k, v in tree.items()}
    return tree


def unpackb(data: bytes, where: str = "msgpack") -> Any:
    """Decode a flax msgpack byte string into nested dicts of numpy arrays / scalars / spec dicts."""
    try:
        tree = msgpack.unpackb(data, ext_hook=_make_ext_hook(where), raw=False, strict_map_key=False)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - OutOfData, ExtraData, FormatError, ValueError ...
        raise CheckpointError(f"{where}: not a valid msgpack file ({type(e).__name__}: {e})".splitlines()[0]) from e
    return _unchunk(tree, where)


# ---- encoding (fixture writer) -------------------------------------------------------------------

def _ndarray_payload(arr: np.ndarray) -> bytes:
    if arr.dtype.hasobject:
        raise ValueError("object arrays cannot be serialised")
    return msgpack.packb((list(arr.shape), arr.dtype.name, arr.tobytes("C")), use_bin_type=True)


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, complex):
        return msgpack.ExtType(EXT_COMPLEX, msgpack.packb((obj.real, obj.imag)))
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(EXT_NDARRAY, _ndarray_payload(obj))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(EXT_SCALAR, _ndarray_payload(np.asarray(obj)))
    if hasattr(obj, "__array__"):  # jax arrays
        return msgpack.ExtType(EXT_NDARRAY, _ndarray_payload(np.asarray(obj)))
    raise TypeError(f"cannot msgpack-serialise {type(obj).__name__}")


def chunk_array(arr: np.ndarray, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> dict:
    """Flax's chunked form of a large array (``max_chunk_bytes`` lowered in tests to force it)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    per = max(1, max_chunk_bytes // max(1, arr.dtype.itemsize))
    chunks = {str(i): flat[s:s + per] for i, s in enumerate(range(0, max(flat.size, 1), per))}
    return {CHUNKED_KEY: True, "shape": {str(i): int(d) for i, d in enumerate(arr.shape)}, "chunks": chunks}


def packb(tree: Any) -> bytes:
    """Encode nested dicts of arrays/scalars like ``flax.serialization.msgpack_serialize``."""
    return msgpack.packb(tree, default=_default, strict_types=True, use_bin_type=True)
