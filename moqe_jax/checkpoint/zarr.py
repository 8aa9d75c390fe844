"""Minimal zarr v2 array reader/writer for T5X tensorstore leaves (docs/T5X_SWITCH.md §1.5).

Supports exactly what T5X writes: ``.zarray`` dtype ``<f4``/``<i4``/``<f8`` (any plain little-endian
numpy dtype) and tensorstore's ``bfloat16``; compressor gzip (also zlib / none); no filters; C (or F)
order; ``.``- or ``/``-separated chunk keys (``"0"`` for rank 0); padded edge chunks are cropped;
a missing chunk file reads as the fill value (``null`` → 0). Reads touch only the chunks that
intersect the requested region, so one expert ``[e]`` of a stacked ``[E, D, F]`` array costs
only its chunks.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from moqe_jax.errors import CheckpointError

__all__ = ["ZarrArray", "write_zarr", "zarr_dtype_name", "parse_zarr_dtype"]


def parse_zarr_dtype(s: Any, where: str) -> np.dtype:
    """zarr v2 dtype string -> numpy dtype (``bfloat16`` is tensorstore's extension)."""
    if s == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    if not isinstance(s, str) or len(s) < 2 or s[0] not in "<>|":
        raise CheckpointError(f"{where}: unsupported zarr dtype {s!r}")
    try:
        dt = np.dtype(s)
    except TypeError as e:
        raise CheckpointError(f"{where}: unsupported zarr dtype {s!r}") from e
    if dt.kind not in "fiub" or dt.hasobject:
        raise CheckpointError(f"{where}: unsupported zarr dtype {s!r}")
    return dt


def zarr_dtype_name(dt: Any) -> str:
    """numpy dtype -> zarr v2 dtype string as tensorstore writes it."""
    dt = np.dtype(dt)
    if dt == np.dtype(ml_dtypes.bfloat16):
        return "bfloat16"
    if dt.itemsize == 1:
        return "|" + dt.str[1:]
    return "<" + dt.str[1:]


def _fill_value(v: Any, dt: np.dtype, where: str) -> Any:
    if v is None:
        return 0
    if isinstance(v, str):
        table = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}
        if v in table and (dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16)):
            return table[v]
        raise CheckpointError(f"{where}: unsupported fill_value {v!r} for dtype {dt.name}")
    return v


def _normalize_index(index: Any, shape: tuple[int, ...], where: str) -> tuple[list[tuple[int, int]], list[bool]]:
    """Index (ints, unit-step slices, Ellipsis) -> per-dim [start, stop) and which dims are dropped."""
    if index is None:
        index = ()
    if not isinstance(index, tuple):
        index = (index,)
    if any(ix is Ellipsis for ix in index):
        i = index.index(Ellipsis)
        fill = len(shape) - (len(index) - 1)
        index = index[:i] + (slice(None),) * fill + index[i + 1:]
    if len(index) > len(shape):
        raise CheckpointError(f"{where}: index {index!r} has more entries than the array rank {len(shape)}")
    index = index + (slice(None),) * (len(shape) - len(index))
    bounds, drop = [], []
    for ix, n in zip(index, shape, strict=True):
        if isinstance(ix, (int, np.integer)):
            i = int(ix) + (n if ix < 0 else 0)
            if not 0 <= i < n:
                raise CheckpointError(f"{where}: index {int(ix)} out of range for a dimension of size {n}")
            bounds.append((i, i + 1))
            drop.append(True)
        elif isinstance(ix, slice):
            start, stop, step = ix.indices(n)
            if step != 1:
                raise CheckpointError(f"{where}: only unit-step slices can be read lazily, got {ix!r}")
            bounds.append((start, max(start, stop)))
            drop.append(False)
        else:
            raise CheckpointError(f"{where}: unsupported index {ix!r} (use ints and unit-step slices)")
    return bounds, drop


