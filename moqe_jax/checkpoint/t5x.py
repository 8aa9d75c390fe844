"""Read legacy T5X (version 3/2) Switch checkpoints without t5x or tensorstore (docs/T5X_SWITCH.md §1, §7).

A checkpoint is ``checkpoint_<step>/checkpoint`` (flax msgpack, :mod:`.msgpack_flax`) plus one zarr v2
directory per tensorstore-backed leaf (:mod:`.zarr`). Only ``optimizer/target`` (the parameters) is
read; the optimizer slots under ``optimizer/state`` are skipped.

Reading is lazy: :class:`T5XCheckpoint` parses the small msgpack file and lists every parameter with
its shape and dtype; array data is read on demand per parameter (:meth:`T5XCheckpoint.read`), per
slice (:meth:`T5XCheckpoint.read_slice`, e.g. one expert) or per layer (:meth:`T5XCheckpoint.read_layer`),
so compression can stream a 1.6T-parameter checkpoint layer by layer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from moqe_jax.checkpoint.msgpack_flax import unpackb
from moqe_jax.checkpoint.zarr import ZarrArray, parse_zarr_dtype
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError
from moqe_jax.progress import progress as progress_bar
from moqe_jax.tree import unflatten_params

__all__ = ["T5XCheckpoint", "ParamInfo", "resolve_checkpoint_file", "open_t5x", "load_t5x_params",
           "load_t5x", "is_spec_leaf", "flatten"]

_STEP_RE = re.compile(r"^checkpoint_(\d+)$")
_SPEC_KEYS = {"driver", "kvstore", "metadata"}
_DUMMY_BUCKET = "t5x-dummy-bucket"


def is_spec_leaf(x: Any) -> bool:
    """A tensorstore spec dict (T5X ``tensorstore_leaf``): keys ⊇ {driver, kvstore, metadata}."""
    return isinstance(x, dict) and _SPEC_KEYS <= set(x)


def flatten(tree: Any, prefix: str = "", is_leaf=is_spec_leaf) -> dict[str, Any]:
    """Raw msgpack tree -> ``{'a/b/c': leaf}``, stopping at tensorstore spec dicts (which are dicts
    themselves, so ``moqe_jax.tree.flatten_params`` would descend into them)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict) and not is_leaf(tree):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k), is_leaf))
    else:
        out[prefix] = tree
    return out


def _is_orbax_dir(d: str) -> bool:
    markers = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA")
    if any(os.path.exists(os.path.join(d, f)) for f in markers):
        return True
    state = os.path.join(d, "state")
    return os.path.isdir(state) and any(os.path.exists(os.path.join(state, f)) for f in markers)


def _orbax_error(where: str) -> CheckpointError:
    return CheckpointError(f"{where} is an Orbax-format T5X checkpoint (_METADATA / OCDBT state/ / PLACEHOLDER:// "
                           "leaves), not the legacy msgpack+zarr T5X format this reader supports; restore it with "
                           "orbax and save it with moqe_jax.checkpoint.store")


