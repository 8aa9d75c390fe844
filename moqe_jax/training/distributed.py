"""Multi-host start-up: ``jax.distributed.initialize`` from flags or environment variables."""

from __future__ import annotations

import os

import jax

__all__ = ["maybe_init_distributed"]


def maybe_init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """``jax.distributed.initialize`` when asked by flags or ``MOQE_COORDINATOR``/``MOQE_NUM_PROCESSES``/
    ``MOQE_PROCESS_ID`` (or JAX's own cluster auto-detection via ``MOQE_DISTRIBUTED=auto``)."""
    coordinator = coordinator or os.environ.get("MOQE_COORDINATOR")
    if num_processes is None and os.environ.get("MOQE_NUM_PROCESSES"):
        num_processes = int(os.environ["MOQE_NUM_PROCESSES"])
    if process_id is None and os.environ.get("MOQE_PROCESS_ID"):
        process_id = int(os.environ["MOQE_PROCESS_ID"])
    if coordinator is None and os.environ.get("MOQE_DISTRIBUTED") != "auto":
        return False
    if jax.distributed.is_initialized():
        return True
    try:  # CPU cross-process collectives (no effect on GPU/TPU clients); must not touch the backend yet
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
        pass
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    return True
