"""Write legacy T5X checkpoints exactly as T5X lays them out (docs/T5X_SWITCH.md §1.10): test fixtures and export.

``checkpoint_<step>/checkpoint`` = flax msgpack ``{'version': 3, 'optimizer': {'state': {'step': int32,
'param_states': {}}, 'target': <tensorstore spec dicts>}}`` and one zarr v2 directory
``target.<dotted.path>/`` per array, written with tensorstore (gzip by default; zlib, zstd, blosc; chosen
chunk shapes, padded edge chunks); the msgpack file with ``flax.serialization``. Options emit every leaf form
a reader must handle: inline ext-1 arrays, legacy top-level ``path`` specs, ``gcs`` specs with the dummy
bucket, ``gfile`` specs, ``__msgpack_chunked_array__`` leaves, missing chunk files. The step directory is
written as ``checkpoint_<step>.tmp-<time>`` and renamed at the end (like T5X).

:func:`write_orbax_t5x` writes the same parameters as an Orbax-format T5X step with orbax-checkpoint
(``ocdbt``, per-parameter ``zarr`` dirs with ``_METADATA``, or the 2023 ``placeholder`` layout).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from moqe_jax.checkpoint.zarr import write_zarr
from moqe_jax.errors import CheckpointError
from moqe_jax.packed import is_packed
from moqe_jax.progress import progress as progress_bar
from moqe_jax.tree import flatten_params, unflatten_params

__all__ = ["write_t5x_checkpoint", "export_t5x", "t5x_chunk_shape", "odd_chunk_shape"]

_TARGET_BYTES = 64 * 2**20  # T5X: _DESIRED_CHUNK_SIZE_BYTES


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else [1]


def t5x_chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """T5X ``_choose_chunk_shape``: shrink the largest dim to its next divisor until ≤ 64 MiB (§1.6)."""
    target = max(1, _TARGET_BYTES // itemsize)
    factors = [_divisors(d) for d in shape]
    while math.prod(f[-1] for f in factors) > target:
        i = max(range(len(shape)), key=lambda j: (factors[j][-1], -j))
        factors[i].pop()
    return tuple(f[-1] for f in factors)


def odd_chunk_shape(shape: tuple[int, ...], itemsize: int = 4) -> tuple[int, ...]:
    """Chunk shapes that do not divide the array, so edge chunks are padded (reader tests)."""
    return tuple(n if n <= 2 else n // 2 + 1 for n in shape)


def chunked(arr: np.ndarray, max_chunk_bytes: int) -> dict:
    """Flax's ``__msgpack_chunked_array__`` form of ``arr`` (flax uses it above 1 GiB; tests force it small)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    per = max(1, max_chunk_bytes // max(1, arr.dtype.itemsize))
    chunks = {str(i): flat[s:s + per] for i, s in enumerate(range(0, max(flat.size, 1), per))}
    return {"__msgpack_chunked_array__": True, "shape": {str(i): int(d) for i, d in enumerate(arr.shape)},
            "chunks": chunks}


def _spec(rel: str, arr: np.ndarray, chunks: tuple[int, ...], form: str, compressor: dict | None) -> dict:
    dname = "bfloat16" if arr.dtype.name == "bfloat16" else arr.dtype.name
    meta = {"chunks": list(chunks), "compressor": compressor, "shape": list(arr.shape)}
    spec: dict[str, Any] = {"driver": "zarr", "dtype": dname, "metadata": meta}
    if form == "file":
        spec["kvstore"] = {"driver": "file", "path": rel + "/"}
    elif form == "gfile":
        spec["kvstore"] = {"driver": "gfile", "path": rel + "/"}
    elif form == "gcs":
        spec["kvstore"] = {"bucket": "t5x-dummy-bucket", "driver": "gcs", "path": rel + "/"}
    elif form == "legacy":  # tensorstore < 0.1.14: path at the top level of the spec
        spec["kvstore"] = {"driver": "file"}
        spec["path"] = rel + "/"
    else:
        raise ValueError(f"unknown spec form {form!r}")
    return spec


