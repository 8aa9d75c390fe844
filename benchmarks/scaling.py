"""Scaling of the train step over 1, 2, 4, 8 devices of a mesh with an ``expert`` axis (issue 18 item 4).

For each device count D a child process is started with ``XLA_FLAGS=--xla_force_host_platform_device_count=D``
(the flag must be set before jax is imported) and the mesh ``expert=D`` (the batch is split over data×expert,
the 8 experts over ``expert``). Two regimes:

* weak scaling: fixed work per device (``--rows`` rows per device, global batch = rows × D);
* strong scaling: fixed total work (``--global-rows`` rows in all, rows per device = global / D).

Per point: the median step time over ``--rounds`` rounds of ``--steps`` steps (compile and one warm-up step
excluded), tokens/s, and per-device memory from the compiled step's ``memory_analysis()`` (arguments =
params + optimizer state + batch shard, temporaries, outputs minus donated aliases). The step is the one
``moqe_jax.training.train`` runs (same sharding rules, optimizer and loss).

    python -m benchmarks.scaling                    # CPU: 1,2,4,8 forced devices -> results/scaling_cpu.*
    python -m benchmarks.scaling --devices 1 --out scaling_gpu    # one real accelerator (gpu_all.sh stage)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _config(args: argparse.Namespace) -> Any:
    from moqe_jax.config import SwitchConfig

    return SwitchConfig.preset("tiny", dtype="float32", vocab_size=args.vocab, d_model=args.d_model,
                               d_ff=args.d_ff, num_experts=args.experts)


def _point(cfg: Any, ndev: int, rows: int, args: argparse.Namespace) -> dict:
    """Time and memory of the train step for ``rows`` global rows on an ``expert=ndev`` mesh."""
    import jax
    import jax.numpy as jnp

    from moqe_jax import sharding as shd
    from moqe_jax.model.switch import init_params
    from moqe_jax.training import SyntheticData, TrainConfig
    from moqe_jax.training.loop import _compiled  # the exact step `train` runs

    tc = TrainConfig(steps=1, batch_size=rows, mesh={"expert": ndev}, warmup_steps=10, log_every=1000,
                     eval_every=0, save_every=0)
    mesh = shd.make_mesh(tc.mesh)
    tx, jstep, _, state_shard = _compiled(cfg, tc, mesh)
    params = jax.jit(lambda: init_params(cfg, 0), out_shardings=state_shard["params"])()
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params),
             "rng": jax.random.key_data(jax.random.PRNGKey(0))}
    state = jax.device_put(state, state_shard)
    data = SyntheticData(cfg.vocab_size, rows, args.length, seed=0)
    batches = [shd.shard_batch(data.batch(i), mesh) for i in range(args.steps)]
    t0 = time.perf_counter()
    compiled = jstep.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    mem = {k: int(getattr(ma, k, 0) or 0) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                  "temp_size_in_bytes", "alias_size_in_bytes")} if ma else {}
    state, m = jstep(state, batches[0])  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for b in batches:
            state, m = jstep(state, b)
        jax.block_until_ready((state, m))
        times.append((time.perf_counter() - t0) / len(batches))
    step_s = statistics.median(times)
    tokens = rows * args.length
    peak = (mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0)
            + mem.get("temp_size_in_bytes", 0) - mem.get("alias_size_in_bytes", 0)) if mem else None
    return {"devices": ndev, "rows": rows, "rows_per_device": rows // ndev, "step_ms": step_s * 1e3,
            "step_ms_rounds": [t * 1e3 for t in times], "tokens_per_s": tokens / step_s, "compile_s": compile_s,
            "loss": float(m["loss"]), "mem": mem, "peak_bytes_per_device": peak,
            "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform}


def _child(args: argparse.Namespace) -> None:
    import jax

    ndev = args.child
    assert jax.device_count() >= ndev, (jax.devices(), ndev)
    cfg = _config(args)
    out = {"weak": _point(cfg, ndev, args.rows * ndev, args),
           "strong": _point(cfg, ndev, args.global_rows, args)}
    print("RESULT" + json.dumps(out), flush=True)


def _plot(points: dict[str, list[dict]], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for regime, pts in points.items():
        d = [p["devices"] for p in pts]
        a1.plot(d, [p["step_ms"] for p in pts], "o-", label=f"{regime} scaling")
        a2.plot(d, [p["peak_bytes_per_device"] / 2**20 for p in pts], "o-", label=f"{regime} scaling")
    for a, yl in ((a1, "median step time (ms)"), (a2, "per-device memory (MiB, compiled analysis)")):
        a.set_xscale("log", base=2)
        a.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        a.set_xlabel("devices (mesh expert=D)")
        a.set_ylabel(yl)
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="1,2,4,8", help="device counts (default 1,2,4,8)")
    p.add_argument("--rows", type=int, default=8, help="weak scaling: rows per device (default 8)")
    p.add_argument("--global-rows", type=int, default=32, help="strong scaling: rows in all (default 32)")
    p.add_argument("--length", type=int, default=32, help="tokens per row (encoder; decoder = half)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--out", default="scaling_cpu", help="result name under benchmarks/results (MOQE_BENCH_OUT)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args)
        return 0

    from benchmarks.common import RESULTS_DIR, write_results

    devs = [int(d) for d in args.devices.split(",")]
    load0 = os.getloadavg()[0]
    t_start = time.time()
    res: dict[int, dict] = {}
    for d in devs:
        env = dict(os.environ, MOQE_NO_PROGRESS="1")
        if d > 1 or env.get("JAX_PLATFORMS", "") == "cpu":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={d}").strip()
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", str(d)] + [
            a for a in (argv if argv is not None else sys.argv[1:])]
        r = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-4000:], file=sys.stderr)
            return 1
        res[d] = json.loads(r.stdout.split("RESULT", 1)[1])
        print(f"devices {d}: weak {res[d]['weak']['step_ms']:.1f} ms, strong {res[d]['strong']['step_ms']:.1f} ms",
              flush=True)
    load1 = os.getloadavg()[0]

    import jax

    from benchmarks.common import device_info

    meta = device_info()
    first = res[devs[0]]["weak"]
    meta.update(device=first["device_kind"], platform=first["platform"], cpus=os.cpu_count(),
                wall_s=round(time.time() - t_start), load_start=load0, load_end=load1, jax=jax.__version__,
                config={"d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts, "vocab": args.vocab,
                        "layers": "2+2 (tiny: sparse every other)", "length": args.length, "dtype": "float32",
                        "optimizer": "adafactor"},
                steps=args.steps, rounds=args.rounds)
    header = ["regime", "devices", "global rows", "rows/device", "median step ms", "tokens/s",
              "speed-up vs 1", "efficiency", "args MiB/dev", "temp MiB/dev", "peak MiB/dev"]
    rows = []
    points: dict[str, list[dict]] = {"weak": [], "strong": []}
    for regime in ("weak", "strong"):
        base = res[devs[0]][regime]
        for d in devs:
            pt = res[d][regime]
            points[regime].append(pt)
            if regime == "weak":  # same work per device: ideal = same step time, D× the tokens/s
                speed = pt["tokens_per_s"] / base["tokens_per_s"]
            else:  # same total work: ideal = step time / D
                speed = base["step_ms"] / pt["step_ms"]
            mem = pt["mem"]
            rows.append([regime, d, pt["rows"], pt["rows_per_device"], round(pt["step_ms"], 2),
                         round(pt["tokens_per_s"]), round(speed, 2), round(speed / (d / devs[0]), 2),
                         round(mem.get("argument_size_in_bytes", 0) / 2**20, 2),
                         round(mem.get("temp_size_in_bytes", 0) / 2**20, 2),
                         round((pt["peak_bytes_per_device"] or 0) / 2**20, 2)])
    cpu = first["platform"] == "cpu"
    png = RESULTS_DIR / f"{args.out}.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plotted = _plot(points, png, f"train step, {args.experts}-expert MoE (d_model {args.d_model}), "
                                 f"{meta['device']}, jax {jax.__version__}, {meta['date']}")
    notes = [
        f"Train step (`moqe_jax.training.train`'s compiled step: loss, grads, Adafactor update) of a small MoE "
        f"(tiny preset: 2+2 layers, sparse every other; d_model {args.d_model}, d_ff {args.d_ff}, "
        f"{args.experts} experts, vocab {args.vocab}, float32), {args.length} encoder tokens per row, on the mesh "
        f"`expert=D` (experts split over D devices, the batch over data×expert). Median of {args.rounds} rounds "
        f"of {args.steps} steps each, compile and one warm-up step excluded. Memory: the compiled step's "
        "`memory_analysis()` per device (args = params + optimizer state + batch shard; peak = args + outputs + "
        "temporaries − donated aliases). Regenerate: `python -m benchmarks.scaling`.",
        "",
        f"Weak scaling: {args.rows} rows per device (global batch grows with D); ideal: flat step time, "
        f"efficiency 1. Strong scaling: {args.global_rows} rows in all; ideal: step time / D.",
        "",
    ]
    if cpu:
        notes += [
            f"**What these CPU numbers mean.** This machine has {os.cpu_count()} CPU cores; the D devices are "
            "XLA:CPU host devices forced by `--xla_force_host_platform_device_count=D` in ONE process, so they "
            f"share those {os.cpu_count()} cores and one memory bus, and their collectives are memory copies. The "
            "step times therefore do not measure the speed-up a real mesh would give: beyond "
            f"{os.cpu_count()} devices more devices cannot run more work at once, so weak-scaling step time "
            "grows with D (the total work grows) and strong-scaling time cannot fall below the 2-core time; "
            "what they do show is the partitioning overhead (the per-device programs, the all-to-all/"
            "all-reduce copies) added to the same total work. The per-device memory column is what the "
            "compiler allocates per device for this sharding and is meaningful as is: it shows which tensors "
            "shrink with the mesh (experts, optimizer slots and the batch split over `expert`) and which stay "
            "replicated (embeddings, attention, router, norms: the floor at large D).",
            "",
            f"The machine was shared with other jobs during the run (1-min load average {load0:.1f} at start, "
            f"{load1:.1f} at end), so the times carry that noise; memory numbers are not affected.",
            "",
        ]
    lo, hi = devs[0], devs[-1]
    arg = {d: res[d]["weak"]["mem"].get("argument_size_in_bytes", 0) / 2**20 for d in devs}
    tmp_w = [res[d]["weak"]["mem"].get("temp_size_in_bytes", 0) / 2**20 for d in devs]
    tmp_s = {d: res[d]["strong"]["mem"].get("temp_size_in_bytes", 0) / 2**20 for d in devs}
    l_s = [res[d]["strong"]["loss"] for d in devs]
    notes += [
        f"Read from this run: the arguments per device (params + optimizer state + batch shard) fall from "
        f"{arg[lo]:.2f} MiB on {lo} device(s) to {arg[hi]:.2f} MiB on {hi}: the experts and their optimizer "
        "slots split over `expert`, the rest (embeddings, attention, router, norms) stays replicated and is the "
        f"floor. Weak scaling keeps the temporaries (activations) per device flat ({min(tmp_w):.2f}–"
        f"{max(tmp_w):.2f} MiB), strong scaling divides them ({tmp_s[lo]:.2f} → {tmp_s[hi]:.2f} MiB, ideal "
        f"{tmp_s[lo] * lo / hi:.2f}), as expected when no activation is gathered whole onto one device. "
        "With the same global batch the "
        f"loss of the timed step is the same on every mesh (strong scaling: {min(l_s):.6f}–{max(l_s):.6f}).",
        "",
    ]
    notes.append(f"Plot: `{png.name}`." if plotted else "Plot: not written (matplotlib is not installed in this "
                                                         "environment).")
    write_results(args.out, f"Train-step scaling over a mesh with an expert axis ({args.out})", header, rows,
                  {**meta, "points": {d: res[d] for d in devs}}, notes="\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
