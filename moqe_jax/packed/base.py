"""The one packed-weight contract (docs/ARCHITECTURE.md, "The one contract").

Every packed weight type (``QuantizedTensor``, ``Sub1Tensor``) implements :class:`PackedWeight` and is
registered with :func:`register_packed` under a stable name. Consumers ask :func:`is_packed` and
dispatch on the type (never on a class-name string); checkpoint I/O finds the class for a stored
``meta["type"]`` with :func:`packed_type`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, TypeVar, runtime_checkable

import jax

__all__ = ["PackedWeight", "PackedView", "MaybePacked", "is_packed", "register_packed", "packed_type", "packed_types"]


@runtime_checkable
class PackedWeight(Protocol):
    """A weight stored in a compressed form that decodes exactly to a float ``[*batch, K, N]`` array."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    @property
    def k(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def dequantize(self, dtype: Any = None) -> jax.Array: ...

    def to_arrays(self) -> tuple[dict[str, Any], dict[str, Any]]: ...

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], meta: dict[str, Any]) -> PackedWeight: ...


class PackedView:
    """What every packed type derives from its logical ``shape`` and stored ``nbytes`` (one definition)."""

    __slots__ = ()

    @property
    def shape(self) -> tuple[int, ...]:  # each packed type defines its logical shape
        raise NotImplementedError

    @property
    def nbytes(self) -> int:  # each packed type defines its stored bytes
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / max(1, self.size)


#: A weight argument of the matmul ops and the model: a plain array or a packed weight.
MaybePacked = jax.Array | PackedWeight

_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_packed(name: str):
    """Class decorator: register a packed type under ``name`` (the ``meta["type"]`` written to checkpoints)."""

    def deco(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"packed type name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = cls
        return cls

    return deco


def is_packed(x: Any) -> bool:
    """True for an instance of any registered packed weight type."""
    return isinstance(x, tuple(_REGISTRY.values()))


def packed_type(name: str) -> type:
    """The registered class for a stored type name; KeyError names the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown packed weight type {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def packed_types() -> dict[str, type]:
    return dict(_REGISTRY)
