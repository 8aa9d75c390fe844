"""Packed weight types (the one contract, docs/ARCHITECTURE.md): `QuantSpec`, `QuantizedTensor`, `Sub1Tensor`.

This layer sits below the model and the matmul dispatch (`moqe_jax.ops`): it holds the data types and
their exact decode, never an algorithm that produces them (those live in `moqe_jax.quant`).
"""

# Importing the package registers every packed type (is_packed sees all of them).
from moqe_jax.packed.base import MaybePacked, PackedWeight, is_packed, packed_type, register_packed
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.packed.sub1 import Sub1Tensor

__all__ = ["MaybePacked", "PackedWeight", "QuantSpec", "QuantizedTensor", "Sub1Tensor", "is_packed", "packed_type",
           "register_packed"]
