"""zarr v2 arrays of T5X / Orbax checkpoints through tensorstore (docs/T5X_SWITCH.md §1.5).

tensorstore reads every compressor T5X and Orbax have written (gzip, zlib, blosc, zstd, none), any kvstore
(``file``, ``gcs``, ``ocdbt``) and bounds a chunk's decompressed size by the array's own ``.zarray``. Reads
of a region touch only the chunks that intersect it, so one expert ``[e]`` of a stacked ``[E, D, F]`` array
costs only its chunks. This module keeps the project's contract on top: one-line :class:`CheckpointError`s
naming the file and the fix, missing chunks are an error unless asked for (``allow_missing_chunks``), and
local array directories stay inside their checkpoint (:func:`check_confined`).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np

from moqe_jax.errors import CheckpointError

__all__ = ["ZarrArray", "write_zarr", "check_confined", "ts_error"]

_TS_FILE = re.compile(r'(?:local file|at) "([^"]+)"')


def ts_error(e: BaseException, where: str, compressor: str | None = None) -> CheckpointError:
    """A tensorstore error as one line naming the file (chunk file when tensorstore names one) and the fix."""
    msg = str(e).split(" [tensorstore_spec=")[0].strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = re.sub(r"^[A-Z_]+: ", "", msg)
    m = _TS_FILE.search(msg)
    fn = m.group(1) if m else where
    if "is missing" in msg and "chunk" in msg:
        return CheckpointError(f"{fn}: zarr chunk file is missing (an incomplete copy of the checkpoint: copy it "
                               "again; allow_missing_chunks=True (CLI: --allow-missing-chunks) reads the array's "
                               "declared fill value instead)")
    if "Metadata at" in msg and "does not exist" in msg:
        d = os.path.dirname(fn)
        what = "does not exist" if not os.path.exists(d) else "has no .zarray metadata"
        return CheckpointError(f"zarr array directory {d} {what} (incomplete checkpoint: copy it again)")
    if msg.startswith("Error reading local file"):
        detail = msg.split(": ", 1)[1] if ": " in msg else msg
        return CheckpointError(f"{fn}: corrupt {compressor or 'zarr'} chunk ({detail}); expected the size "
                               "declared in .zarray (re-copy the checkpoint)")
    return CheckpointError(f"{where}: {msg}")


_OUTSIDE_HINT = "pass allow_outside=True (CLI: --allow-outside) to trust it"


def check_confined(path: str, root: str, *, what: str = "array", recursive: bool = True,
                   hint: str = _OUTSIDE_HINT) -> None:
    """``path`` (and, if a directory, every entry below it) must resolve inside ``root`` and be a regular
    file or directory: no symlink leaving the checkpoint, no FIFO/device that would hang or leak a file."""
    real_root = os.path.realpath(root)

    def one(p: str) -> os.stat_result:
        rp = os.path.realpath(p)
        if rp != real_root and not rp.startswith(real_root + os.sep):
            raise CheckpointError(f"{p}: {what} resolves to {rp}, outside the checkpoint directory {root} (a "
                                  f"symlink or path leaving the checkpoint; {hint})")
        try:
            st = os.stat(p)
        except OSError as e:
            raise CheckpointError(f"{p}: cannot read {what} ({e.strerror})") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise CheckpointError(f"{p}: {what} is not a regular file or directory (FIFO/device); refusing to read")
        return st

    if not stat.S_ISDIR(one(path).st_mode) or not recursive:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            one(os.path.join(dirpath, n))


def _region(index: Any, shape: tuple[int, ...], where: str) -> tuple[list[tuple[int, int]], list[bool]]:
    """NumPy basic index (ints, unit-step slices, Ellipsis) -> ``[start, stop)`` per dim and which dims an int
    drops. Checked here: tensorstore leaves zarr upper bounds open (resizable) and reads ``-1`` as a coordinate."""
    index = () if index is None else index if isinstance(index, tuple) else (index,)
    if any(ix is Ellipsis for ix in index):
        i = index.index(Ellipsis)
        index = index[:i] + (slice(None),) * (len(shape) - len(index) + 1) + index[i + 1:]
    if len(index) > len(shape):
        raise CheckpointError(f"{where}: index {index!r} has more entries than the array rank {len(shape)}")
    index += (slice(None),) * (len(shape) - len(index))
    bounds = []
    for ix, n in zip(index, shape, strict=True):
        if isinstance(ix, slice):
            start, stop, step = ix.indices(n)
            if step != 1:
                raise CheckpointError(f"{where}: only unit-step slices can be read lazily, got {ix!r}")
            bounds.append((start, max(start, stop)))
        elif not isinstance(ix, (int, np.integer)):
            raise CheckpointError(f"{where}: unsupported index {ix!r} (use ints and unit-step slices)")
        elif not -n <= ix < n:
            raise CheckpointError(f"{where}: index {int(ix)} out of range for a dimension of size {n}")
        else:
            bounds.append((int(ix) % n, int(ix) % n + 1))
    return bounds, [not isinstance(ix, slice) for ix in index]


@dataclass(frozen=True)
class ZarrArray:
    """An open tensorstore zarr array (only its metadata is read on open)."""

    path: str
    store: Any  # tensorstore.TensorStore
    compressor: str | None

    @classmethod
    def open(cls, spec: str | dict, *, where: str | None = None, allow_missing_chunks: bool = False) -> ZarrArray:
        """``spec``: a local zarr directory or a tensorstore spec dict (passed through unchanged, plus the
        missing-chunk policy). Errors name ``where`` (default: the directory)."""
        import tensorstore as ts

        if isinstance(spec, (str, os.PathLike)):
            path = os.fspath(spec)
            if not os.path.isdir(path):
                raise CheckpointError(f"zarr array directory {path} does not exist")
            spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}
        else:
            kv = spec.get("kvstore")
            path = where or (kv.get("path", "?") if isinstance(kv, dict) else str(kv))
        try:
            store = ts.open({**spec, "fill_missing_data_reads": bool(allow_missing_chunks)}, read=True,
                            open=True).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError for every failure
            raise ts_error(e, where or path) from None
        comp = store.spec().to_json().get("metadata", {}).get("compressor")
        za = cls(where or path, store, comp.get("id") if isinstance(comp, dict) else None)
        if allow_missing_chunks and store.fill_value is None:
            raise CheckpointError(f"{za.path}: allow_missing_chunks=True needs a declared fill_value in .zarray, "
                                  "and this array has none (fill_value null): copy the missing chunks instead")
        return za

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.store.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.store.dtype.numpy_dtype)

    def _chunk_boxes(self, bounds: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """Per dim, the region ``bounds`` cut at the chunk boundaries."""
        chunks = self.store.chunk_layout.read_chunk.shape or ()
        return [[(max(a, k * c), min(b, (k + 1) * c)) for k in range(a // c, (b - 1) // c + 1)] if b > a else []
                for (a, b), c in zip(bounds, chunks, strict=True)]

    def read(self, index: Any = None, dtype: Any = None) -> np.ndarray:
        """The whole array, or ``index`` (ints / unit-step slices), touching only the chunks it intersects.

        One tensorstore read per chunk, one at a time, into a preallocated output: memory is the output plus
        one compressed and one decoded chunk, whatever the region. A single tensorstore read keeps every chunk
        of the region decoded until it completes, context limits (``data_copy_concurrency``,
        ``file_io_concurrency``, ``cache_pool`` 0) or not (benchmarks/results/t5x_lazy_rss.md). ``dtype``
        casts chunk by chunk (tensorstore ``cast``)."""
        import tensorstore as ts

        bounds, drop = _region(index, self.shape, self.path)
        out = np.empty([b - a for a, b in bounds], dtype=self.dtype if dtype is None else np.dtype(dtype))
        t = self.store if out.dtype == self.dtype else ts.cast(self.store, ts.dtype(out.dtype.name))
        try:
            for box in itertools.product(*self._chunk_boxes(bounds)):
                dst = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(box, bounds, strict=True))
                out[dst] = t[tuple(slice(lo, hi) for lo, hi in box)].read(order="C").result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError for every failure
            raise ts_error(e, self.path, self.compressor) from None
        return out.reshape([n for n, dr in zip(out.shape, drop, strict=True) if not dr])

    def chunks_for(self, index: Any = None) -> int:
        """Number of chunks a read of ``index`` touches (for tests / benchmarks)."""
        return math.prod(len(c) for c in self._chunk_boxes(_region(index, self.shape, self.path)[0]))


def write_zarr(path: str, array: np.ndarray, chunks: tuple[int, ...] | None = None, compressor: str | None = "gzip",
               level: int = 1, fill_value: Any = None) -> dict:
    """Write ``array`` as a zarr v2 directory with tensorstore (as T5X does); return the ``.zarray`` dict.

    ``compressor``: gzip, zlib, zstd, blosc (lz4) or None; ``chunks`` default to one chunk (edge chunks are
    padded by tensorstore); ``fill_value`` None writes ``null`` like T5X, a number declares a fill value.
    """
    import tensorstore as ts

    array = np.asarray(array)
    comp = {"id": compressor, **({"cname": "lz4", "clevel": level, "shuffle": 1} if compressor == "blosc"
                                 else {"level": level})} if compressor else None
    meta = {"compressor": comp, "chunks": list(array.shape if chunks is None else chunks)}
    t = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": os.fspath(path)}, "metadata": meta,
                 "store_data_equal_to_fill_value": True}, create=True, delete_existing=True,
                dtype=ts.dtype(array.dtype.name), shape=array.shape,
                **({} if fill_value is None else {"fill_value": fill_value})).result()
    t.write(array).result()
    return t.spec().to_json()["metadata"]
