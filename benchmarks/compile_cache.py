"""First-call time of ``Model.generate`` in a new process: no cache vs JAX's persistent compilation cache.

Each measurement is a fresh Python process (what a user's next ``moqe`` run or script is): load the model,
then time the first ``generate`` call of each (engine, batch) bucket — tracing, lowering and compilation (or
the cache load) plus the run itself — and, for reference, a second call of the same shape (the run alone).
Variants per round, in this order: ``off`` (no persistent cache), ``cold`` (``enable_compilation_cache`` into
an empty directory: compiles and writes), ``warm`` (the same directory again: loads). Medians over rounds;
each round uses a new directory.

    python -m benchmarks.compile_cache [--models bundled,base8] [--rounds 3] [--out compile_cache_cpu]

Results: ``benchmarks/results/<out>.{md,json}`` (device, JAX version, date); notes in compile_cache_notes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("moqe-dropless", "moqe-int4")
BATCHES = (1, 8)
NEW = 32
VARIANTS = ("off", "cold", "warm")


def _child(model: str, cache: str) -> None:
    """One process: ``{engine/batch: [first call s, second call s]}`` as JSON on the last stdout line."""
    import jax  # noqa: F401 - imported before the clock starts in every variant, so load_s is the load alone

    if cache != "off":
        import moqe_jax

        assert moqe_jax.enable_compilation_cache(cache) is not None
    from benchmarks.generate import engine_model, inputs, load_float_model

    t0 = time.perf_counter()
    base = load_float_model(model)
    out: dict[str, list[float]] = {"load_s": [time.perf_counter() - t0]}
    for engine in ENGINES:
        m = engine_model(base, engine)
        for b in BATCHES:
            ids, mask = inputs(model, m.config, b)
            times = []
            for _ in range(2):
                t = time.perf_counter()
                m.generate(ids, NEW, attention_mask=mask, min_new_tokens=NEW)  # returns host NumPy (synchronous)
                times.append(time.perf_counter() - t)
            out[f"{engine}/b{b}"] = times
    print(json.dumps(out), flush=True)


def _spawn(model: str, cache: str) -> dict[str, list[float]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOQE_COMPILATION_CACHE", "JAX_COMPILATION"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-m", "benchmarks.compile_cache", "--child", model, cache], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child {model}/{cache} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _write(out: str, meta: dict, rounds: int) -> None:
    """The table: per (model, engine, batch) the compile overhead of the first call (first − second call of
    the same shape, both in the same process) per variant, medians over rounds."""
    from benchmarks.common import write_results

    rows = []
    for model, by_v in meta["raw"].items():
        for key in [k for k in by_v["off"][0] if k != "load_s"]:
            over = {v: statistics.median(x[key][0] - x[key][1] for x in by_v[v]) for v in VARIANTS}
            first = {v: statistics.median(x[key][0] for x in by_v[v]) for v in VARIANTS}
            run_s = statistics.median(x[key][1] for v in VARIANTS for x in by_v[v])
            engine, b = key.split("/")
            rows.append([model, engine, b[1:], round(first["off"], 2), round(first["warm"], 2), round(over["off"], 2),
                         round(over["cold"], 2), round(over["warm"], 2), round(over["off"] / over["warm"], 1),
                         round(run_s, 3)])
    notes = (f"A new process's first `generate` call ({NEW} new tokens, greedy), seconds, median of {rounds} rounds "
             "(a fresh process each). `first`: the whole first call; `overhead`: first call minus a second call of "
             "the same shape in the same process (tracing, lowering, compilation or the cache load). off: no "
             "persistent cache; cold: `enable_compilation_cache` into an empty directory (compile + write); warm: "
             "the same directory in the next process (load). `run s`: the second call. Regenerate: "
             f"`python -m benchmarks.compile_cache`. Wall {meta.get('wall_s')} s.")
    write_results(out, "Compile time of a new process: persistent compilation cache",
                  ["model", "engine", "batch", "first off s", "first warm s", "overhead off s", "overhead cold s",
                   "overhead warm s", "overhead off / warm", "run s"], rows, meta, notes)


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bundled,base8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="result name (default compile_cache_<platform>)")
    p.add_argument("--rewrite", metavar="JSON", help="rewrite the table from a saved run's .json (no measuring)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "CACHE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(*a.child)
        return 0
    import jax

    from benchmarks.common import device_info

    if a.rewrite:  # the table again from a saved run's raw times
        saved = json.loads(Path(a.rewrite).read_text())["meta"]
        _write(a.out or Path(a.rewrite).stem, saved, saved["rounds"])
        return 0
    meta = {**device_info(), "cpu_count": os.cpu_count(), "rounds": a.rounds, "new_tokens": NEW}
    t_start = time.perf_counter()
    raw: dict[str, dict[str, list[dict]]] = {}
    for model in a.models.split(","):
        raw[model] = {v: [] for v in VARIANTS}
        for r in range(a.rounds):
            with tempfile.TemporaryDirectory() as d:
                for v in VARIANTS:
                    res = _spawn(model, "off" if v == "off" else d)
                    raw[model][v].append(res)
                    print(f"{time.perf_counter() - t_start:7.1f}s {model} round {r} {v}: "
                          + ", ".join(f"{k} {x[0]:.2f}" for k, x in res.items()), flush=True)
    meta["wall_s"] = round(time.perf_counter() - t_start)
    meta["raw"] = raw
    _write(a.out or f"compile_cache_{jax.devices()[0].platform}", meta, a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
