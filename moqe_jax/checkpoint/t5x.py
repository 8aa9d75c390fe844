"""Read T5X Switch checkpoints, legacy and Orbax-format (docs/T5X_SWITCH.md §1, §1.9, §7).

Three layouts, one lazy index (:class:`T5XCheckpoint`):

- **legacy** (T5X version 3/2): ``checkpoint_<step>/checkpoint`` (flax msgpack, ``flax.serialization``) whose
  ``optimizer/target`` leaves are tensorstore spec dicts of zarr v2 directories (:mod:`.zarr`);
- **Orbax, 2023** (``PLACEHOLDER://`` layout): the same msgpack file, but its leaves are
  ``PLACEHOLDER://<name>`` strings and each array is a zarr directory ``<name>/`` (zstd chunks);
- **Orbax** (``_METADATA``, per-parameter zarr dirs or OCDBT, in the step dir or its ``state/`` /
  ``default/`` item dir), read through orbax-checkpoint.

Only the parameters (``target``) are indexed; optimizer slots are skipped. Array data is read on demand per
parameter (:meth:`T5XCheckpoint.read`), per slice (:meth:`T5XCheckpoint.read_slice`, e.g. one expert; only
the chunks it touches) or per layer (:meth:`T5XCheckpoint.read_layer`; Orbax layouts restore just that
subtree), so compression can stream a 1.6T-parameter checkpoint layer by layer. Step directories are
``checkpoint_<N>`` (T5X) or ``<N>`` (Orbax ``CheckpointManager``).

Every path taken from inside a checkpoint must stay inside it: array paths that are absolute, climb out with
``..``, name another ``file://`` location or a real ``gs://`` bucket, and symlinks or FIFOs in the array
directories are refused unless ``allow_outside=True``. Missing chunks are an error unless
``allow_missing_chunks=True`` and the array declares a fill value.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moqe_jax.checkpoint.zarr import ZarrArray, check_confined, ts_error
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError
from moqe_jax.progress import progress as progress_bar
from moqe_jax.tree import unflatten_params

__all__ = ["T5XCheckpoint", "ParamInfo", "resolve_checkpoint_file", "resolve_step_dir", "open_t5x",
           "load_t5x_params", "load_t5x", "is_spec_leaf", "flatten"]

_STEP_RE = re.compile(r"^(?:checkpoint_)?(\d+)$")
_SPEC_KEYS = {"driver", "kvstore", "metadata"}
_DUMMY_BUCKET = "t5x-dummy-bucket"
_PLACEHOLDER = "PLACEHOLDER://"
_ORBAX_ITEMS = ("", "state", "default")  # Orbax item dir inside a step: T5X writes state/, a manager default/
_TARGETS = (("target",), ("_optimizer", "target"), ("optimizer", "target"), ("params",))


def is_spec_leaf(x: Any) -> bool:
    """A tensorstore spec dict (T5X ``tensorstore_leaf``): keys ⊇ {driver, kvstore, metadata}."""
    return isinstance(x, dict) and _SPEC_KEYS <= set(x)


def flatten(tree: Any, prefix: str = "", is_leaf=is_spec_leaf) -> dict[str, Any]:
    """Raw msgpack tree -> ``{'a/b/c': leaf}``, stopping at tensorstore spec dicts."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict) and not is_leaf(tree):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k), is_leaf))
    else:
        out[prefix] = tree
    return out


def _with_keys(tree: Any, keys: tuple[str, ...]) -> Any:
    """Each leaf of a nested dict replaced by (its full key tuple under ``keys``, the leaf)."""
    if isinstance(tree, dict):
        return {k: _with_keys(v, (*keys, str(k))) for k, v in tree.items()}
    return keys, tree


def _orbax_item(d: str) -> str | None:
    """The Orbax item directory (holding ``_METADATA``) of step dir ``d``, if any."""
    for sub in _ORBAX_ITEMS:
        if os.path.isfile(os.path.join(d, sub, "_METADATA")):
            return os.path.join(d, sub) if sub else d
    return None


