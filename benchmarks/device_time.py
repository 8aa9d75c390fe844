"""Device time of one op the way a decode step runs it (issue 14), beside its wall time.

* **device time** (:func:`loop_time`): ``reps`` rounds over ``S`` rotated operand sets inside ONE jitted
  ``lax.fori_loop`` (static trip count), every call a separate launch, the sets together larger than the L2
  cache of this device (:func:`l2_bytes`, sized from ``device_kind``), each round's operands passed through
  ``lax.optimization_barrier`` with the loop counter so XLA cannot hoist the calls out of the loop, the outputs
  carried (never summed: no extra launches). Per call = (median loop time − the measured cost of dispatching
  and waiting for an empty jitted call) / (reps · S). Host dispatch is paid once per loop, not per call.
* **wall time** (:func:`wall_time`): one jitted call per operand set, dispatched and waited for one at a time
  (what a host-driven step sees per op: dispatch + launch + kernel).
* **trace time** (:func:`trace_time`, optional): the same loop under ``jax.profiler`` (Perfetto trace);
  the device events' total duration / calls. ``None`` where the trace has no device events (CPU).
* **copy bandwidth** (:func:`copy_bandwidth`): ``a + 1`` over bf16 buffers ≥ 2× L2, measured as device time
  (bytes read + written per second); the byte floor of a row is ``bytes / copy bandwidth``.

``smoke=True`` (CPU, interpret-mode kernels): tiny buffers, 2 rounds, 1 trial — checks the code path only.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

# L2 bytes by device kind (substring of ``device_kind``); H100/H200 as given in issue 14
_L2 = (("H200", 60 << 20), ("H100", 50 << 20), ("A100", 40 << 20), ("L4", 48 << 20), ("B200", 126 << 20))
_DEFAULT_GPU_L2 = 64 << 20
_CPU_SMOKE_L2 = 1 << 20


def l2_bytes(device: Any = None) -> int:
    """L2 size used to size the rotation (unknown GPUs: 64 MiB; CPU: 1 MiB, smoke sizes)."""
    d = device or jax.devices()[0]
    if d.platform != "gpu":
        return _CPU_SMOKE_L2
    kind = getattr(d, "device_kind", "")
    return next((v for key, v in _L2 if key in kind), _DEFAULT_GPU_L2)


def n_sets(nbytes_per_set: int, *, smoke: bool = False, lo: int = 2, hi: int = 256) -> int:
    """Operand sets to rotate so that together they hold ≥ 2× L2 (bounded)."""
    if smoke:
        return lo
    return int(min(hi, max(lo, math.ceil(2 * l2_bytes() / max(1, nbytes_per_set)))))


@dataclass(frozen=True)
class Timing:
    device_s: float            # per call, inside the jitted loop
    wall_s: float              # per call, one dispatched call at a time
    trace_s: float | None = None  # per call, device events of a profiler trace


def _looped(fn: Callable[..., Any], sets: Sequence[Any], reps: int) -> Callable[..., Any]:
    shapes = jax.eval_shape(lambda s: tuple(fn(*a) for a in s), list(sets))
    init = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), shapes)

    def run(all_sets: Any) -> Any:
        def body(i: Any, carry: Any) -> Any:
            cur, _ = jax.lax.optimization_barrier((all_sets, i))
            return tuple(fn(*a) for a in cur)

        return jax.lax.fori_loop(0, reps, body, init)

    return jax.jit(run)


_EMPTY: dict[str, float] = {}


def _empty_call_s() -> float:
    """Dispatch + wait of a trivial jitted call (subtracted once per loop)."""
    if "t" not in _EMPTY:
        f = jax.jit(lambda a: a + 1)
        a = jnp.zeros((8,), jnp.float32)
        jax.block_until_ready(f(a))
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            jax.block_until_ready(f(a))
            ts.append(time.perf_counter() - t0)
        _EMPTY["t"] = statistics.median(ts)
    return _EMPTY["t"]


def _calls_per_loop(n: int, smoke: bool) -> int:
    return 2 if smoke else max(2, -(-256 // n))


def loop_time(fn: Callable[..., Any], sets: Sequence[Any], *, smoke: bool = False, trials: int = 5) -> float:
    """Median device seconds of ONE ``fn(*set)`` inside a jitted loop over the rotated ``sets``."""
    reps = _calls_per_loop(len(sets), smoke)
    f = _looped(fn, sets, reps)
    jax.block_until_ready(f(list(sets)))  # compile + warm-up
    ts = []
    for _ in range(1 if smoke else trials):
        t0 = time.perf_counter()
        jax.block_until_ready(f(list(sets)))
        ts.append(time.perf_counter() - t0)
    return max(0.0, statistics.median(ts) - _empty_call_s()) / (reps * len(sets))


def wall_time(fn: Callable[..., Any], sets: Sequence[Any], *, smoke: bool = False) -> float:
    """Median seconds of one jitted ``fn(*set)`` dispatched and waited for alone."""
    f = jax.jit(fn)
    for s in sets[:2]:
        jax.block_until_ready(f(*s))
    ts = []
    for s in (sets[:1] if smoke else list(sets) * max(1, 20 // len(sets))):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*s))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _device_event_us(trace: dict[str, Any]) -> float | None:
    """Total duration (µs) of the kernel events of a Perfetto JSON trace: complete events on the GPU stream
    threads (``Stream #…``) of device processes (``/device:GPU…``); the device's module/op summary lines, which
    repeat the same time, are left out (all device threads only when no stream thread is named)."""
    events = trace.get("traceEvents", [])
    meta = [e for e in events if e.get("ph") == "M"]
    pids = {e.get("pid") for e in meta if e.get("name") == "process_name"
            and any(t in str(e.get("args", {}).get("name", "")) for t in ("/device:GPU", "GPU:"))}
    streams = {(e.get("pid"), e.get("tid")) for e in meta if e.get("name") == "thread_name" and e.get("pid") in pids
               and "stream" in str(e.get("args", {}).get("name", "")).lower()}
    durs = [float(e["dur"]) for e in events if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e
            and (not streams or (e.get("pid"), e.get("tid")) in streams)]
    return sum(durs) if durs else None


def trace_time(fn: Callable[..., Any], sets: Sequence[Any], *, smoke: bool = False) -> float | None:
    """Per-call device seconds from a profiler trace of the jitted loop (None: no device events, e.g. CPU)."""
    reps = _calls_per_loop(len(sets), smoke)
    f = _looped(fn, sets, reps)
    jax.block_until_ready(f(list(sets)))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(f(list(sets)))
        files = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        if not files:
            return None
        with gzip.open(files[0], "rt") as fh:
            us = _device_event_us(json.load(fh))
    return None if us is None else us * 1e-6 / (reps * len(sets))


def measure(fn: Callable[..., Any], sets: Sequence[Any], *, smoke: bool = False, trace: bool = False) -> Timing:
    """Device, wall and (optionally) trace time of one call."""
    return Timing(loop_time(fn, sets, smoke=smoke), wall_time(fn, sets, smoke=smoke),
                  trace_time(fn, sets, smoke=smoke) if trace else None)


def copy_bandwidth(*, smoke: bool = False) -> float:
    """Device copy bandwidth, bytes read + written per second (``a + 1`` on bf16 buffers ≥ 2× L2 in all)."""
    n = (1 << 16) if smoke else max(1 << 27, l2_bytes() // 2)  # elements per buffer (≥ 256 MiB on a GPU)
    sets = [(jax.random.normal(jax.random.key(i), (n,), jnp.bfloat16),) for i in range(2)]
    t = loop_time(lambda a: a + jnp.bfloat16(1), sets, smoke=smoke)
    return 2 * n * 2 / max(t, 1e-12)
