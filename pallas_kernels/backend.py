"""The ONE place that decides how Pallas kernels run (shared/DESIGN.md, "Kernels").

Placeholder until the kernels issue lands: reports that no GPU kernels are available, so
``moqe_jax.ops`` uses the XLA reference everywhere.
"""

from __future__ import annotations


def gpu_kernels_available() -> bool:
    return False