def _is_step(d: str) -> bool:
    return os.path.lexists(os.path.join(d, "checkpoint")) or _orbax_item(d) is not None


def resolve_step_dir(path: str) -> tuple[str, str | None]:
    """``(step dir, checkpoint file given or None)`` for a step dir, a parent of ``checkpoint_<N>`` /
    Orbax ``<N>`` step dirs (highest step; ``*.tmp-*`` / ``*.orbax-checkpoint-tmp-*`` ignored) or a
    ``checkpoint`` file."""
    path = os.path.abspath(os.fspath(path).removeprefix("t5x:"))
    if os.path.isfile(path):
        return os.path.dirname(path), path
    if not os.path.isdir(path):
        raise CheckpointError(f"T5X checkpoint {path} does not exist")
    if _is_step(path):
        return path, None
    steps = []
    for name in os.listdir(path):
        m = _STEP_RE.match(name)  # unfinished saves ('.tmp-' suffixes) never match
        if m and os.path.isdir(os.path.join(path, name)):
            steps.append((int(m.group(1)), name))
    if not steps:
        raise CheckpointError(f"{path}: no 'checkpoint' file, no Orbax _METADATA and no checkpoint_<step> or "
                              "Orbax <step> directories (point at a T5X run directory or one of its steps)")
    step_dir = os.path.join(path, max(steps)[1])
    if not _is_step(step_dir):
        raise CheckpointError(f"{step_dir}: missing 'checkpoint' msgpack file (legacy T5X) or Orbax _METADATA "
                              "(incomplete copy of the step?)")
    return step_dir, None


def resolve_checkpoint_file(path: str) -> str:
    """The msgpack ``checkpoint`` file of a legacy or 2023-Orbax T5X step (see :func:`resolve_step_dir`)."""
    step, given = resolve_step_dir(path)
    f = given or os.path.join(step, "checkpoint")
    if not os.path.isfile(f):
        raise CheckpointError(f"{step}: an Orbax checkpoint with _METADATA has no 'checkpoint' msgpack file")
    return f


def _dtype(name: Any, where: str) -> np.dtype:
    if name in ("uint16", "<u2"):
        raise CheckpointError(f"{where}: uint16-encoded bfloat16 (version-1 style) array; "
                              "re-save the checkpoint with bfloat16 types")
    try:
        dt = np.dtype(__import__("ml_dtypes").bfloat16 if name == "bfloat16" else name)
    except TypeError:
        raise CheckpointError(f"{where}: unknown dtype {name!r}") from None
    if dt.kind not in "fiub" and dt.name != "bfloat16":
        raise CheckpointError(f"{where}: unsupported dtype {name!r}")
    return dt


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the index: where it lives, its logical shape and stored dtype."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype | None
    source: str  # "zarr" (tensorstore spec), "inline" or "orbax" (restored through orbax-checkpoint)
    zarr_dir: str | None = None  # local array directory, if any
    inline: np.ndarray | None = None
    ts_spec: dict | None = field(default=None, compare=False)
    key: tuple[str, ...] = ()  # orbax: the key path in the checkpoint tree

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype or np.float32).itemsize


