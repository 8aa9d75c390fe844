"""Multi-host start-up: ``jax.distributed.initialize`` from flags, environment variables or the cluster.

Every process of a multi-host job runs the same command; before JAX touches a device each calls
:func:`maybe_init_distributed`, which decides from (first match wins per setting):

* flags: ``--coordinator HOST:PORT``, ``--num-processes N``, ``--process-id I`` (``moqe train``/``compress``);
* environment: ``MOQE_COORDINATOR`` (or JAX's own ``JAX_COORDINATOR_ADDRESS``), ``MOQE_NUM_PROCESSES``
  (or ``JAX_NUM_PROCESSES``), ``MOQE_PROCESS_ID`` (or ``JAX_PROCESS_ID``);
* the cluster, detected from its environment only (no network query): SLURM (``srun``: ``SLURM_JOB_ID``,
  ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``), Open MPI
  (``OMPI_MCA_orte_hnp_uri``, ``OMPI_COMM_WORLD_SIZE``/``_RANK``) and Cloud TPU pods (``TPU_WORKER_HOSTNAMES``
  or ``TPU_PROCESS_ADDRESSES`` listing more than one host, or ``MEGASCALE_COORDINATOR_ADDRESS``). JAX's own
  cluster code then fills in what the flags left open (the SLURM coordinator is the first node of the step).

``MOQE_DISTRIBUTED`` (or ``mode``): ``auto`` (default) initializes when the explicit settings are complete or
a multi-process cluster is detected; ``on`` always calls ``jax.distributed.initialize`` (JAX's full
auto-detection, e.g. a GCE TPU VM's metadata server); ``off`` never does. A half-configured start (a
coordinator without a process count, an id out of range, settings given with ``off``) is one `ConfigError`
naming the missing flag/variable, raised before anything is computed. Launch recipes: docs/LAUNCH.md.

On CPU the cross-process collectives are gloo's (``jax_cpu_collectives_implementation``, JAX's default in
0.10; set explicitly here unless the user chose another).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import jax

from moqe_jax.errors import ConfigError, MoqeError

__all__ = ["maybe_init_distributed", "resolve_distributed", "DistributedSettings", "detect_cluster",
           "describe_processes"]

_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class DistributedSettings:
    """What :func:`maybe_init_distributed` will pass to ``jax.distributed.initialize`` (``None`` = JAX's
    cluster detection fills it in). ``cluster``: the detected cluster (``slurm``, ``ompi``, ``tpu``) or None."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    cluster: str | None
    cluster_processes: int | None


def _env(environ: Mapping[str, str], *names: str) -> tuple[str | None, str | None]:
    for n in names:
        v = environ.get(n)
        if v is not None and v.strip() != "":
            return v.strip(), n
    return None, None


def _int_setting(value: int | str | None, flag: str, env_names: tuple[str, ...], environ: Mapping[str, str],
                 ) -> int | None:
    src = flag
    if value is None:
        value, src = _env(environ, *env_names)  # type: ignore[assignment]
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{src}={value!r}: expected an integer") from None


