"""The model as ``moqe_jax.quant`` sees it: duck-typed, so quant never imports the facade (``moqe_jax.api``)."""

from __future__ import annotations

from typing import Any, Protocol, Self, TypeVar

__all__ = ["ModelLike", "M"]


class ModelLike(Protocol):
    """A model with a config, a params tree and a functional ``replace(params=…)`` (``moqe_jax.api.Model``
    satisfies it: mypy checks that at ``moqe_jax.pipeline``)."""

    @property
    def config(self) -> Any: ...

    @property
    def params(self) -> Any: ...

    def replace(self, *, params: Any) -> Self: ...


M = TypeVar("M", bound=ModelLike)
