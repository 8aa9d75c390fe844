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
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import stat
import uuid
import warnings
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError
from moqe_jax.packed import is_packed, packed_type
from moqe_jax.tree import flatten_params, unflatten_params

__all__ = ["load", "save_params", "load_params", "read_manifest", "disk_size", "MANIFEST", "write_safetensors",
           "read_safetensors", "check_params", "warn_nonfinite", "NonFiniteWeightsWarning"]

MANIFEST = "moqe_model.json"
FORMAT_VERSION = 1
SAFETENSORS_FILE = "model.safetensors"
ORBAX_DIR = "params"
_OWN = frozenset({MANIFEST, SAFETENSORS_FILE, ORBAX_DIR})  # what a save writes; anything else is the user's
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


def _crc32(a: np.ndarray) -> int:
    """CRC-32 of an array's little-endian C-order bytes (the bytes the store writes)."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.byteswap().view(a.dtype.newbyteorder("<"))
    return zlib.crc32(a.reshape(-1).view(np.uint8).data)


def _manifest_digest(man: dict) -> str:
    """sha256 of the manifest's canonical JSON (without its ``checksums`` entry and private ``_`` keys)."""
    body = {k: v for k, v in man.items() if k != "checksums" and not k.startswith("_")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
                fields[name] = {"shape": list(a.shape), "dtype": _dtype_name(a.dtype), "crc32": _crc32(a)}
            leaves[path] = {"kind": "packed", "type": meta["type"], "meta": meta, "fields": fields}
        else:
            a = _to_numpy(leaf)
            if a.dtype.hasobject:
                raise CheckpointError(f"{path}: cannot store a {type(leaf).__name__} leaf")
            tensors[path] = a
            leaves[path] = {"kind": "array", "shape": list(a.shape), "dtype": _dtype_name(a.dtype), "crc32": _crc32(a)}
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
                cls: Any = packed_type(str(ent.get("type")))
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


# ---- safetensors (through the safetensors library; bf16 via ml_dtypes) ------------------------------

# dtypes the store writes (the library also knows float8/complex64, which its NumPy reader cannot return)
_ST_STORABLE = frozenset({"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                          "uint64", "uint32", "uint16", "uint8", "bool"})
# the library's header errors -> what they mean for the user (first match wins; else its own words)
_ST_ERRORS = (
    ("invalid offset", "tensor data offsets overlap another tensor or leave a gap (they must be contiguous)"),
    ("invalid shape, data type, or offset", "a tensor's data offsets do not fit its dtype and shape"),
    ("not fully covered", "the tensor data offsets do not fit the file size (truncated file or trailing bytes)"),
    ("header too small", "truncated safetensors file (no header)"),
    ("invalid header length", "truncated safetensors file (header length exceeds the file)"),
    ("too large", "safetensors header length exceeds the 100 MB limit"),
    ("invalid json", "bad safetensors entry: each tensor needs a known dtype, a shape of non-negative integers "
                     "and data_offsets [begin, end]; __metadata__ maps strings to strings"),
)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def _no_space(e: BaseException | None, depth: int = 0) -> bool:
    """``e`` or an exception it wraps (cause, context, exception group) is ENOSPC."""
    if e is None or depth > 20:
        return False
    if getattr(e, "errno", None) == errno.ENOSPC or "no space left" in str(e).lower():
        return True
    return any(_no_space(c, depth + 1) for c in (e.__cause__, e.__context__, *getattr(e, "exceptions", ())))


def _save_failed(directory: str, what: str, e: BaseException) -> str:
    """One line for a save that failed before its commit: the cause, what is left, the fix."""
    fix = ("no space left on the device: free disk space and save again" if _no_space(e)
           else "check free space and permissions and save again")
    kept = "the previous model is unchanged" if _complete(directory) else "nothing was written"
    return f"{directory}: {what} failed ({_one_line(e)}); {kept}; {fix}"


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` with ``safetensors.numpy.save_file`` (little-endian, bf16 as BF16) and fsync it."""
    for n, a in tensors.items():
        if _dtype_name(a.dtype) not in _ST_STORABLE:
            raise CheckpointError(f"{path}: tensor {n} has dtype {_dtype_name(a.dtype)}, not storable in safetensors")
    from safetensors.numpy import save_file

    meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    try:  # save_file reads each array's raw buffer: it must be C-contiguous
        save_file({n: np.require(a, requirements="C") for n, a in tensors.items()}, path, metadata=meta)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except Exception as e:  # noqa: BLE001 - SafetensorError / OSError (ENOSPC, EACCES, ...)
        fix = "free disk space and save again" if _no_space(e) else "check the path and permissions"
        raise CheckpointError(f"{path}: cannot write safetensors file ({_one_line(e)}); {fix}") from e


def read_safetensors(path: str, mmap: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file -> ``(tensors, metadata)`` through ``safetensors.safe_open``, which validates
    the header (known dtypes, non-negative dims, offsets that match each tensor's size and tile the data
    section exactly). A FIFO or device is refused before opening (it would hang); errors are one line.
    ``mmap``: the tensors are read-only memory-mapped views of the file (no copy; the file must not be
    rewritten in place while they live — the store's saves replace directories, never files in place);
    ``False``: copies."""
    from safetensors import safe_open

    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing safetensors file") from e
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file")
    try:
        with safe_open(path, framework="numpy") as f:  # validates the header before anything is mapped
            meta = dict(f.metadata() or {})
            if not mmap:
                return {k: f.get_tensor(k) for k in f.offset_keys()}, meta
            return _mapped(f, path), meta
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
        lib = _one_line(e)
        why = next((w for key, w in _ST_ERRORS if key in lib.lower()), "corrupt safetensors file")
        raise CheckpointError(f"{path}: {why} ({lib}); re-save or re-download the file") from e


# safetensors dtype tags (the format's header) -> NumPy dtypes
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
              "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def _mapped(f: Any, path: str) -> dict[str, np.ndarray]:
    """Read-only memory-mapped views of an open (library-validated) safetensors file. The library cannot give
    them: ``get_tensor`` / ``safetensors.numpy.load_file`` copy every tensor (either backend) and no byte
    offsets are exposed. Its checks make them derivable: the tensors tile the data section in
    ``offset_keys()`` order up to the end of the file, so the offsets follow from the dtypes and shapes it
    parsed (little-endian data)."""
    specs = [(k, np.dtype(_ST_DTYPES[f.get_slice(k).get_dtype()]), tuple(f.get_slice(k).get_shape()))
             for k in f.offset_keys()]
    sizes = [dt.itemsize * math.prod(shape) for _, dt, shape in specs]
    start = os.path.getsize(path) - sum(sizes)
    data = np.memmap(path, np.uint8, "r", offset=start) if sum(sizes) else np.zeros(0, np.uint8)
    ends = itertools.accumulate(sizes)
    return {k: data[e - n:e].view(dt.newbyteorder("<")).reshape(shape)
            for (k, dt, shape), n, e in zip(specs, sizes, ends, strict=True)}


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
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return []
    return [os.path.join(parent, e) for e in entries if e.startswith(pre)]


def _complete(d: str) -> bool:
    """A save writes its manifest last (before the renames): a directory with one holds a whole model."""
    return os.path.isfile(os.path.join(d, MANIFEST))


def _newest_first(dirs: list[str]) -> list[str]:
    def mtime(d: str) -> float:
        try:
            return os.path.getmtime(d)
        except OSError:
            return 0.0
    return sorted(dirs, key=mtime, reverse=True)


def _leftovers(directory: str) -> list[str]:
    """Complete models left beside ``directory`` by a save killed between its renames: the new one (tmp)
    first, then the previous one (old)."""
    return [d for tag in ("tmp", "old") for d in _newest_first(_siblings(directory, tag)) if _complete(d)]


def _recover(directory: str) -> str | None:
    """If ``directory`` is missing but a killed save left a complete model beside it, rename it back into
    place and return ``directory``; if the parent is read-only, return the leftover itself. None otherwise."""
    if os.path.lexists(directory):
        return None
    for cand in _leftovers(directory):
        try:
            os.rename(cand, directory)
        except OSError:
            _log.warning("%s: reading the copy %s left by an interrupted save", directory, cand)
            return cand
        with contextlib.suppress(OSError):
            _fsync_dir(os.path.dirname(directory) or ".")
        _log.warning("%s: recovered from %s, left by an interrupted save", directory, os.path.basename(cand))
        return directory
    return None


def _cleanup(directory: str, keep: str | None = None) -> None:
    """Remove the hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` leftovers of earlier (killed) saves."""
    for d in _siblings(directory, "tmp") + _siblings(directory, "old"):
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)


def _rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def _commit(tmp: str, directory: str) -> None:
    """Swap ``tmp`` into ``directory``: old -> .NAME.old-ID, tmp -> NAME, delete old.

    A kill between the two renames leaves NAME missing and both complete copies beside it; the next load or
    save renames the newer one back (:func:`_recover`)."""
    parent = os.path.dirname(directory) or "."
    old = None
    if os.path.exists(directory):
        old = os.path.join(parent, f".{os.path.basename(directory)}.old-{uuid.uuid4().hex[:8]}")
        try:
            _rename(directory, old)
        except OSError as e:  # nothing moved yet: the previous model is in place
            raise CheckpointError(_save_failed(directory, "moving the previous model aside", e)) from e
    try:
        _rename(tmp, directory)
    except Exception as e:
        if old:  # put the previous model back (a kill here is recovered by _recover instead)
            with contextlib.suppress(OSError):
                _rename(old, directory)
        if isinstance(e, OSError):
            raise CheckpointError(_save_failed(directory, "renaming the new model into place", e)) from e
        raise
    _fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _copy_user_files(directory: str, tmp: str) -> None:
    """Copy what the user keeps in ``directory`` (anything a save does not write, e.g. ``tokenizer/``) into
    the new model directory ``tmp``, so replacing the model never deletes it."""
    for e in os.listdir(directory):
        if e in _OWN:
            continue
        src, dst = os.path.join(directory, e), os.path.join(tmp, e)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)


# ---- public API ---------------------------------------------------------------------------------------

def save_params(params: dict, directory: str | os.PathLike, config: dict | None = None, format: str = "orbax",
                extra: dict | None = None, overwrite: bool = False) -> str:
    """Atomically write ``params`` (float and/or packed leaves) + manifest to ``directory``; return it.

    Re-saving over a saved model replaces the files the store writes (``moqe_model.json``, ``params/``,
    ``model.safetensors``) and keeps every other file in the directory (e.g. ``tokenizer/``). A non-empty
    directory that is not a saved model is refused unless ``overwrite=True`` (its files are then kept too)."""
    if format not in ("orbax", "safetensors"):
        raise CheckpointError(f"unknown checkpoint format {format!r} (orbax or safetensors)")
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    _recover(directory)  # a previous save killed between its renames
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"{directory} exists and is not a directory")
    if os.path.isdir(directory) and os.listdir(directory) and not _complete(directory) and not overwrite:
        raise CheckpointError(f"{directory} is a non-empty directory that is not a saved model; refusing to replace "
                              "it (pass overwrite=True / --overwrite to write the model into it; its files are kept)")
    _cleanup(directory)  # leftovers of killed saves (the model in place is complete)
    tensors, leaves = _entries(params)
    manifest = {"format_version": FORMAT_VERSION, "format": format, "config": config, "leaves": leaves,
                **(extra or {})}
    manifest["checksums"] = {"manifest_sha256": _manifest_digest(manifest)}
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        if format == "safetensors":
            write_safetensors(os.path.join(tmp, SAFETENSORS_FILE), tensors,
                              {"format": "moqe", "moqe_manifest": json.dumps(manifest, sort_keys=True)})
        else:
            _orbax_save(os.path.join(tmp, ORBAX_DIR), tensors, directory)
        try:
            if os.path.isdir(directory):
                _copy_user_files(directory, tmp)
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:  # last: marks tmp complete
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            _fsync_tree(tmp)
        except OSError as e:  # only the temporary directory was written so far
            raise CheckpointError(_save_failed(directory, "save", e)) from e
        _commit(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt) and not os.path.exists(tmp):
            _log.warning("%s: save interrupted; %s; rerun the save", directory,
                         "the previous model is unchanged" if _complete(directory) else "nothing was written")
        raise
    return directory


def _orbax_tree(tensors: dict[str, Any]) -> dict:
    """``{'a/b::f': x}`` -> nested dict (packed fields become a sub-dict of the leaf)."""
    return unflatten_params({k.replace("::", "/"): v for k, v in tensors.items()})


def _orbax_save(path: str, tensors: dict[str, np.ndarray], directory: str) -> None:
    """Orbax save of ``tensors`` into ``path`` (inside the save's temporary directory). A failure (a full disk
    is an OSError, often wrapped by Orbax's writer threads) is one CheckpointError naming ``directory``;
    KeyboardInterrupt propagates (the caller removes the temporary directory, the previous model stays)."""
    import orbax.checkpoint as ocp

    try:
        mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, enable_async_checkpointing=True, create=True))
        try:
            mngr.save(0, args=ocp.args.StandardSave(_orbax_tree(tensors)))
            mngr.wait_until_finished()
        finally:
            mngr.close()  # waits for the writer threads, so nothing writes into the directory afterwards
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax raises OSError or wraps it (ExceptionGroup, ValueError, ...)
        raise CheckpointError(_save_failed(directory, "Orbax save", e)) from e


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
    if _complete(directory):
        return directory
    rec = _recover(directory)
    if rec is not None:
        return rec
    if not os.path.exists(directory):
        raise CheckpointError(f"{directory}: no such saved model directory")
    raise CheckpointError(f"{directory}: not a saved moqe model (no {MANIFEST})")


def _shape(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v)


def _check_manifest(man: Any, fn: str) -> None:
    """The manifest validated as data (types and ranges) with one-line errors naming the file."""
    if not isinstance(man, dict):
        raise CheckpointError(f"{fn}: the manifest must be a JSON object, got a {type(man).__name__}")
    if man.get("format_version") != FORMAT_VERSION or "leaves" not in man:
        raise CheckpointError(f"{fn}: unsupported manifest (format_version {man.get('format_version')!r})")
    if man.get("format") not in ("orbax", "safetensors"):
        raise CheckpointError(f"{fn}: unknown storage format {man.get('format')!r} (orbax or safetensors)")
    if man.get("config") is not None and not isinstance(man["config"], dict):
        raise CheckpointError(f"{fn}: 'config' must be a JSON object")
    if not isinstance(man["leaves"], dict):
        raise CheckpointError(f"{fn}: 'leaves' must be a JSON object")

    def tensor(ent: Any, what: str) -> None:
        if not isinstance(ent, dict) or not _shape(ent.get("shape")) or not isinstance(ent.get("dtype"), str):
            raise CheckpointError(f"{fn}: {what}: needs 'shape' (list of non-negative integers) and 'dtype'")
        _np_dtype(ent["dtype"], f"{fn}: {what}")
        crc = ent.get("crc32")
        if crc is not None and (not isinstance(crc, int) or isinstance(crc, bool)):
            raise CheckpointError(f"{fn}: {what}: 'crc32' must be an integer")

    for path, ent in man["leaves"].items():
        if not isinstance(ent, dict):
            raise CheckpointError(f"{fn}: leaf {path}: expected a JSON object, got a {type(ent).__name__}")
        kind = ent.get("kind")
        if kind == "array":
            tensor(ent, f"leaf {path}")
        elif kind == "packed":
            if not isinstance(ent.get("type"), str) or not isinstance(ent.get("meta"), dict) \
                    or not isinstance(ent.get("fields"), dict):
                raise CheckpointError(f"{fn}: leaf {path}: a packed leaf needs 'type', 'meta' and 'fields'")
            for name, f in ent["fields"].items():
                tensor(f, f"leaf {path}::{name}")
        elif kind != "none":
            raise CheckpointError(f"{fn}: leaf {path}: unknown manifest leaf kind {kind!r}")
    sums = man.get("checksums")
    if sums is not None and (not isinstance(sums, dict) or not isinstance(sums.get("manifest_sha256"), str)):
        raise CheckpointError(f"{fn}: 'checksums' must be an object with 'manifest_sha256'")


def _check_digest(man: dict) -> None:
    sums = man.get("checksums")
    if sums is not None and sums["manifest_sha256"] != _manifest_digest(man):
        raise CheckpointError(f"{os.path.join(man['_dir'], MANIFEST)}: manifest checksum mismatch: the manifest was "
                              "edited or is corrupt (re-save the model from its source)")


def read_manifest(directory: str | os.PathLike) -> dict:
    """The JSON manifest: ``format``, ``config`` (SwitchConfig dict), ``leaves`` (per-leaf kind/shape/dtype/meta)."""
    d = _resolve_dir(os.path.abspath(os.fspath(directory)))
    fn = os.path.join(d, MANIFEST)
    try:
        with open(fn, encoding="utf-8") as f:
            man = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{fn}: corrupt JSON ({e})".splitlines()[0]) from e
    _check_manifest(man, fn)
    man["_dir"] = d
    return man


def _host_crc(t: Any) -> int | None:
    """CRC-32 of a tensor's bytes: NumPy arrays directly, a restored ``jax.Array`` that this process holds
    whole (one process, any sharding) through one host copy; None for a multi-process array (not checked)."""
    if isinstance(t, np.ndarray):
        return _crc32(t)
    if getattr(t, "is_fully_addressable", False):
        return _crc32(np.asarray(t))
    return None


def _verify(tensors: dict[str, Any], man: dict) -> None:
    """Each tensor against its manifest entry: shape, dtype and (when stored) CRC-32 of its bytes."""
    d = man["_dir"]
    for path, ent in man["leaves"].items():
        kind = ent.get("kind")
        items = [(path, ent)] if kind == "array" else \
            [(f"{path}::{n}", f) for n, f in ent["fields"].items()] if kind == "packed" else []
        for key, e in items:
            t = tensors.get(key)
            if t is None:
                continue  # reported by _rebuild
            want_dt = _np_dtype(e["dtype"], key)
            if tuple(t.shape) != tuple(e["shape"]) or np.dtype(t.dtype) != want_dt:
                raise CheckpointError(f"{d}: tensor {key} is {np.dtype(t.dtype).name}{list(t.shape)}, the manifest "
                                      f"says {want_dt.name}{list(e['shape'])} (dtype or shape relabelled)")
            if e.get("crc32") is not None and _host_crc(t) not in (None, e["crc32"]):
                raise CheckpointError(f"{d}: tensor {key} fails its checksum (bit rot or an edited file); "
                                      "re-save or re-download the model")


def load_params(directory: str | os.PathLike, sharding: Any = None) -> tuple[dict, dict]:
    """``(params, manifest)``. ``sharding``: None (NumPy arrays), a ``jax.sharding.Sharding`` for every
    tensor, or ``fn(name, shape) -> Sharding`` (Orbax sharded restore; safetensors is placed after reading).

    Every tensor is checked against the manifest (shape, dtype, and the CRC-32 of its bytes when the manifest
    has one; a sharded restore checks it too when this process holds every shard, not across processes)."""
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
        _verify(tensors, man)
        if sharding is not None:
            import jax

            tensors = {k: jax.device_put(v, sharding(k, v.shape) if callable(sharding) else sharding)
                       for k, v in tensors.items()}
    else:
        tensors = _orbax_restore(os.path.join(d, ORBAX_DIR), specs, sharding)
        _verify(tensors, man)
    params = _rebuild(tensors, man["leaves"], d)
    _check_digest(man)
    return params, man


class NonFiniteWeightsWarning(UserWarning):
    """A loaded model has NaN/inf weights (it will produce NaN logits)."""


NONFINITE_MODES = ("warn", "error", "ignore")


def warn_nonfinite(params: dict, where: str, mode: str = "warn") -> list[str]:
    """Warn (:class:`NonFiniteWeightsWarning`) naming the float tensors (packed: their float fields) that hold
    NaN/inf; returns their paths. ``mode="error"``: a :class:`CheckpointError` instead (the opt-in strict
    load); ``"ignore"``: no check at all (skips the scan of every weight)."""
    if mode not in NONFINITE_MODES:
        raise CheckpointError(f"nonfinite={mode!r}: expected one of {', '.join(NONFINITE_MODES)}")
    if mode == "ignore":
        return []
    bad = []
    for path, leaf in flatten_params(params).items():
        if leaf is None:
            continue
        arrays = leaf.to_arrays()[0] if is_packed(leaf) else {"": leaf}
        for name, a in arrays.items():
            if a is None or not np.issubdtype(np.dtype(a.dtype), np.inexact) and np.dtype(a.dtype).kind != "V":
                continue
            if not bool(np.all(np.isfinite(np.asarray(a, np.float32)))):
                bad.append(f"{path}::{name}" if name else path)
    if bad:
        names = ", ".join(ascii(b)[1:-1] for b in bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        if mode == "error":
            raise CheckpointError(f"{where}: non-finite values (NaN/inf) in {len(bad)} tensor(s): {names}; "
                                  "refusing to load (nonfinite='error')")
        warnings.warn(f"{where}: non-finite values (NaN/inf) in {len(bad)} tensor(s): {names}; the model's outputs "
                      "will be NaN", NonFiniteWeightsWarning, stacklevel=3)
    return bad


def check_params(cfg: SwitchConfig, params: dict, where: str) -> None:
    """``params`` against the shapes ``cfg`` implies (``param_shapes``) and float dtypes for float leaves."""
    from moqe_jax.model.api import param_shapes

    want = param_shapes(cfg)
    flat = {k: v for k, v in flatten_params(params).items() if v is not None}
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        n = len(missing) + len(extra)
        raise CheckpointError(f"{where}: parameters do not match the config ({what}"
                              f"{f' and {n - 1} more' if n > 1 else ''})")
    for k, shape in want.items():
        leaf = flat[k]
        if tuple(leaf.shape) != tuple(shape):
            raise CheckpointError(f"{where}: {k} has shape {list(leaf.shape)}, the config implies {list(shape)} "
                                  "(the config does not match the weights)")
        if not is_packed(leaf):
            dt = np.dtype(leaf.dtype)
            if not (np.issubdtype(dt, np.floating) or dt == np.dtype(ml_dtypes.bfloat16)):
                raise CheckpointError(f"{where}: {k} has dtype {dt.name}; float weights expected")


def load(directory: str | os.PathLike, sharding: Any = None, nonfinite: str = "warn") -> tuple[SwitchConfig, dict]:
    """``(config, params)`` of a directory written by :func:`save_params` with a config (bit-exact);
    ``sharding`` as in :func:`load_params`. The params are checked against the config (shapes, dtypes) and
    non-finite weights are warned about (:func:`warn_nonfinite`; ``nonfinite`` is its mode)."""
    params, man = load_params(directory, sharding)
    if not isinstance(man.get("config"), dict):
        raise CheckpointError(f"{man['_dir']}: manifest has no model config")
    try:
        cfg = SwitchConfig.from_dict(man["config"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{man['_dir']}: bad config in {MANIFEST}: {e}".splitlines()[0]) from e
    check_params(cfg, params, man["_dir"])
    warn_nonfinite(params, man["_dir"], nonfinite)
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
