"""End-to-end generation: tokens/s and per-token latency of ``Model.generate`` vs Hugging Face transformers.

Engines (same weights, greedy, exactly ``new`` tokens per row: ``min_new_tokens = max_new_tokens`` in both
libraries, so every engine does the same number of decode steps):

* ``moqe-t5x``: float weights, Flaxformer capacity routing (``routing_mode="t5x"``, unbucketed);
* ``moqe-dropless``: float weights, dropless active-expert routing (the generate default);
* ``moqe-int4`` / ``moqe-int2`` / ``moqe-ternary``: RTN experts (MoQE channel-wise), dropless;
* ``moqe-sub1``: the ternary experts in QMoE's sub-1-bit code (``Sub1Tensor``), dropless;
* ``hf-1t`` / ``hf-2t``: ``transformers.SwitchTransformersForConditionalGeneration`` (torch CPU, float32) with our
  weights (``moqe_jax.checkpoint.hf_export.hf_state_dict``, the reverse of the loader's HF name map), 1 and 2
  torch threads. Its logits are checked against ours (``routing_mode="hf"``) before any timing.

Per (model, batch, new tokens) the engines run interleaved (round r runs every engine once, in a rotated order),
``rounds`` times; the median is reported. The first call of each shape (compile for moqe, warm-up for HF) is
timed separately and reported as ``first call s``. Per-token latency = median time / new tokens (one decode
step of the whole batch, the encoder amortised). Peak RSS: with ``--rss`` each engine also runs alone in a
fresh process (weights loaded from a saved copy, batch 1) and reports its ``ru_maxrss``.

    python -m benchmarks.generate [--quick] [--models bundled,base8] [--rounds 5] [--rss]
    moqe bench generate ...            (the same function)

Results: ``benchmarks/results/generate_<device>.{md,json,png}`` (device, JAX version, date).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ALL_ENGINES = ("moqe-t5x", "moqe-dropless", "moqe-int4", "moqe-int2", "moqe-ternary", "moqe-sub1", "hf-1t", "hf-2t")
# the sweep: (model, batches, new-token counts, engines). base8 (switch-base-8 shape, 12+12 layers, d_model 768,
# random f32 weights) is ~60x the bundled model's per-token work on this 2-core machine: batch 1/8, 32 tokens.
SWEEP = {
    "bundled": ((1, 8, 32), (32, 128), ALL_ENGINES),
    "base8": ((1, 8), (32,), ("moqe-t5x", "moqe-dropless", "moqe-int4", "moqe-sub1", "hf-1t", "hf-2t")),
}
# GPU (benchmarks/gpu_all.sh stage "generate"): switch-base-128 shape, bf16 vs int4 vs sub-1-bit experts, batch 1
SWEEP_GPU = {
    "base128": ((1,), (64,), ("moqe-bf16", "moqe-int4", "moqe-sub1")),
}
QUICK = {
    "bundled": ((1, 8), (8,), ALL_ENGINES),
    "base8": ((1,), (4,), ("moqe-dropless", "moqe-int4", "hf-1t")),
}


# ---- models and engines --------------------------------------------------------------------------------------
def random_model(preset: str, dtype: str, seed: int = 0, param_dtype: Any = None, **overrides: Any) -> Any:
    """A ``preset``-shaped model with random weights (N(0, 1/fan_in) kernels, N(0,1) embeddings, unit norm
    scales), drawn per leaf with ``jax.random`` on the default device (faster than the Flax init)."""
    import jax
    import jax.numpy as jnp

    from moqe_jax import Model, SwitchConfig
    from moqe_jax.model.api import param_shapes
    from moqe_jax.tree import unflatten_params

    cfg = SwitchConfig.preset(preset, dtype=dtype, **overrides)
    pdt = param_dtype or jnp.float32
    key = jax.random.key(seed)
    flat = {}
    for i, (path, shape) in enumerate(sorted(param_shapes(cfg).items())):
        if path.endswith("scale"):
            flat[path] = jnp.ones(shape, pdt)
            continue
        std = 1.0 if "embedd" in path else (2e-2 if "router" in path else (shape[-2] if len(shape) > 1 else 1) ** -0.5)
        flat[path] = (std * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(pdt)
    return Model(cfg, unflatten_params(flat))


def load_float_model(name: str, seed: int = 0) -> Any:
    import moqe_jax
    from moqe_jax.data.locate import BUNDLED

    if name == "bundled":
        return moqe_jax.load_model(BUNDLED / "moe")
    if name == "base8":  # switch-base-8 shape (12+12 layers, d_model 768, E 8), f32 like HF on CPU
        return random_model("switch-base-8", "float32", seed)
    if name == "base128":  # switch-base-128 shape, bf16 activations and weights (GPU; 15 GB)
        import jax.numpy as jnp

        return random_model("switch-base-128", "bfloat16", seed, param_dtype=jnp.bfloat16)
    raise SystemExit(f"unknown model {name!r}: bundled | base8 | base128")


@dataclasses.dataclass(frozen=True)
class _Params:
    """A params subtree with the ``.params``/``.replace`` of a model (what quantize/compress_sub1 need)."""

    params: dict

    def replace(self, params: dict) -> _Params:
        return _Params(params)


def _share_first_sparse_layer(base: Any, make: Callable[[Any], Any]) -> Any:
    """``make`` (a quantizer) applied to the experts of the first sparse encoder layer only, whose packed experts
    then stand in for every sparse layer's (random weights: speed, not accuracy, is measured; it keeps a
    switch-base-128 build inside the GPU script's time and memory)."""
    from moqe_jax.tree import flatten_params, unflatten_params

    name = f"layers_{base.config.sparse_layers('encoder')[0]}"
    sub = {"encoder": {name: {"mlp": {"expert": base.params["encoder"][name]["mlp"]["expert"]}}}}
    q = make(_Params(sub)).params["encoder"][name]["mlp"]["expert"]
    flat = flatten_params(base.params)
    for path in list(flat):
        if "/mlp/expert/" in path:
            del flat[path]
    out = unflatten_params(flat)
    for stack in ("encoder", "decoder"):
        for i in base.config.sparse_layers(stack):
            out[stack][f"layers_{i}"]["mlp"]["expert"] = q
    return base.replace(params=out)