def detect_cluster(environ: Mapping[str, str] | None = None) -> tuple[str | None, int | None]:
    """``(name, process count)`` of the multi-process launcher this process runs under, from its environment
    only (``(None, None)`` outside one). The count is None where only JAX's own detection can tell."""
    env = os.environ if environ is None else environ
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                              "SLURM_LOCALID")):
        try:
            return "slurm", int(env["SLURM_NTASKS"])
        except ValueError:
            raise ConfigError(f"SLURM_NTASKS={env['SLURM_NTASKS']!r}: expected an integer") from None
    if "OMPI_MCA_orte_hnp_uri" in env:
        n = env.get("OMPI_COMM_WORLD_SIZE")
        return "ompi", int(n) if n and n.isdigit() else None
    hosts, _ = _env(env, "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
    if hosts is not None and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "tpu", len([h for h in hosts.split(",") if h.strip()])
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu", None
    return None, None


def resolve_distributed(coordinator: str | None = None, num_processes: int | None = None,
                        process_id: int | None = None, mode: str | None = None,
                        environ: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """The settings a multi-process start would use, or None for a single-process run. Pure (reads only
    ``environ``, default ``os.environ``); raises `ConfigError` for a half-configured start."""
    env = os.environ if environ is None else environ
    mode_v, mode_src = (mode, "mode") if mode is not None else _env(env, "MOQE_DISTRIBUTED")
    mode_v = (mode_v or "auto").lower()
    if mode_v not in _MODES:
        raise ConfigError(f"{mode_src}={mode_v!r}: use auto, on or off")
    coord_src = "--coordinator"
    if coordinator is None:
        coordinator, coord_src = _env(env, "MOQE_COORDINATOR", "JAX_COORDINATOR_ADDRESS")  # type: ignore[assignment]
    n = _int_setting(num_processes, "--num-processes", ("MOQE_NUM_PROCESSES", "JAX_NUM_PROCESSES"), env)
    pid = _int_setting(process_id, "--process-id", ("MOQE_PROCESS_ID", "JAX_PROCESS_ID"), env)
    explicit = [name for name, v in (("--coordinator/MOQE_COORDINATOR", coordinator),
                                     ("--num-processes/MOQE_NUM_PROCESSES", n),
                                     ("--process-id/MOQE_PROCESS_ID", pid)) if v is not None]
    if mode_v == "off":
        if explicit:
            raise ConfigError(f"MOQE_DISTRIBUTED=off but {', '.join(explicit)} given: unset MOQE_DISTRIBUTED "
                              "or drop the multi-host settings")
        return None
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"{coord_src}={coordinator!r}: expected HOST:PORT of process 0 (e.g. node001:12355)")
    if n is not None and n < 1:
        raise ConfigError(f"--num-processes/MOQE_NUM_PROCESSES={n}: must be >= 1")
    if pid is not None and (pid < 0 or (n is not None and pid >= n)):
        raise ConfigError(f"--process-id/MOQE_PROCESS_ID={pid} is outside 0..{(n or 1) - 1} "
                          f"(--num-processes {n}): number the processes 0..N-1")
    cluster, cluster_n = detect_cluster(env)
    if n is not None and cluster_n is not None and n != cluster_n:
        raise ConfigError(f"--num-processes/MOQE_NUM_PROCESSES={n} but the {cluster} launcher started {cluster_n} "
                          "processes: drop the setting or launch that many tasks")
    if cluster is None and mode_v == "auto":
        if not explicit:
            return None
        missing = [name for name in ("--coordinator/MOQE_COORDINATOR", "--num-processes/MOQE_NUM_PROCESSES",
                                     "--process-id/MOQE_PROCESS_ID") if name not in explicit]
        if missing:
            raise ConfigError(f"multi-host start is half-configured: {', '.join(explicit)} given but "
                              f"{' and '.join(missing)} missing (no SLURM/Open MPI/Cloud TPU launcher detected to "
                              "fill them in); give all three on every process, see docs/LAUNCH.md")
    if cluster is not None and mode_v == "auto" and not explicit and cluster_n == 1:
        return None  # e.g. `srun -n 1`: one process, nothing to coordinate
    return DistributedSettings(coordinator, n, pid, cluster, cluster_n)


def maybe_init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, mode: str | None = None,
                           timeout_s: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when flags, environment or the cluster ask for a multi-process run
    (see the module docstring); returns True when this process is part of one. Must run before any JAX
    computation. ``timeout_s`` (or ``MOQE_DISTRIBUTED_TIMEOUT``): how long to wait for the other processes
    (JAX's default 300 s)."""
    if jax.distributed.is_initialized():
        return True
    st = resolve_distributed(coordinator, num_processes, process_id, mode)
    if st is None:
        return False
    if timeout_s is None:
        t = _int_setting(None, "MOQE_DISTRIBUTED_TIMEOUT", ("MOQE_DISTRIBUTED_TIMEOUT",), os.environ)
        timeout_s = 300 if t is None else t
    try:  # CPU cross-process collectives (no effect on GPU/TPU clients); must not touch the backend yet
        if getattr(jax.config, "jax_cpu_collectives_implementation", None) is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
        pass
    where = f"coordinator {st.coordinator}" if st.coordinator else f"the {st.cluster or 'JAX-detected'} cluster"
    try:
        jax.distributed.initialize(coordinator_address=st.coordinator, num_processes=st.num_processes,
                                   process_id=st.process_id, initialization_timeout=int(timeout_s))
    except RuntimeError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "before" in msg and "comput" in msg:
            raise ConfigError("jax.distributed.initialize must run before any JAX computation: call "
                              "maybe_init_distributed first thing in the program") from e
        raise MoqeError(f"multi-host start via {where} failed ({msg}); check that all "
                        f"{st.num_processes or st.cluster_processes or 'N'} processes were started with the same "
                        "coordinator and that process 0's HOST:PORT is reachable (docs/LAUNCH.md)") from e
    except ValueError as e:  # JAX's own check: e.g. `on` outside any cluster without a coordinator
        raise ConfigError(f"multi-host start via {where}: {e} (give --coordinator/--num-processes/--process-id "
                          "or MOQE_COORDINATOR/MOQE_NUM_PROCESSES/MOQE_PROCESS_ID, see docs/LAUNCH.md)") from e
    return True


def describe_processes() -> str:
    """One line: ``process I/N, D devices (L local)`` (for logs)."""
    return (f"process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices "
            f"({jax.local_device_count()} local, {jax.default_backend()})")

