"""Flax msgpack checkpoints through ``flax.serialization`` (docs/T5X_SWITCH.md §1.2).

``unpackb`` = ``flax.serialization.msgpack_restore`` (ext types ndarray / complex / numpy scalar, bfloat16,
``__msgpack_chunked_array__`` leaves reassembled) with any decoding failure turned into one
:class:`CheckpointError` line naming the file; ``packb`` = ``flax.serialization.msgpack_serialize``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moqe_jax.errors import CheckpointError

__all__ = ["unpackb", "packb", "chunk_array", "CHUNKED_KEY"]

CHUNKED_KEY = "__msgpack_chunked_array__"


def unpackb(data: bytes, where: str = "msgpack") -> Any:
    """Decode a flax msgpack byte string into nested dicts of numpy arrays / scalars / spec dicts."""
    from flax import serialization

    try:
        return serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 - OutOfData, ExtraData, FormatError, ValueError, TypeError ...
        raise CheckpointError(f"{where}: not a valid msgpack file ({type(e).__name__}: {e})".splitlines()[0]
                              + " (truncated or not a flax/T5X checkpoint)") from None


def packb(tree: Any) -> bytes:
    """Encode nested dicts of arrays/scalars with ``flax.serialization.msgpack_serialize``."""
    from flax import serialization

    return serialization.msgpack_serialize(tree)


def chunk_array(arr: np.ndarray, max_chunk_bytes: int) -> dict:
    """Flax's chunked form of a large array, with a small ``max_chunk_bytes`` so tests can force it."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    per = max(1, max_chunk_bytes // max(1, arr.dtype.itemsize))
    chunks = {str(i): flat[s:s + per] for i, s in enumerate(range(0, max(flat.size, 1), per))}
    return {CHUNKED_KEY: True, "shape": {str(i): int(d) for i, d in enumerate(arr.shape)}, "chunks": chunks}
