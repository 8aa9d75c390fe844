"""Timing helpers and the results writer shared by the benchmarks (the method: CONTRIBUTING.md, "GPU checks").

* Several weight sets are rotated inside one jitted call (enough bytes to overflow L2), each with its own
  activation so XLA cannot merge the dots; the time of one op = call time / number of sets.
* Calls are queued asynchronously ``reps`` times and the queue is drained once (host dispatch overlaps the
  device work), repeated ``trials`` times; the median trial is reported. Warm-up (compile) is excluded.
* Results go to ``benchmarks/results/<name>.md`` and ``.json`` with device name, jax version and date.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

RESULTS_DIR = Path(os.environ.get("MOQE_BENCH_OUT", Path(__file__).parent / "results"))
L2_BYTES = 50 * 2**20  # H100 SXM L2; used only to size the rotation so the working set overflows it


def device_info() -> dict[str, Any]:
    d = jax.devices()[0]
    return {"device": getattr(d, "device_kind", str(d)), "platform": d.platform, "jax": jax.__version__,
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node()}


def n_sets_for(nbytes: int, *, quick: bool = False, lo: int = 2, hi: int = 64) -> int:
    """How many weight sets to rotate so that they hold ≥ 3× L2 (bounded)."""
    if quick:
        return lo
    return int(min(hi, max(lo, math.ceil(3 * L2_BYTES / max(1, nbytes)))))


def time_rotated(fn: Callable[..., Any], sets: Sequence[Any], *, reps: int = 10, trials: int = 5,
                 quick: bool = False) -> float:
    """Median seconds of ONE ``fn(*set)`` over rotating ``sets`` (all run inside one jitted call)."""
    def many(all_sets):
        return tuple(fn(*s) for s in all_sets)

    jf = jax.jit(many)
    jax.block_until_ready(jf(sets))  # compile + warm-up
    jax.block_until_ready(jf(sets))
    if quick:
        reps, trials = 1, 1
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        out = None
        for _ in range(reps):
            out = jf(sets)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / (reps * len(sets)))
    return statistics.median(times)


def copy_bandwidth(quick: bool = False) -> float:
    """Measured device copy bandwidth, bytes read + written per second (a large elementwise pass)."""
    n = (1 << 16) if quick else (1 << 29)  # 1 GiB of bf16
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    sets = [(x,)]
    t = time_rotated(lambda a: a + jnp.bfloat16(1), sets, reps=10, trials=5, quick=quick)
    return 2 * n * 2 / t


def write_results(name: str, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                  meta: dict[str, Any], notes: str = "") -> Path:
    """Write ``<name>.md`` (a table with device/jax/date) and ``<name>.json``; print the table."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"device: {meta.get('device')} ({meta.get('platform')}), jax {meta.get('jax')}, "
             f"{meta.get('date')}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in r) + " |")
    text = "\n".join(lines) + "\n"
    md = RESULTS_DIR / f"{name}.md"
    md.write_text(text)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"meta": meta, "header": list(header),
                                                          "rows": [list(r) for r in rows]}, indent=1))
    print(text, flush=True)
    return md


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