def engine_model(base: Any, engine: str, weight_layout: str = "bytes") -> Any:
    """The moqe ``Model`` an engine runs (float or quantized experts); ``weight_layout="words"`` holds packed
    experts in the kernels' stored word layout (docs/KERNELS.md §2), as the GPU sweep does."""
    import jax
    import jax.numpy as jnp

    import moqe_jax
    from moqe_jax import QuantSpec

    kind = engine.removeprefix("moqe-")
    if kind in ("t5x", "dropless"):
        return base
    if kind == "bf16":  # float weights stored in bf16 (2 bytes read per weight)
        return base.replace(params=jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), base.params))

    def make(m: Any) -> Any:
        if kind == "int4":
            return moqe_jax.quantize(m, QuantSpec(4))
        if kind == "int2":
            return moqe_jax.quantize(m, QuantSpec(2))
        if kind in ("ternary", "sub1"):
            tern = moqe_jax.quantize(m, QuantSpec("ternary"))
            return tern if kind == "ternary" else moqe_jax.compress_sub1(tern, verbose=False)[0]
        raise ValueError(engine)

    m = _share_first_sparse_layer(base, make) if base.config.num_experts >= 64 else make(base)
    return m.with_weight_layout("words") if weight_layout == "words" else m


def hf_model(base: Any) -> Any:
    """``transformers`` Switch with ``base``'s weights (float32, eval mode)."""
    import torch
    import transformers

    from moqe_jax.checkpoint.hf_export import hf_state_dict

    cfg = transformers.SwitchTransformersConfig(**base.config.to_hf())
    with torch.device("meta"):
        m = transformers.SwitchTransformersForConditionalGeneration(cfg)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in hf_state_dict(base.config,
                                                                                            base.params).items()}
    m.load_state_dict(sd, strict=False, assign=True)
    m.tie_weights()
    left = [n for n, p in m.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"HF model: weights not loaded: {left[:4]}")
    return m.eval()