class T5XCheckpoint:
    """Lazy index over the parameters (``target``) of a T5X checkpoint (no array data read on open).

    ``allow_outside``: trust array paths that leave the checkpoint directory (absolute paths, real ``gs://``
    buckets: passed to tensorstore unchanged). ``allow_missing_chunks``: read missing chunks as the array's
    declared fill value instead of failing.
    """

    def __init__(self, path: str, *, allow_outside: bool = False, allow_missing_chunks: bool = False):
        self.allow_outside = allow_outside
        self.allow_missing_chunks = allow_missing_chunks
        self.dir, given = resolve_step_dir(path)
        self.step: int | None = None
        self.version: int | None = None
        self._open_cache: dict[str, ZarrArray] = {}
        item = None if given else _orbax_item(self.dir)
        self.params: dict[str, ParamInfo] = {}
        if item is not None:
            self.layout = "orbax"
            self.file = item
            self._index_orbax(item)
            return
        self.file = given or os.path.join(self.dir, "checkpoint")
        tree = self._read_msgpack(self.file)
        if "_optimizer" in tree or _has_placeholder(tree):
            self.layout = "orbax-msgpack"
            self._index_placeholder(tree)
            return
        self.layout = "legacy"
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
        self.step = _step_of(opt)
        for p, leaf in flatten(opt["target"]).items():
            self.params[p] = self._param_info(p, leaf)

    # ---- index -----------------------------------------------------------------------------
    def _read_msgpack(self, f: str) -> dict:
        try:
            st = os.stat(f)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{f}: not a regular file (FIFO/device); refusing to read it")
            if not self.allow_outside:
                check_confined(f, self.dir, what="checkpoint file", recursive=False)
            with open(f, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read ({e.strerror})") from None
        if data[:21] == b"model_checkpoint_path":
            raise CheckpointError(f"{f} is a TensorFlow checkpoint index, not a T5X msgpack checkpoint")
        from flax import serialization

        try:  # ext types (ndarray, complex, numpy scalar, bfloat16) and __msgpack_chunked_array__ leaves
            tree = serialization.msgpack_restore(data)
        except Exception as e:  # noqa: BLE001 - OutOfData, ExtraData, FormatError, ValueError, TypeError ...
            raise CheckpointError(f"{f}: not a valid msgpack file ({type(e).__name__}: {e}".splitlines()[0]
                                  + ") (truncated or not a flax/T5X checkpoint)") from None
        if not isinstance(tree, dict):
            raise CheckpointError(f"{f}: top level is a {type(tree).__name__}, expected a map")
        return tree

    def _target(self, tree: dict, where: str) -> tuple[tuple[str, ...], dict]:
        for key in _TARGETS:
            sub: Any = tree
            for k in key:
                sub = sub.get(k) if isinstance(sub, dict) else None
            if isinstance(sub, dict) and sub:
                return key, sub
        raise CheckpointError(f"{where}: Orbax-format T5X checkpoint without parameters under 'target', "
                              "'_optimizer/target' or 'params'")

    def _local_name(self, base: str, name: str, where: str) -> str:
        """``base/name`` for an array name taken from the checkpoint, refused if it leaves ``base``."""
        d = os.path.normpath(os.path.join(base, name))
        if (os.path.isabs(name) or os.sep in name or name in ("", ".", "..")) and not self.allow_outside:
            raise CheckpointError(f"{where}: array name {name!r} is a path leaving the checkpoint directory "
                                  f"{self.dir} (pass allow_outside=True (CLI: --allow-outside) to trust it)")
        return d

    def _index_placeholder(self, tree: dict) -> None:
        key, target = self._target(tree, self.file)
        opt = tree.get(key[0]) if len(key) > 1 else tree
        self.step = _step_of(opt.get("state") if isinstance(opt, dict) else None, direct=True)
        for p, leaf in flatten(target).items():
            where = f"{self.file}: {'/'.join(key)}/{p}"
            if isinstance(leaf, str) and leaf.startswith(_PLACEHOLDER):
                zdir = self._local_name(self.dir, leaf[len(_PLACEHOLDER):], where)
                spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": zdir}}
                za = self._open_raw(zdir, spec, f"target/{p}")  # shape/dtype come from .zarray
                self.params[p] = ParamInfo(p, za.shape, za.dtype, "zarr", zarr_dir=zdir, ts_spec=spec)
                self._open_cache[p] = za
            else:
                self.params[p] = self._param_info(p, leaf)

    def _index_orbax(self, item: str) -> None:
        """Index an Orbax PyTree item from orbax's own metadata: the tree of array shapes/dtypes and
        ``use_zarr3`` (``PyTreeCheckpointHandler.metadata``), OCDBT from ``is_ocdbt_checkpoint``; each leaf's
        array is named by its keys joined with '.' (a directory of that name unless OCDBT)."""
        import orbax.checkpoint as ocp

        if not self.allow_outside:
            check_confined(item, self.dir, what="Orbax checkpoint file")
        try:
            self.ocdbt = bool(ocp.type_handlers.is_ocdbt_checkpoint(_epath(item)))
            md = ocp.PyTreeCheckpointHandler(use_ocdbt=self.ocdbt).metadata(_epath(item))
            self.zarr3 = bool(md.use_zarr3)
            tree = md.tree
        except Exception as e:  # noqa: BLE001
            msg = str(e).splitlines()[0] if str(e) else repr(e)
            raise CheckpointError(f"{item}/_METADATA: corrupt Orbax metadata ({type(e).__name__}: {msg}); "
                                  "re-copy the checkpoint") from None
        key, target = self._target(tree if isinstance(tree, dict) else {}, item)
        for p, (keys, m) in flatten(_with_keys(target, key), is_leaf=lambda x: not isinstance(x, dict)).items():
            if not hasattr(m, "shape") or not hasattr(m, "dtype"):
                raise CheckpointError(f"{item}: Orbax metadata has no array for {'/'.join(keys)}")
            name = ".".join(keys)
            where = f"{item}: {'/'.join(keys)}"
            if self.ocdbt:
                kv = {"driver": "ocdbt", "base": {"driver": "file", "path": item + "/"}, "path": name + "/"}
                zdir = None
                if (os.sep in name or name.startswith(".")) and not self.allow_outside:
                    raise CheckpointError(f"{where}: array name {name!r} is not a plain key "
                                          "(pass allow_outside=True, CLI: --allow-outside)")
            else:
                zdir = self._local_name(item, name, where)
                kv = {"driver": "file", "path": zdir}
            spec = {"driver": "zarr3" if self.zarr3 else "zarr", "kvstore": kv}
            dt = _dtype(np.dtype(m.dtype).name, where)
            self.params[p] = ParamInfo(p, tuple(int(s) for s in m.shape), dt, "orbax", zarr_dir=zdir, ts_spec=spec,
                                       key=keys)

    def _param_info(self, p: str, leaf: Any) -> ParamInfo:
        where = f"{self.file}: target/{p}"
        if is_spec_leaf(leaf):
            return self._spec_info(p, leaf, where)
        if isinstance(leaf, (np.ndarray, np.generic, int, float)) and not isinstance(leaf, bool):
            arr = np.asarray(leaf)
            return ParamInfo(p, tuple(arr.shape), arr.dtype, "inline", inline=arr)
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
        meta = spec.get("metadata")
        if not isinstance(meta, dict) or "shape" not in meta:
            raise CheckpointError(f"{where}: spec metadata has no shape")
        if meta.get("dtype") in ("uint16", "<u2"):
            _dtype("<u2", where)
        dname = spec.get("dtype", meta.get("dtype"))
        dtype = _dtype(dname, where) if dname is not None else None
        shape = tuple(int(s) for s in meta["shape"])
        zdir = os.path.normpath(os.path.join(self.dir, rel))
        inside = not os.path.isabs(rel) and (zdir + os.sep).startswith(self.dir + os.sep) and zdir != self.dir
        if driver == "gcs" and kv.get("bucket") not in (None, _DUMMY_BUCKET) and not os.path.isdir(zdir):
            # a real bucket: the arrays live in gs://; use the copy next to the file if there is one
            alt = os.path.join(self.dir, os.path.basename(rel))
            if os.path.isdir(alt) and inside:
                zdir = alt
            elif self.allow_outside:
                return ParamInfo(p, shape, dtype, "zarr", ts_spec={"driver": "zarr", "kvstore": spec["kvstore"]})
            else:
                raise CheckpointError(f"{where}: array lives in gs://{kv.get('bucket')}/{rel}, outside the "
                                      f"checkpoint directory {self.dir} (pass allow_outside=True "
                                      "(CLI: --allow-outside) to read it)")
        if not inside and not self.allow_outside:
            raise CheckpointError(f"{where}: array path {rel!r} leaves the checkpoint directory {self.dir} "
                                  "(absolute, '..' or file:// elsewhere); pass allow_outside=True "
                                  "(CLI: --allow-outside) to trust it")
        return ParamInfo(p, shape, dtype, "zarr", zarr_dir=zdir,
                         ts_spec={"driver": "zarr", "kvstore": {"driver": "file", "path": zdir}})

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
    def _open_raw(self, zarr_dir: str | None, spec: dict, what: str) -> ZarrArray:
        if zarr_dir is not None:
            if not os.path.isdir(zarr_dir):
                raise CheckpointError(f"zarr array directory {zarr_dir} does not exist ({what}; "
                                      "incomplete checkpoint: copy it again)")
            if not self.allow_outside:
                check_confined(zarr_dir, self.dir)
        where = zarr_dir or f"{self.file}: {what}"
        return ZarrArray.open(spec, where=where, allow_missing_chunks=self.allow_missing_chunks)

    def _open(self, info: ParamInfo) -> ZarrArray:
        if info.path in self._open_cache:
            return self._open_cache[info.path]
        assert info.ts_spec is not None
        za = self._open_raw(info.zarr_dir, info.ts_spec, f"target/{info.path}")
        where = za.path
        if za.shape != info.shape:
            raise CheckpointError(f"{where}/.zarray: shape {list(za.shape)} != spec metadata shape "
                                  f"{list(info.shape)} for target/{info.path}")
        if info.dtype is not None and za.dtype != info.dtype:
            raise CheckpointError(f"{where}/.zarray: dtype {za.dtype.name} != spec dtype "
                                  f"{info.dtype.name} for target/{info.path}")
        self._open_cache[info.path] = za
        return za

    def read_slice(self, path: str, index: Any = None, dtype: Any = None) -> np.ndarray:
        """Read ``path[index]`` (ints / unit-step slices), touching only the chunks that intersect it."""
        info = self.info(path)
        if info.inline is not None:
            out = info.inline if index is None else info.inline[index]
            return np.asarray(out) if dtype is None else np.asarray(out).astype(dtype, copy=False)
        return self._open(info).read(index, dtype)

    def read(self, path: str, dtype: Any = None) -> np.ndarray:
        """Read one whole parameter in its stored dtype (or cast to ``dtype``)."""
        return self._read_many([path], dtype)[path]

    def _read_many(self, paths: list[str], dtype: Any = None) -> dict[str, np.ndarray]:
        """Orbax parameters are restored together through orbax-checkpoint (a partial restore of just
        these leaves); the others (and Orbax ones with ``allow_missing_chunks``) through tensorstore."""
        out = {}
        orbax = [p for p in paths if self.info(p).source == "orbax" and not self.allow_missing_chunks]
        if orbax:
            out.update(self._orbax_restore(orbax, dtype))
        for p in paths:
            if p not in out:
                out[p] = self.read_slice(p, None, dtype)
        return {p: out[p] for p in paths}

    def _orbax_restore(self, paths: list[str], dtype: Any) -> dict[str, np.ndarray]:
        import orbax.checkpoint as ocp

        item: dict = {}
        args: dict = {}
        for p in paths:
            keys = self.info(p).key
            node, anode = item, args
            for k in keys[:-1]:
                node, anode = node.setdefault(k, {}), anode.setdefault(k, {})
            node[keys[-1]] = 0
            anode[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=None if dtype is None else np.dtype(dtype))
        try:
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=self.ocdbt)) as ck:
                res = ck.restore(_epath(self.file), args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                                partial_restore=True))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
            raise ts_error(e, f"{self.file}: Orbax restore of {paths[0]}") from None
        out = {}
        for p in paths:
            v: Any = res
            for k in self.info(p).key:
                v = v[k]
            out[p] = np.asarray(v)
        return out

    def read_layer(self, prefix: str, dtype: Any = None) -> dict[str, np.ndarray]:
        """All parameters under ``prefix`` (e.g. ``encoder/layers_1``) as ``{path: array}``."""
        prefix = prefix.rstrip("/")
        paths = [p for p in self.params if p == prefix or p.startswith(prefix + "/")]
        if not paths:
            raise CheckpointError(f"{self.file}: no parameters under target/{prefix}")
        return self._read_many(paths, dtype)

    def iter_layers(self, dtype: Any = None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Stream ``(prefix, {path: array})`` layer by layer in model order (only one layer in memory)."""
        for prefix in self.layers():
            yield prefix, self.read_layer(prefix, dtype)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
        """``{path: (shape, stored dtype)}`` for every parameter, without reading array data."""
        return {p: (i.shape, i.dtype) for p, i in self.params.items()}

    def read_all(self, dtype: Any = None, progress: bool = True) -> dict[str, Any]:
        """Every parameter as a nested dict (``target`` tree), one layer (one Orbax restore) at a time."""
        groups: dict[str, list[str]] = {}
        for p in self.params:
            m = re.match(r"^((encoder|decoder)/layers_\d+)/", p)
            groups.setdefault(m.group(1) if m else "", []).append(p)
        flat: dict[str, Any] = {}
        for g in progress_bar(list(groups.values()), desc="reading T5X", unit="layer",
                              enable=None if progress else False):
            flat.update(self._read_many(g, dtype))
        return unflatten_params(flat)


def _epath(p: str) -> Any:
    from etils import epath

    return epath.Path(p)


def _step_of(opt: Any, direct: bool = False) -> int | None:
    state = opt if direct else (opt.get("state") if isinstance(opt, dict) else None)
    step = state.get("step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, (int, np.integer, np.ndarray)) and np.ndim(step) == 0 else None


def _has_placeholder(tree: Any) -> bool:
    if isinstance(tree, str):
        return tree.startswith(_PLACEHOLDER)
    if isinstance(tree, dict):
        return any(_has_placeholder(v) for v in tree.values())
    return False


def open_t5x(path: str, **kw: Any) -> T5XCheckpoint:
    """Open a T5X checkpoint lazily (see :class:`T5XCheckpoint`)."""
    return T5XCheckpoint(path, **kw)


# ---- model-level ---------------------------------------------------------------------------------

def check_against(ckpt: T5XCheckpoint, expected: dict[str, tuple[int, ...]], name: str) -> None:
    """Raise naming the first (sorted) path that is missing, unexpected or mis-shaped."""
    have = {p: i.shape for p, i in ckpt.params.items()}
    for p in sorted(set(have) | set(expected)):
        bias = p.endswith("router_weights/w/bias")  # Flaxformer RouterWeights(use_bias=...): config router_bias
        if p not in have:
            raise CheckpointError(f"{ckpt.file}: parameter {p} of config {name} is missing from the checkpoint"
                                  + (" (its routers have no bias: set router_bias=False)" if bias else ""))
        if p not in expected:
            raise CheckpointError(f"{ckpt.file}: checkpoint parameter {p} {list(have[p])} is not in config {name}"
                                  + (" (a router bias: set router_bias=True)" if bias else ""))
        if tuple(have[p]) != tuple(expected[p]):
            raise CheckpointError(f"{ckpt.file}: {p} has shape {list(have[p])}, config {name} expects "
                                  f"{list(expected[p])}")


def load_t5x_params(path: str, expected: dict[str, tuple[int, ...]] | None = None, name: str = "config",
                    dtype: Any = np.float32, progress: bool = True, **kw: Any) -> dict[str, Any]:
    """Read the parameters as a nested dict of ``dtype`` arrays, checked against ``expected`` shapes
    (``kw``: ``allow_outside`` / ``allow_missing_chunks`` of :class:`T5XCheckpoint`)."""
    ckpt = T5XCheckpoint(path, **kw)
    if expected is not None:
        check_against(ckpt, expected, name)
    return ckpt.read_all(dtype=dtype, progress=progress)


def load_t5x(path: str, config: SwitchConfig | str, **kw: Any) -> tuple[SwitchConfig, dict]:
    """``(config, params)`` for ``load_model("t5x:PATH", config)``: float32 params (experts stay stacked
    ``[E, …]``); ``config`` is a ``SwitchConfig`` or a preset name."""
    from moqe_jax.model.api import param_shapes  # flax: imported only when a model is loaded

    name = config if isinstance(config, str) else config.name or "given"
    cfg = SwitchConfig.preset(config) if isinstance(config, str) else config
    return cfg, load_t5x_params(path, param_shapes(cfg), name=str(name), **kw)
