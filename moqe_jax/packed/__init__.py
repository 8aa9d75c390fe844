"""Packed weight types (the one contract, docs/ARCHITECTURE.md): `QuantSpec`, `QuantizedTensor`, `Sub1Tensor`.

This layer sits below the model and the matmul dispatch (`moqe_jax.ops`): it holds the data types and
their exact decode, never an algorithm that produces them (those live in `moqe_jax.quant`).
"""