def hf_logits_check(base: Any, hf: Any, ids: np.ndarray, mask: np.ndarray) -> float:
    """Max |ours - HF| / max |HF| of teacher-forced logits (ours in routing_mode "hf")."""
    import torch

    from moqe_jax import Model

    rng = np.random.default_rng(1)
    dec = rng.integers(2, base.config.vocab_size, (ids.shape[0], 6)).astype(np.int32)
    dec[:, 0] = base.config.decoder_start_token_id
    ours = np.asarray(Model(base.config.replace(routing_mode="hf"), base.params).logits(ids, dec, mask))
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                    decoder_input_ids=torch.from_numpy(dec.astype(np.int64))).logits.numpy()
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def make_runner(engine: str, model: Any = None, hf: Any = None) -> Callable[[np.ndarray, np.ndarray, int], Any]:
    if engine.startswith("hf-"):
        import torch

        threads = int(engine[3:-1])

        def run_hf(ids: np.ndarray, mask: np.ndarray, new: int) -> Any:
            torch.set_num_threads(threads)
            with torch.no_grad():
                return hf.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                   attention_mask=torch.from_numpy(mask.astype(np.int64)), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, num_beams=1).numpy()[:, 1:]
        return run_hf
    mode = "t5x" if engine == "moqe-t5x" else "dropless"  # moqe-bf16/int*/ternary/sub1 run dropless

    def run(ids: np.ndarray, mask: np.ndarray, new: int) -> Any:
        return model.generate(ids, new, attention_mask=mask, min_new_tokens=new, routing_mode=mode)
    return run