def write_t5x_checkpoint(
    directory: str,
    params: dict[str, Any] | Iterable[tuple[str, Any]],
    step: int = 1,
    *,
    chunks: str | dict[str, tuple[int, ...]] | Callable[[str, np.ndarray], tuple[int, ...]] = "t5x",
    dtype: Any = None,
    dtypes: dict[str, Any] | None = None,
    inline: Iterable[str] = (),
    legacy_path: Iterable[str] = (),
    gcs: Iterable[str] = (),
    gfile: Iterable[str] = (),
    chunked_array: Iterable[str] = (),
    chunked_array_bytes: int = 64,
    skip_chunks: dict[str, set[tuple[int, ...]]] | None = None,
    compressor: str | None = "gzip",
    fill_value: float | None = None,
    version: int = 3,
    spec_hook: Callable[[str, dict], dict] | None = None,
    progress: bool = False,
) -> str:
    """Write ``params`` as ``directory/checkpoint_<step>``; return that directory.

    ``params``: a nested or ``'a/b'``-flat dict of arrays, or an iterable of ``(path, array)`` pairs.

    Args:
      chunks: ``"t5x"`` (T5X's 64 MiB rule), ``"odd"`` (non-dividing chunks), a per-path dict or a function.
      dtype / dtypes: on-disk dtype for all / some arrays (e.g. ``ml_dtypes.bfloat16``); default: as given.
      inline, legacy_path, gcs, gfile, chunked_array: paths stored in those leaf forms (default: ``file`` specs).
      skip_chunks: per path, chunk grid indices whose files are left out (an incomplete copy).
      compressor: gzip (T5X's), zlib, zstd, blosc or None; fill_value: declared in every ``.zarray`` (T5X: null).
      spec_hook: edit each spec dict before it is serialised (bad-input tests).
    """
    from flax import serialization

    if isinstance(params, dict):
        flat = flatten_params(params) if any(isinstance(v, dict) for v in params.values()) else dict(params)
        pairs: Iterable[tuple[str, Any]] = list(flat.items())
    else:  # an iterable of (path, array) pairs, consumed lazily (bounded memory for big fixtures)
        pairs = params
    inline, legacy_path, gcs, gfile, chunked_array = (set(x) for x in (inline, legacy_path, gcs, gfile, chunked_array))
    final = os.path.join(directory, f"checkpoint_{step}")
    tmp = f"{final}.tmp-{int(time.time() * 1e6)}"
    os.makedirs(tmp)
    try:
        target: dict[str, Any] = {}
        for path, value in progress_bar(pairs, desc="writing T5X", unit="param", enable=None if progress else False):
            arr = np.asarray(value)
            want = (dtypes or {}).get(path, dtype)
            if want is not None:
                arr = arr.astype(want)
            if path in inline:
                target[path] = arr
                continue
            if path in chunked_array:
                target[path] = chunked(arr, chunked_array_bytes)
                continue
            if isinstance(chunks, str):
                ch = (t5x_chunk_shape if chunks == "t5x" else odd_chunk_shape)(arr.shape, arr.dtype.itemsize)
            elif isinstance(chunks, dict):
                ch = chunks.get(path) or t5x_chunk_shape(arr.shape, arr.dtype.itemsize)
            else:
                ch = chunks(path, arr)
            rel = "target." + path.replace("/", ".")
            meta = write_zarr(os.path.join(tmp, rel), arr, ch, compressor=compressor, fill_value=fill_value)
            for cidx in (skip_chunks or {}).get(path, ()):
                os.remove(os.path.join(tmp, rel, ".".join(map(str, cidx)) or "0"))
            form = ("legacy" if path in legacy_path else "gcs" if path in gcs else "gfile" if path in gfile
                    else "file")
            spec = _spec(rel, arr, tuple(ch), form, meta["compressor"])
            target[path] = spec_hook(path, spec) if spec_hook else spec
        state = {"step": np.int32(step), "param_states": {}}
        tree = {"version": version, "optimizer": {"state": state, "target": unflatten_params(target)}}
        with open(os.path.join(tmp, "checkpoint"), "wb") as f:
            f.write(serialization.msgpack_serialize(tree))
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_t5x(params: dict, directory: str, step: int = 0, dtype: str = "float32") -> str:
    """Write a float parameter tree as a legacy T5X checkpoint (``moqe convert --to-t5x``); packed leaves
    are refused because T5X stores float arrays only."""
    import ml_dtypes

    flat = flatten_params(params)
    bad = [p for p, v in flat.items() if is_packed(v)]
    if bad:
        raise CheckpointError(f"cannot export quantized leaf {bad[0]} to T5X (T5X stores float arrays only)")
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    return write_t5x_checkpoint(directory, {p: np.asarray(v) for p, v in flat.items()}, step=step, dtype=dt,
                                progress=True)


def write_orbax_t5x(directory: str, params: dict[str, Any], step: int = 1, *, layout: str = "ocdbt",
                    item: str = "", dtype: Any = None) -> str:
    """Write ``params`` (nested or ``'a/b'``-flat) as an Orbax-format T5X step ``directory/<step>`` with
    orbax-checkpoint: tree ``{'target': params, 'state': {'step': int32}}``.

    ``layout``: ``"ocdbt"`` (current T5X), ``"zarr"`` (one zarr/zstd directory per parameter plus
    ``_METADATA``) or ``"placeholder"`` (2023: ``"zarr"`` arrays, no ``_METADATA``, and a msgpack
    ``checkpoint`` file whose leaves are ``PLACEHOLDER://<name>`` strings under ``_optimizer/target``).
    ``item``: a subdirectory for the tree (T5X writes ``state``).
    """
    import orbax.checkpoint as ocp
    from flax import serialization

    if layout not in ("ocdbt", "zarr", "placeholder"):
        raise ValueError(f"unknown Orbax layout {layout!r} (ocdbt, zarr, placeholder)")
    flat = flatten_params(params) if any(isinstance(v, dict) for v in params.values()) else dict(params)
    flat = {p: np.asarray(v) if dtype is None else np.asarray(v).astype(dtype) for p, v in flat.items()}
    top = "_optimizer" if layout == "placeholder" else None
    tree: dict[str, Any] = {"target": unflatten_params(flat), "state": {"step": np.int32(step)}}
    if top:
        tree = {top: tree}
    step_dir = os.path.join(os.path.abspath(directory), str(step))
    out = os.path.join(step_dir, item) if item else step_dir
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=layout == "ocdbt")) as ck:
        ck.save(out, args=ocp.args.PyTreeSave(tree), force=True)
    if layout == "placeholder":
        os.remove(os.path.join(out, "_METADATA"))
        ph = {p: f"PLACEHOLDER://{top}.target.{p.replace('/', '.')}" for p in flat}
        msg = {top: {"target": unflatten_params(ph), "state": {"step": np.int32(step)}}, "flax_mutables": None}
        with open(os.path.join(out, "checkpoint"), "wb") as f:
            f.write(serialization.msgpack_serialize(msg))
    return step_dir
