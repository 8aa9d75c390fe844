"""Peak RSS of lazy T5X reads: one expert / one sparse layer vs the whole checkpoint (issue 3).

Writes a base-128-shaped fixture (E=128, D=768, F=3072, V=32128, bf16 on disk, T5X chunk rule) with
``--layers`` encoder and decoder layers (odd ones sparse; default 2+2 = 2 sparse + 2 dense) and ``--experts``
experts, then measures each read in a fresh subprocess (VmHWM minus the RSS after imports). ``--orbax`` also
writes the same parameters as an Orbax OCDBT T5X step and measures the same reads on it.

    python -m benchmarks.t5x_lazy_rss [--dir /tmp/t5x_rss] [--layers 2] [--experts 128] [--orbax] [--keep]
        [--modes index,expert,expert_ts,expert_ts_limits,layer,layer_f32,all,all_f32]

``expert_ts`` / ``expert_ts_limits`` read the same expert as one plain tensorstore read (default context /
concurrency limits 1 and no cache), to compare with the reader's one-read-per-chunk loop. The results file
is rewritten: keep its notes sections by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

MODES = {
    "index": "open the index only (msgpack + specs)",
    "expert": "read_slice(encoder/layers_1/mlp/expert/wi/kernel, 5) (one expert, stored bf16)",
    "layer": "read_layer(encoder/layers_1) (one sparse layer, stored bf16)",
    "layer_f32": "read_layer(encoder/layers_1, float32)",
    "expert_ts": "the same expert as ONE tensorstore read (default context; what the reader avoids)",
    "expert_ts_limits": "the same expert as ONE tensorstore read, data_copy/file_io concurrency 1, cache_pool 0",
    "all": "read_all() (whole checkpoint, stored bf16)",
    "all_f32": "load_t5x_params (whole checkpoint as float32, what load_model does)",
}
ORBAX_MODES = ("index", "expert", "layer", "all_f32")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    """High-water RSS of this process image (VmHWM; ru_maxrss would include the parent's peak across exec)."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, mode: str) -> None:
    import numpy as np

    from moqe_jax.checkpoint.t5x import T5XCheckpoint, load_t5x_params

    base = _rss_mb()
    t0 = time.perf_counter()
    if mode == "all_f32":
        tree = load_t5x_params(path, progress=False)
        nbytes = sum(a.nbytes for a in _leaves(tree))
    else:
        ck = T5XCheckpoint(path)
        if mode == "index":
            nbytes = 0
        elif mode == "expert":
            nbytes = ck.read_slice("encoder/layers_1/mlp/expert/wi/kernel", 5).nbytes
        elif mode.startswith("expert_ts"):  # tensorstore alone, for comparison (issue 15)
            import tensorstore as ts

            lim = {"data_copy_concurrency": {"limit": 1}, "file_io_concurrency": {"limit": 1},
                   "cache_pool": {"total_bytes_limit": 0}}
            spec = ck.info("encoder/layers_1/mlp/expert/wi/kernel").ts_spec
            t = ts.open(spec, read=True, context=ts.Context(lim if mode.endswith("limits") else {})).result()
            nbytes = t[5].read().result().nbytes
        elif mode.startswith("layer"):
            out = ck.read_layer("encoder/layers_1", np.float32 if mode == "layer_f32" else None)
            nbytes = sum(a.nbytes for a in out.values())
        else:
            nbytes = sum(a.nbytes for a in _leaves(ck.read_all(progress=False)))
    dt = time.perf_counter() - t0
    peak = _peak_mb()
    print(json.dumps({"mode": mode, "base_mb": base, "peak_mb": peak, "data_mb": nbytes / 2**20, "seconds": dt}))


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def make_fixture(directory: str, layers: int, E: int = 128, orbax: bool = False) -> str:
    import ml_dtypes
    import numpy as np

    from moqe_jax.checkpoint.t5x_writer import write_orbax_t5x, write_t5x_checkpoint

    D, F, H, K, V = 768, 3072, 12, 64, 32128
    J = H * K
    rng = np.random.default_rng(0)
    shapes = {"token_embedder/embedding": (V, D), "encoder/relpos_bias/rel_embedding": (H, 32),
              "decoder/relpos_bias/rel_embedding": (H, 32), "encoder/encoder_norm/scale": (D,),
              "decoder/decoder_norm/scale": (D,)}
    for stack in ("encoder", "decoder"):
        for i in range(layers):
            pre = f"{stack}/layers_{i}"
            attns = ["attention"] if stack == "encoder" else ["self_attention", "encoder_decoder_attention"]
            for a in attns:
                for q in ("query", "key", "value"):
                    shapes[f"{pre}/{a}/{q}/kernel"] = (D, J)
                shapes[f"{pre}/{a}/out/kernel"] = (J, D)
            for n in (["pre_attention_layer_norm"] if stack == "encoder" else
                      ["pre_self_attention_layer_norm", "pre_cross_attention_layer_norm"]) + ["pre_mlp_layer_norm"]:
                shapes[f"{pre}/{n}/scale"] = (D,)
            if i % 2:
                shapes[f"{pre}/mlp/router/router_weights/w/kernel"] = (D, E)
                shapes[f"{pre}/mlp/expert/wi/kernel"] = (E, D, F)
                shapes[f"{pre}/mlp/expert/wo/kernel"] = (E, F, D)
            else:
                shapes[f"{pre}/mlp/wi/kernel"] = (D, F)
                shapes[f"{pre}/mlp/wo/kernel"] = (F, D)

    def arrays():  # generate each array only when the writer asks for it (bounded writer memory)
        for k, s in shapes.items():
            yield k, rng.standard_normal(s, dtype=np.float32).astype(ml_dtypes.bfloat16)

    if orbax:  # orbax saves one tree (all arrays in memory at once)
        return write_orbax_t5x(directory, dict(arrays()), step=1, layout="ocdbt", item="state")
    return write_t5x_checkpoint(directory, arrays(), step=1, dtype=ml_dtypes.bfloat16, progress=True)


def main() -> None:
    from moqe_jax.checkpoint.t5x_writer import t5x_chunk_shape

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/t5x_rss_fixture")
    ap.add_argument("--layers", type=int, default=2, help="layers per stack (odd ones sparse)")
    ap.add_argument("--experts", type=int, default=128, help="experts per sparse layer (base-128: 128)")
    ap.add_argument("--orbax", action="store_true", help="also measure an Orbax OCDBT copy")
    ap.add_argument("--keep", action="store_true", help="keep the fixture")
    ap.add_argument("--modes", default="index,expert,layer,layer_f32,all,all_f32",
                    help=f"comma-separated legacy-layout reads, of: {', '.join(MODES)}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "t5x_lazy_rss.md"))
    ap.add_argument("--child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    ck = os.path.join(args.dir, "checkpoint_1")
    t0 = time.perf_counter()
    reused = os.path.exists(os.path.join(ck, "checkpoint"))
    if not reused:
        make_fixture(args.dir, args.layers, args.experts)
    write_s = time.perf_counter() - t0
    disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ck) for f in fs)
    runs = [("legacy", ck, [m for m in args.modes.split(",") if m in MODES])]
    orbax_s = orbax_disk = 0.0
    if args.orbax:
        t0 = time.perf_counter()
        ock = os.path.join(args.dir, "orbax", "1")
        if not os.path.exists(os.path.join(ock, "state", "_METADATA")):
            make_fixture(os.path.join(args.dir, "orbax"), args.layers, args.experts, orbax=True)
        orbax_s = time.perf_counter() - t0
        orbax_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ock) for f in fs)
        runs.append(("orbax-ocdbt", ock, list(ORBAX_MODES)))
    rows = []
    for layout, path, modes in runs:
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "--child", path, mode], check=True, capture_output=True,
                                 text=True, env={**os.environ, "MOQE_NO_PROGRESS": "1"})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["layout"] = layout
            rows.append(r)
            print(f"{layout:11s} {mode:10s} peak {r['peak_mb']:9.1f} MB (imports {r['base_mb']:.1f} MB) "
                  f"data {r['data_mb']:9.1f} MB {r['seconds']:7.2f} s", flush=True)
    from importlib.metadata import version

    import jax

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    E = args.experts
    lines = [
        "# Lazy T5X reading: peak RSS (benchmarks/t5x_lazy_rss.py)", "",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Machine: {platform.node()}, "
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {mem:.0f} GiB RAM, "
        f"Python {platform.python_version()}, JAX {jax.__version__} (CPU; no accelerator involved), tensorstore "
        f"{version('tensorstore')}, orbax-checkpoint {version('orbax-checkpoint')}.",
        "",
        f"Fixture: base-128 shapes with E={E} (D=768, F=3072, V=32128, H=12), {args.layers} encoder + "
        f"{args.layers} decoder layers (odd layers sparse), bf16 on disk, gzip level 1, T5X chunk rule; "
        f"{disk / 2**30:.2f} GiB on disk "
        f"({'reused from an earlier run' if reused else f'written in {write_s:.0f} s'})"
        + (f"; Orbax OCDBT copy (orbax-checkpoint, zstd) {orbax_disk / 2**30:.2f} GiB"
           + (f", written in {orbax_s:.0f} s" if orbax_s > 5 else ", reused") if args.orbax else "") + ". "
        "Each row is a fresh subprocess; "
        "`peak` = VmHWM (high-water RSS of the child), `imports` = RSS after importing numpy + the reader.", "",
        "| layout | read | peak RSS (MB) | after imports (MB) | peak - imports (MB) | data returned (MB) | time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['layout']} | {MODES[r['mode']]} | {r['peak_mb']:.0f} | {r['base_mb']:.0f} | "
                     f"{r['peak_mb'] - r['base_mb']:.0f} | {r['data_mb']:.0f} | {r['seconds']:.1f} |")
    lines += ["", "Reading touches only the zarr chunks of the requested parameters (tensorstore decodes one chunk "
              "at a time into a preallocated output), so peak memory tracks the bytes returned, not the checkpoint "
              "size. Orbax layouts read whole parameters and layers through orbax-checkpoint (a partial restore of "
              "just those leaves) and slices through the same chunk-by-chunk tensorstore path. "
              f"With T5X's 64 MiB chunk rule the expert axis is not split ([128, 768, 3072] bf16 -> chunks "
              f"{list(t5x_chunk_shape((E, 768, 3072), 2))}); a region smaller than a chunk costs the "
              "whole chunk's decompression (tensorstore decodes chunks whole), so one expert costs its own bytes "
              "plus one compressed and one decoded chunk.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
