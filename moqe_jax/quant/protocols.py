"""The model as ``moqe_jax.quant`` sees it: duck-typed, so quant never imports the facade (``moqe_jax.api``)."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

__all__ = ["ModelLike", "M"]


class ModelLike(Protocol):
    """A model with a config, a params tree and a functional ``replace(params=…)`` (``moqe_jax.api.Model``)."""

    @property
    def config(self) -> Any: ...

    @property
    def params(self) -> Any: ...

    def replace(self, **changes: Any) -> Any: ...


M = TypeVar("M", bound=ModelLike)