def resolve_checkpoint_file(path: str) -> str:
    """``checkpoint_<step>`` dir, a parent dir (highest step, ``*.tmp-*`` ignored) or the ``checkpoint`` file."""
    path = os.path.abspath(os.fspath(path).removeprefix("t5x:"))
    if os.path.isfile(path):
        if _is_orbax_dir(os.path.dirname(path)):
            raise _orbax_error(os.path.dirname(path))
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"T5X checkpoint {path} does not exist")
    if os.path.isfile(os.path.join(path, "checkpoint")):
        if _is_orbax_dir(path):
            raise _orbax_error(path)
        return os.path.join(path, "checkpoint")
    if _is_orbax_dir(path):
        raise _orbax_error(path)
    steps = []
    for name in os.listdir(path):
        m = _STEP_RE.match(name)  # '.tmp-' dirs never match
        if m and os.path.isdir(os.path.join(path, name)):
            steps.append((int(m.group(1)), name))
    if not steps:
        for name in os.listdir(path):
            if os.path.isdir(os.path.join(path, name)) and _is_orbax_dir(os.path.join(path, name)):
                raise _orbax_error(os.path.join(path, name))
        raise CheckpointError(f"{path}: no 'checkpoint' file and no checkpoint_<step> directories")
    step_dir = os.path.join(path, max(steps)[1])
    if os.path.isfile(os.path.join(step_dir, "checkpoint")) and not _is_orbax_dir(step_dir):
        return os.path.join(step_dir, "checkpoint")
    if _is_orbax_dir(step_dir):
        raise _orbax_error(step_dir)
    raise CheckpointError(f"{step_dir}: missing 'checkpoint' msgpack file")


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the index: where it lives, its logical shape and stored dtype."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    source: str  # "zarr" or "inline"
    zarr_dir: str | None = None
    inline: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class T5XCheckpoint:
    """Lazy index over ``optimizer/target`` of a legacy T5X checkpoint (no array data read on open)."""

    def __init__(self, path: str):
        self.file = resolve_checkpoint_file(path)
        self.dir = os.path.dirname(self.file)
        try:
            with open(self.file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CheckpointError(f"{self.file}: cannot read ({e.strerror})") from e
        if data[:21] == b"model_checkpoint_path":
            raise CheckpointError(f"{self.file} is a TensorFlow checkpoint index, not a T5X msgpack checkpoint")
        tree = unpackb(data, where=self.file)
        if not isinstance(tree, dict):
            raise CheckpointError(f"{self.file}: top level is a {type(tree).__name__}, expected a map")
        if "_optimizer" in tree or _has_placeholder(tree):
            raise _orbax_error(self.dir)
        if "version" not in tree:
            raise CheckpointError(f"{self.file}: no 'version' key (a raw Flax / version-0 checkpoint); "
                                  "T5X checkpoints of version 2 or 3 are supported")
        if "optimizer" not in tree:
            raise CheckpointError(f"{self.file}: no 'optimizer' key in a version-{tree['version']} checkpoint")
        self.version = int(tree["version"])
        if self.version not in (2, 3):
            raise CheckpointError(f"{self.file}: checkpoint version {self.version} is not supported (2 or 3)")
        opt = tree["optimizer"]
        if not isinstance(opt, dict) or not isinstance(opt.get("target"), dict):
            raise CheckpointError(f"{self.file}: 'optimizer/target' is missing or not a map")
        step = opt.get("state", {}).get("step") if isinstance(opt.get("state"), dict) else None
        self.step = int(step) if isinstance(step, (int, np.integer, np.ndarray)) and np.ndim(step) == 0 else None
        self.params: dict[str, ParamInfo] = {}
        for p, leaf in flatten(opt["target"]).items():
            self.params[p] = self._param_info(p, leaf)

    # ---- index -----------------------------------------------------------------------------
    def _param_info(self, p: str, leaf: Any) -> ParamInfo:
        where = f"{self.file}: target/{p}"
        if is_spec_leaf(leaf):
            return self._spec_info(p, leaf, where)
        if isinstance(leaf, (np.ndarray, np.generic, int, float)) and not isinstance(leaf, bool):
            arr = np.asarray(leaf)
            return ParamInfo(p, tuple(arr.shape), arr.dtype, "inline", inline=arr)
        if isinstance(leaf, str) and leaf.startswith("PLACEHOLDER://"):
            raise _orbax_error(self.dir)
        raise CheckpointError(f"{where}: unsupported leaf {type(leaf).__name__} (expected an array or a spec dict)")

    def _spec_info(self, p: str, spec: dict, where: str) -> ParamInfo:
        if spec.get("driver") != "zarr":
            raise CheckpointError(f"{where}: tensorstore driver {spec.get('driver')!r} is not supported (zarr)")
        kv = spec["kvstore"]
        if isinstance(kv, str):  # newer tensorstore may write a URL
            if not kv.startswith("file://"):
                raise CheckpointError(f"{where}: unsupported kvstore URL {kv!r}")
            kv = {"driver": "file", "path": kv[len("file://"):]}
        if not isinstance(kv, dict):
            raise CheckpointError(f"{where}: kvstore is not a map")
        driver = kv.get("driver")
        if driver not in ("file", "gfile", "gcs"):
            raise CheckpointError(f"{where}: kvstore driver {driver!r} is not supported (file, gfile, gcs)")
        rel = kv.get("path", spec.get("path"))  # legacy tensorstore (<0.1.14): top-level 'path'
        if not isinstance(rel, str) or not rel:
            raise CheckpointError(f"{where}: spec has neither kvstore.path nor a top-level path")
        rel = rel.rstrip("/")
        if driver == "gcs" and rel.startswith("gs://"):
            rel = rel.split("/", 3)[-1] if rel.count("/") >= 3 else ""
        zdir = os.path.join(self.dir, rel)
        if not os.path.isdir(zdir):
            # gcs specs with a real bucket carry bucket-relative paths; the arrays sit next to the file.
            alt = os.path.join(self.dir, os.path.basename(rel))
            if driver == "gcs" and kv.get("bucket") != _DUMMY_BUCKET and os.path.isdir(alt):
                zdir = alt
        meta = spec.get("metadata")
        if not isinstance(meta, dict) or "shape" not in meta:
            raise CheckpointError(f"{where}: spec metadata has no shape")
        dname = spec.get("dtype", meta.get("dtype"))
        if dname in ("uint16", "<u2") or meta.get("dtype") == "<u2":
            raise CheckpointError(f"{where}: uint16-encoded bfloat16 (version-1 style) array; "
                                  "re-save the checkpoint with bfloat16 types")
        if isinstance(dname, str) and dname[:1] in "<>|" or dname == "bfloat16":
            dtype = parse_zarr_dtype(dname, where)
        else:
            try:
                dtype = np.dtype(dname) if dname is not None else None
            except TypeError as e:
                raise CheckpointError(f"{where}: unknown dtype {dname!r}") from e
        if dtype is not None and dtype.kind not in "fiub" and dtype.name != "bfloat16":
            raise CheckpointError(f"{where}: unsupported dtype {dname!r}")
        shape = tuple(int(s) for s in meta["shape"])
        return ParamInfo(p, shape, dtype, "zarr", zarr_dir=zdir)

    def __contains__(self, path: str) -> bool:
        return path in self.params

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def info(self, path: str) -> ParamInfo:
        try:
            return self.params[path]
        except KeyError:
            raise CheckpointError(f"{self.file}: no parameter target/{path}") from None

    def layers(self) -> list[str]:
        """Layer prefixes in model order: ``encoder/layers_0``, ..., ``decoder/layers_N``."""
        seen: dict[str, tuple] = {}
        for p in self.params:
            m = re.match(r"^((encoder|decoder)/layers_(\d+))/", p)
            if m:
                seen[m.group(1)] = (m.group(2) != "encoder", int(m.group(3)))
        return sorted(seen, key=seen.__getitem__)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.params.values())

    # ---- data ------------------------------------------------------------------------------
    def _open(self, info: ParamInfo) -> ZarrArray:
        za = ZarrArray.open(info.zarr_dir)
        if za.shape != info.shape:
            raise CheckpointError(f"{info.zarr_dir}/.zarray: shape {list(za.shape)} != spec metadata shape "
                                  f"{list(info.shape)} for target/{info.path}")
        if info.dtype is not None and za.dtype != info.dtype:
            raise CheckpointError(f"{info.zarr_dir}/.zarray: dtype {za.dtype.name} != spec dtype "
                                  f"{info.dtype.name} for target/{info.path}")
        return za

    def read_slice(self, path: str, index: Any = None, dtype: Any = None) -> np.ndarray:
        """Read ``path[index]`` (ints / unit-step slices), touching only the chunks that intersect it."""
        info = self.info(path)
        if info.source == "inline":
            out = info.inline if index is None else info.inline[index]
            return out if dtype is None else np.asarray(out).astype(dtype, copy=False)
        return self._open(info).read(index, dtype)

    def read(self, path: str, dtype: Any = None) -> np.ndarray:
        """Read one whole parameter in its stored dtype (or cast to ``dtype``)."""
        return self.read_slice(path, None, dtype)

    def read_layer(self, prefix: str, dtype: Any = None) -> dict[str, np.ndarray]:
        """All parameters under ``prefix`` (e.g. ``encoder/layers_1``) as ``{path: array}``."""
        prefix = prefix.rstrip("/")
        paths = [p for p in self.params if p == prefix or p.startswith(prefix + "/")]
        if not paths:
            raise CheckpointError(f"{self.file}: no parameters under target/{prefix}")
        return {p: self.read(p, dtype) for p in paths}

    def iter_layers(self, dtype: Any = None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Stream ``(prefix, {path: array})`` layer by layer in model order (only one layer in memory)."""
        for prefix in self.layers():
            yield prefix, self.read_layer(prefix, dtype)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{path: (shape, stored dtype)}`` for every parameter, without reading array data."""
        return {p: (i.shape, i.dtype) for p, i in self.params.items()}

    def read_all(self, dtype: Any = None, progress: bool = True) -> dict[str, Any]:
        """Every parameter as a nested dict (``target`` tree)."""
        flat = {}
        for p in progress_bar(list(self.params), desc="reading T5X", unit="param", enable=None if progress else False):
            flat[p] = self.read(p, dtype)
        return unflatten_params(flat)


def _has_placeholder(tree: Any) -> bool:
    if isinstance(tree, str):
        return tree.startswith("PLACEHOLDER://")
    if isinstance(tree, dict):
        return any(_has_placeholder(v) for v in tree.values())
    return False


def open_t5x(path: str) -> T5XCheckpoint:
    """Open a legacy T5X checkpoint lazily (see :class:`T5XCheckpoint`)."""
    return T5XCheckpoint(path)


# ---- model-level ---------------------------------------------------------------------------------

def check_against(ckpt: T5XCheckpoint, expected: dict[str, tuple[int, ...]], name: str) -> None:
    """Raise naming the first (sorted) path that is missing, unexpected or mis-shaped."""
    have = {p: i.shape for p, i in ckpt.params.items()}
    for p in sorted(set(have) | set(expected)):
        if p not in have:
            raise CheckpointError(f"{ckpt.file}: parameter {p} of config {name} is missing from the checkpoint")
        if p not in expected:
            raise CheckpointError(f"{ckpt.file}: checkpoint parameter {p} {list(have[p])} is not in config {name}")
        if tuple(have[p]) != tuple(expected[p]):
            raise CheckpointError(f"{ckpt.file}: {p} has shape {list(have[p])}, config {name} expects "
                                  f"{list(expected[p])}")


def load_t5x_params(path: str, expected: dict[str, tuple[int, ...]] | None = None, name: str = "config",
                    dtype: Any = np.float32, progress: bool = True) -> dict[str, Any]:
    """Read ``optimizer/target`` as a nested dict of ``dtype`` arrays, checked against ``expected`` shapes."""
    ckpt = T5XCheckpoint(path)
    if expected is not None:
        check_against(ckpt, expected, name)
    return ckpt.read_all(dtype=dtype, progress=progress)


def load_t5x(path: str, config: SwitchConfig | str) -> tuple[SwitchConfig, dict]:
    """``(config, params)`` for ``load_model("t5x:PATH", config)``: float32 params (experts stay stacked
    ``[E, …]``); ``config`` is a ``SwitchConfig`` or a preset name."""
    from moqe_jax.model.api import param_shapes  # flax: imported only when a model is loaded

    name = config if isinstance(config, str) else config.name or "given"
    cfg = SwitchConfig.preset(config) if isinstance(config, str) else config
    return cfg, load_t5x_params(path, param_shapes(cfg), name=str(name))