def inputs(name: str, cfg: Any, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[batch, L]`` ids + mask: bundled = corpus sentences (sample.jsonl), base8 = random ids, length 24."""
    if name == "bundled":
        from moqe_jax.data.locate import BUNDLED
        from moqe_jax.data.tokenizer import Tokenizer

        tok = Tokenizer(BUNDLED / "tokenizer" / "spm.model")
        rows = [json.loads(x) for x in (BUNDLED / "sample.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r.get("split") != "train"] or rows
        enc = [e[:48] for e in tok.encode_batch([r["src"] for r in rows[:batch]], add_eos=True)]
    else:
        rng = np.random.default_rng(seed)
        enc = [list(rng.integers(3, cfg.vocab_size - 100, int(rng.integers(16, 25)))) + [cfg.eos_token_id]
               for _ in range(batch)]
    ids = np.zeros((batch, max(map(len, enc))), np.int32)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = e
    return ids, ids > 0


def weight_bytes(model: Any) -> int:
    import jax

    from moqe_jax.packed import is_packed

    leaves = jax.tree_util.tree_leaves(model.params, is_leaf=is_packed)
    return int(sum(x.nbytes for x in leaves))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the sweep -------------------------------------------------------------------------------------------------
def bench_model(name: str, batches: tuple[int, ...], news: tuple[int, ...], engines: tuple[str, ...],
                rounds: int, log: Callable[[str], None], layout: str = "bytes") -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    base = load_float_model(name)
    log(f"[{name}] float model ready ({time.perf_counter() - t0:.1f} s, {weight_bytes(base) / 2**20:.0f} MiB)")
    models: dict[str, Any] = {}
    info: dict[str, Any] = {"config": base.config.name, "weights_mib": {}, "build_s": {}}
    hf = None
    for e in engines:
        t = time.perf_counter()
        if e.startswith("hf-"):
            if hf is None:
                hf = hf_model(base)
                ids, mask = inputs(name, base.config, 4)
                info["hf_logits_rel_err"] = err = hf_logits_check(base, hf, ids, mask)
                log(f"[{name}] HF logits vs ours (routing hf): max rel err {err:.2e}")
                if not err < 1e-3:
                    raise SystemExit(f"[{name}] HF logits disagree with ours (rel err {err:.2e}); not timing")
                info["weights_mib"]["hf"] = sum(p.numel() * 4 for p in hf.parameters()) / 2**20
        else:
            models[e] = engine_model(base, e, layout)
            info["weights_mib"][e] = weight_bytes(models[e]) / 2**20
        info["build_s"][e] = time.perf_counter() - t
    runners = {e: make_runner(e, models.get(e), hf) for e in engines}
    rows = []
    for b in batches:
        ids, mask = inputs(name, base.config, b)
        for new in news:
            # hf-2t only at the smallest batch and length: two OpenMP threads on a shared 2-core machine spin-wait
            # on every op (hundreds of ms per step), which would dominate the sweep's time
            shape_engines = [e for e in engines if not (e == "hf-2t" and (new > min(news) or b > min(batches)))]
            first, times, outs = {}, {e: [] for e in shape_engines}, {}
            for e in shape_engines:
                t = time.perf_counter()
                outs[e] = np.asarray(runners[e](ids, mask, new))
                first[e] = time.perf_counter() - t
            n = len(shape_engines)
            for r in range(rounds):
                for e in shape_engines[r % n:] + shape_engines[:r % n]:
                    t = time.perf_counter()
                    runners[e](ids, mask, new)
                    times[e].append(time.perf_counter() - t)
            ref = outs.get("moqe-dropless", outs.get("moqe-bf16"))
            for e in shape_engines:
                med = statistics.median(times[e])
                same = None if ref is None or outs[e].shape != ref.shape else float((outs[e] == ref).mean())
                rows.append({"model": name, "engine": e, "batch": b, "new_tokens": new, "median_s": med,
                             "tokens_per_s": b * new / med, "ms_per_token": 1e3 * med / new,
                             "first_call_s": first[e], "rounds": rounds,
                             "min_s": min(times[e]), "max_s": max(times[e]), "same_tokens_as_dropless": same})
                log(f"[{name}] b={b:<3} new={new:<4} {e:<14} {b * new / med:9.1f} tok/s  {1e3 * med / new:8.2f} ms/step"
                    f"  first call {first[e]:6.2f} s")
    info["process_peak_rss_mib"] = _maxrss_mb()
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        info["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    return rows, info


# ---- peak RSS: one engine alone in a fresh process ---------------------------------------------------------------
def _rss_child(name: str, engine: str, src: str) -> None:
    """Child: load the engine's weights from ``src``, generate batch 1 × 32 tokens, print peak RSS (MiB)."""
    if engine.startswith("hf-"):
        import torch
        import transformers

        hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
        runner = make_runner(engine, hf=hf)
        from moqe_jax import SwitchConfig

        cfg = SwitchConfig.from_hf(src)
    else:
        import moqe_jax

        model = moqe_jax.load_model(src)
        cfg = model.config
        runner = make_runner(engine, model=model)
    ids, mask = inputs(name, cfg, 1)
    runner(ids, mask, 32)
    print(json.dumps({"peak_rss_mib": _hwm_mib()}))


def _hwm_mib() -> float:
    """This process's peak RSS (``VmHWM``, reset by exec; ``ru_maxrss`` would carry the parent's peak over a
    fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return _maxrss_mb()


def measure_rss(name: str, engines: tuple[str, ...], log: Callable[[str], None]) -> dict[str, float]:
    from moqe_jax.checkpoint.hf_export import export_hf

    base = load_float_model(name)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="moqe_bench_rss_") as tmp:
        srcs: dict[str, str] = {}
        for e in engines:
            if e.startswith("hf-"):
                if "hf" not in srcs:
                    srcs["hf"] = export_hf(base, Path(tmp) / "hf")
                srcs[e] = srcs["hf"]
            elif e in ("moqe-t5x", "moqe-dropless"):
                srcs.setdefault("float", engine_model(base, e).save(Path(tmp) / "float", format="safetensors"))
                srcs[e] = srcs["float"]
            else:
                srcs[e] = engine_model(base, e).save(Path(tmp) / e)
        del base
        for e in engines:
            r = subprocess.run([sys.executable, "-m", "benchmarks.generate", "--rss-child", name, e, srcs[e]],
                               capture_output=True, text=True, env={**os.environ, "MOQE_NO_PROGRESS": "1"})
            if r.returncode:
                log(f"[{name}] rss {e}: FAILED {r.stderr.strip().splitlines()[-1:]}")
                continue
            out[e] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mib"]
            log(f"[{name}] {e:<14} peak RSS alone (batch 1, 32 tokens): {out[e]:.0f} MiB")
    return out


# ---- report --------------------------------------------------------------------------------------------------
def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["new_tokens"]) for r in rows})
    names = list(dict.fromkeys(r["engine"] for r in rows))
    colors = {e: f"C{i}" for i, e in enumerate(names)}  # one color per engine in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.4, 3.6), squeeze=False,
                             layout="constrained")
    for ax, (mname, new) in zip(axes[0], panels, strict=True):
        sel = [r for r in rows if r["model"] == mname and r["new_tokens"] == new]
        for e in dict.fromkeys(r["engine"] for r in sel):
            pts = sorted((r["batch"], r["tokens_per_s"]) for r in sel if r["engine"] == e)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=e, color=colors[e],
                    linestyle="--" if e.startswith("hf") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{mname}, {new} new tokens")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[e], marker="o", linestyle="--" if e.startswith("hf") else "-")
               for e in names]
    fig.legend(handles, names, loc="outside right center", fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moqe bench generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma list of bundled, base8, base128 (default: bundled,base8; "
                   "with --gpu: base128)")
    p.add_argument("--gpu", action="store_true", help="the GPU sweep (switch-base-128 shape, bf16/int4/sub1, batch 1)")
    p.add_argument("--engines", default=None, help="comma list: run only these engines of each model's sweep "
                   "(e.g. moqe-bf16 alone for switch-base-128 on a 24 GiB CPU machine: bf16 and int4 models together "
                   "do not fit)")
    p.add_argument("--weight-layout", choices=("bytes", "words"), default=None,
                   help="layout of packed experts (default: words with --gpu, else bytes; docs/KERNELS.md §2)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per shape (median reported; ≥5)")
    p.add_argument("--quick", action="store_true", help="tiny sweep (smoke test), 2 rounds")
    p.add_argument("--rss", action="store_true", help="also measure each engine's peak RSS alone (subprocesses)")
    p.add_argument("--out", default=None, help="result name (default generate_<platform>)")
    p.add_argument("--rss-child", nargs=3, metavar=("MODEL", "ENGINE", "SRC"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rss_child:
        _rss_child(*a.rss_child)
        return 0
    import jax

    from benchmarks.common import RESULTS_DIR, device_info

    meta = {**device_info(), "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
    try:
        import torch
        import transformers

        meta.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    sweep = {**SWEEP, **SWEEP_GPU} if not a.quick else {**QUICK, "base128": ((1,), (4,), ("moqe-bf16", "moqe-int4"))}
    models = a.models or ("base128" if a.gpu else "bundled,base8")
    rounds = 2 if a.quick else a.rounds
    layout = a.weight_layout or ("words" if a.gpu else "bytes")
    meta["weight_layout"] = layout
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - t_start:7.1f}s {msg}", flush=True)

    all_rows, infos, rss = [], {}, {}
    for name in [m for m in models.split(",") if m]:
        if name not in sweep:
            raise SystemExit(f"unknown model {name!r}: {', '.join(sweep)}")
        batches, news, engines = sweep[name]
        if a.engines:
            engines = tuple(e for e in engines if e in a.engines.split(","))
        rows, info = bench_model(name, batches, news, engines, rounds, log, layout)
        all_rows += rows
        infos[name] = info
        if a.rss:
            rss[name] = measure_rss(name, tuple(e for e in engines if e not in ("hf-2t", "moqe-t5x")), log)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_avg_end"] = os.getloadavg()[0]
    out = a.out or f"generate_{jax.devices()[0].platform}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{out}.json").write_text(json.dumps({"meta": meta, "models": infos, "rss_alone_mib": rss,
                                                         "rows": all_rows}, indent=1))
    _plot(all_rows, RESULTS_DIR / f"{out}.png")
    _write_md(RESULTS_DIR / f"{out}.md", out, meta, infos, rss, all_rows, rounds)
    print((RESULTS_DIR / f"{out}.md").read_text())
    return 0


def _write_md(path: Path, out: str, meta: dict, infos: dict, rss: dict, rows: list[dict], rounds: int) -> None:
    L = [f"# Generation benchmark ({out})", "",
         f"device: {meta['device']} ({meta['platform']}, {meta['cpu_count']} CPUs), jax {meta['jax']}, "
         f"torch {meta.get('torch')}, transformers {meta.get('transformers')}, {meta['date']}; wall "
         f"{meta['wall_s']:.0f} s; 1-min load average {meta['load_avg_start']:.1f} at start, "
         f"{meta['load_avg_end']:.1f} at end. Regenerate: `python -m benchmarks.generate{' --rss' if rss else ''}` "
         "(or `moqe bench generate`).", "",
         f"Greedy, exactly N new tokens per row; medians of {rounds} interleaved rounds; `first call` = the first "
         "call of that shape (moqe: includes the compile of the bucket; HF: warm-up). JAX uses both cores; "
         "hf-1t/hf-2t set torch's intra-op threads. The machine is shared with other jobs, so expect noise.", ""]
    for name, info in infos.items():
        w = ", ".join(f"{k} {v:.0f}" for k, v in info["weights_mib"].items())
        hf_err = (f"HF logits vs ours (routing hf) max rel err {info['hf_logits_rel_err']:.1e}; "
                  if "hf_logits_rel_err" in info else "")
        L.append(f"- **{name}** ({info['config']}): weights MiB: {w}; {hf_err}process peak RSS "
                 f"{info['process_peak_rss_mib']:.0f} MiB"
                 + (f"; device peak {info['device_peak_mib']:.0f} MiB" if "device_peak_mib" in info else ""))
        if name in rss:
            L.append("  - peak RSS of each engine alone (batch 1, 32 tokens), MiB: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in rss[name].items()))
    L += ["", "| model | batch | new | engine | tokens/s | ms/step | vs hf-1t | first call s | same tokens as "
          "dropless |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf1 = next((x for x in rows if x["engine"] == "hf-1t" and x["model"] == r["model"] and x["batch"] == r["batch"]
                    and x["new_tokens"] == r["new_tokens"]), None)
        ratio = f"{r['tokens_per_s'] / hf1['tokens_per_s']:.2f}x" if hf1 else "-"
        same = "-" if r["same_tokens_as_dropless"] is None else f"{100 * r['same_tokens_as_dropless']:.0f}%"
        L.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['engine']} | {r['tokens_per_s']:.1f} | "
                 f"{r['ms_per_token']:.2f} | {ratio} | {r['first_call_s']:.2f} | {same} |")
    L += ["", f"![tokens/s vs batch]({out}.png)", ""]
    path.write_text("\n".join(L))


if __name__ == "__main__":
    sys.exit(run())