@dataclass(frozen=True)
class ZarrArray:
    """A zarr v2 array directory opened lazily (only ``.zarray`` is read on open)."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    compressor: str | None
    order: str
    separator: str
    fill_value: Any

    @classmethod
    def open(cls, path: str) -> ZarrArray:
        path = os.fspath(path)
        meta_path = os.path.join(path, ".zarray")
        if not os.path.isdir(path):
            raise CheckpointError(f"zarr array directory {path} does not exist")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: missing .zarray metadata") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_path}: corrupt JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("zarr_format") != 2:
            raise CheckpointError(f"{meta_path}: not a zarr v2 array (zarr_format={meta.get('zarr_format')!r})")
        try:
            shape = tuple(int(s) for s in meta["shape"])
            chunks = tuple(int(c) for c in meta["chunks"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: bad shape/chunks ({e!r})") from e
        if len(chunks) != len(shape) or any(c <= 0 for c in chunks):
            raise CheckpointError(f"{meta_path}: chunks {list(chunks)} do not fit shape {list(shape)}")
        dtype = parse_zarr_dtype(meta.get("dtype"), meta_path)
        comp = meta.get("compressor")
        if comp is None:
            cid = None
        elif isinstance(comp, dict) and comp.get("id") in ("gzip", "zlib"):
            cid = comp["id"]
        else:
            raise CheckpointError(f"{meta_path}: unsupported compressor {comp!r} (gzip, zlib or null)")
        if meta.get("filters") not in (None, []):
            raise CheckpointError(f"{meta_path}: zarr filters {meta['filters']!r} are not supported")
        order = meta.get("order", "C")
        if order not in ("C", "F"):
            raise CheckpointError(f"{meta_path}: unsupported order {order!r}")
        sep = meta.get("dimension_separator", ".")
        if sep not in (".", "/"):
            raise CheckpointError(f"{meta_path}: unsupported dimension_separator {sep!r}")
        fill = _fill_value(meta.get("fill_value"), dtype, meta_path)
        return cls(path, shape, chunks, dtype, cid, order, sep, fill)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def chunk_key(self, cidx: tuple[int, ...]) -> str:
        return self.separator.join(str(i) for i in cidx) if cidx else "0"

    def _read_chunk(self, cidx: tuple[int, ...]) -> np.ndarray | None:
        fn = os.path.join(self.path, self.chunk_key(cidx))
        try:
            with open(fn, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            if self.compressor == "gzip":
                raw = gzip.decompress(raw)
            elif self.compressor == "zlib":
                raw = zlib.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise CheckpointError(f"{fn}: corrupt {self.compressor} chunk ({e})".splitlines()[0]) from e
        n = math.prod(self.chunks)
        if len(raw) != n * self.dtype.itemsize:
            raise CheckpointError(f"{fn}: chunk has {len(raw)} bytes, expected {n * self.dtype.itemsize} "
                                  f"({self.dtype.name}{list(self.chunks)})")
        dt = self.dtype.newbyteorder("<") if self.dtype.byteorder == ">" else self.dtype
        return np.frombuffer(raw, dtype=dt).reshape(self.chunks, order=self.order)

    def _read_span(self, f: Any, fn: str, b0: int, b1: int) -> bytes:
        """Bytes ``[b0, b1)`` of a chunk's decompressed payload, streaming (stops once ``b1`` is reached)."""
        if self.compressor is None:
            f.seek(b0)
            data = f.read(b1 - b0)
            if len(data) != b1 - b0:
                raise CheckpointError(f"{fn}: chunk is truncated ({b0 + len(data)} bytes, expected ≥ {b1})")
            return data
        wbits = 31 if self.compressor == "gzip" else 15
        block = 1 << 22
        d = zlib.decompressobj(wbits)
        parts, pos = [], 0
        try:
            while pos < b1:
                if d.unconsumed_tail:
                    inp = d.unconsumed_tail
                elif d.eof:  # concatenated gzip members
                    inp = d.unused_data or f.read(block)
                    if not inp:
                        break
                    d = zlib.decompressobj(wbits)
                else:
                    inp = f.read(block)
                    if not inp:
                        break
                out = d.decompress(inp, block)
                if pos + len(out) > b0:
                    parts.append(out[max(0, b0 - pos):b1 - pos])
                pos += len(out)
        except zlib.error as e:
            raise CheckpointError(f"{fn}: corrupt {self.compressor} chunk ({e})".splitlines()[0]) from e
        if pos < b1:
            raise CheckpointError(f"{fn}: chunk decompresses to {pos} bytes, expected "
                                  f"{math.prod(self.chunks) * self.dtype.itemsize} (truncated or corrupt)")
        return b"".join(parts)

    def _read_region(self, cidx: tuple[int, ...], src: tuple[slice, ...]) -> np.ndarray | None:
        """``chunk[src]`` (None if the chunk file is missing). A region smaller than the chunk is read by
        streaming only the byte span it covers (C order), so one expert of a chunk holding all experts
        costs its own bytes, not the whole decompressed chunk."""
        n = math.prod(self.chunks)
        st = [math.prod(self.chunks[k + 1:]) for k in range(len(self.chunks))]
        lo = sum(sl.start * x for sl, x in zip(src, st, strict=True))
        hi = sum((sl.stop - 1) * x for sl, x in zip(src, st, strict=True)) + 1
        if self.order != "C" or (lo == 0 and hi == n):
            chunk = self._read_chunk(cidx)
            return None if chunk is None else chunk[src]
        fn = os.path.join(self.path, self.chunk_key(cidx))
        try:
            f = open(fn, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None
        with f:
            span = self._read_span(f, fn, lo * self.dtype.itemsize, hi * self.dtype.itemsize)
        dt = self.dtype.newbyteorder("<") if self.dtype.byteorder == ">" else self.dtype
        flat = np.frombuffer(span, dtype=dt)
        return np.lib.stride_tricks.as_strided(flat, shape=tuple(sl.stop - sl.start for sl in src),
                                               strides=tuple(x * dt.itemsize for x in st), writeable=False)

    def read(self, index: Any = None, dtype: Any = None) -> np.ndarray:
        """Read the whole array, or ``index`` (ints / unit-step slices), touching only needed chunks.

        ``dtype``: cast chunk by chunk into an output of that dtype (no full-size stored-dtype copy).
        """
        bounds, drop = _normalize_index(index, self.shape, self.path)
        out_shape = tuple(b - a for a, b in bounds)
        out = np.empty(out_shape, dtype=self.dtype if dtype is None else np.dtype(dtype))
        if out.size == 0:
            return out.reshape([s for s, d in zip(out_shape, drop, strict=True) if not d])
        ranges = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(bounds, self.chunks, strict=True)]
        for cidx in itertools.product(*ranges):
            # region of this chunk in array coordinates, intersected with the request
            lo = [max(a, i * c) for (a, _), i, c in zip(bounds, cidx, self.chunks, strict=True)]
            hi = [min(b, (i + 1) * c) for (_, b), i, c in zip(bounds, cidx, self.chunks, strict=True)]
            dst = tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, bounds, strict=True))
            src = tuple(slice(l - i * c, h - i * c) for l, h, i, c in zip(lo, hi, cidx, self.chunks, strict=True))
            region = self._read_region(cidx, src)
            out[dst] = self.fill_value if region is None else region
        return out.reshape([s for s, d in zip(out_shape, drop, strict=True) if not d])

    def chunks_for(self, index: Any = None) -> int:
        """Number of chunk files a read of ``index`` touches (for tests / benchmarks)."""
        bounds, _ = _normalize_index(index, self.shape, self.path)
        return math.prod(len(range(a // c, (b - 1) // c + 1)) if b > a else 0
                         for (a, b), c in zip(bounds, self.chunks, strict=True))


def write_zarr(path: str, array: np.ndarray, chunks: tuple[int, ...] | None = None, compressor: str | None = "gzip",
               level: int = 1, skip_chunks: set[tuple[int, ...]] | None = None, pad_value: float = 0,
               separator_in_meta: bool = True) -> dict:
    """Write ``array`` as a zarr v2 directory exactly like tensorstore does for T5X; return the ``.zarray`` dict.

    Edge chunks are padded to the full chunk shape with ``pad_value`` (readers must crop);
    ``skip_chunks`` leaves chunk files out (readers must use the fill value).
    """
    array = np.asarray(array)
    chunks = tuple(int(c) for c in (chunks or array.shape or ()))
    if array.ndim == 0:
        chunks = ()
    if len(chunks) != array.ndim or any(c <= 0 for c in chunks):
        raise ValueError(f"chunks {chunks} do not fit shape {array.shape}")
    os.makedirs(path, exist_ok=True)
    meta = {"chunks": list(chunks), "compressor": None if compressor is None else {"id": compressor, "level": level},
            "dtype": zarr_dtype_name(array.dtype), "fill_value": None, "filters": None, "order": "C",
            "shape": list(array.shape), "zarr_format": 2}
    if separator_in_meta:
        meta["dimension_separator"] = "."
    with open(os.path.join(path, ".zarray"), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    grid = [range(-(-n // c)) for n, c in zip(array.shape, chunks, strict=True)]
    skip = skip_chunks or set()
    for cidx in itertools.product(*grid):
        if tuple(cidx) in skip:
            continue
        sl = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cidx, chunks, array.shape, strict=True))
        block = np.full(chunks, pad_value, dtype=array.dtype)
        block[tuple(slice(0, s.stop - s.start) for s in sl)] = array[sl]
        if block.dtype.byteorder == ">":
            block = block.byteswap().view(block.dtype.newbyteorder("<"))
        raw = block.tobytes("C")
        if compressor == "gzip":
            raw = gzip.compress(raw, compresslevel=level, mtime=0)
        elif compressor == "zlib":
            raw = zlib.compress(raw, level)
        key = ".".join(str(i) for i in cidx) if cidx else "0"
        with open(os.path.join(path, key), "wb") as f:
            f.write(raw)
    return meta
