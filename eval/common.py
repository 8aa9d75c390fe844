"""Shared plumbing of the reproduction scripts: arguments, model/data setup, sizes, tables, plots."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from moqe_jax.data.locate import BUNDLED as ASSETS
from moqe_jax.errors import MoqeError

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments every reproduction script takes (model / data paths, sample sizes, output dir)."""
    p.add_argument("--moe", default=str(ASSETS / "moe"), help="MoE model dir (default: bundled moe)")
    p.add_argument("--dense", default=str(ASSETS / "dense"), help="dense twin model dir (default: bundled dense)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model/dir (default: bundled tokenizer)")
    p.add_argument("--data", default=None,
                   help="corpus dir from `moqe data build` (default $MOQE_DATA, work_data/corpus, data/corpus)")
    p.add_argument("--directions", default="all", help="'all' or e.g. en-de,de-en")
    p.add_argument("--samples", type=int, default=None, help="test sentences per direction")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--buckets", default="16,32,64,128,256",
                   help="source-length buckets of the decoder batches (one compilation each per model; Switch "
                        "routes padding tokens like T5X, so BLEU depends slightly on the padding)")
    p.add_argument("--out", default=str(RESULTS), help="where tables (.md/.json) and plots (.png) go")
    p.add_argument("--quick", action="store_true", help="CI mode: few sentences, fewer bit widths")
    p.add_argument("--synthetic", action="store_true",
                   help="random tiny models + synthetic corpus (used automatically if the bundled model is missing "
                        "in --quick mode)")
    p.add_argument("--seed", type=int, default=0)


@dataclass
class Setup:
    """Everything a script evaluates with."""

    moe: Any
    dense: Any | None
    tokenizer: Any
    data: Any
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)
    tmp: Any = None


def setup_from_args(args: argparse.Namespace) -> Setup:
    """Load the models, tokenizer and corpus named by ``args`` (or the synthetic CI setup). Turns on the
    persistent compilation cache as the ``moqe`` CLI does (``MOQE_COMPILATION_CACHE=0``: off)."""
    from moqe_jax.api import load_model
    from moqe_jax.cache import enable_compilation_cache
    from moqe_jax.data.locate import default_data_dir, resolve_tokenizer
    from moqe_jax.evaluate import load_tokenizer

    enable_compilation_cache()
    use_syn = args.synthetic or (args.quick and not Path(args.moe).exists())
    if not use_syn and args.data is None:
        args.data = default_data_dir()
        if args.data is None:
            raise MoqeError("no corpus found ($MOQE_DATA, work_data/corpus, data/corpus); build one with "
                            "`moqe data build --out work_data/corpus` or pass --data")
    if use_syn:
        from eval.synthetic import synthetic_setup

        s = synthetic_setup()
        note = ("SYNTHETIC run: random tiny models and a synthetic corpus (bundled model not found at "
                f"{args.moe}); the numbers are meaningless, only the pipeline is exercised.")
        return Setup(s["moe"], s["dense"], load_tokenizer(s["tokenizer"]), s["data"], True, [note])
    if not Path(args.moe).exists():
        raise MoqeError(f"{args.moe}: MoE model not found (train it: train/recipes/default_model.md, or pass --moe)")
    moe = load_model(args.moe)
    dense = load_model(args.dense) if args.dense and Path(args.dense).exists() else None
    notes = [] if dense is not None else [f"dense twin not found at {args.dense}: dense rows skipped"]
    tok = resolve_tokenizer(args.tokenizer, args.moe, args.data)
    return Setup(moe, dense, load_tokenizer(tok), args.data, False, notes)


# ---------------------------------------------------------------------------------------------
# quantization / sizes
# ---------------------------------------------------------------------------------------------
def quantize(model: Any, bits: Any, components: Sequence[str], method: str = "rtn", calib: Any = None,
             overrides: dict | None = None, **spec_kw: Any) -> Any:
    """``moqe_jax.pipeline.quantize`` with ``QuantSpec(bits, **spec_kw)`` (MoQE default: linear absmax, channel)."""
    from moqe_jax.packed.spec import QuantSpec
    from moqe_jax.pipeline import quantize as pq

    kw = {"overrides": overrides} if overrides else {}
    return pq(model, QuantSpec(bits=bits, **spec_kw), components=tuple(components), method=method, calib=calib, **kw)


def other_layers_overrides(model: Any, keep: dict[str, set[int]], component_path: str = "mlp/") -> dict:
    """Policy overrides that keep ``component_path`` float in every layer NOT in ``keep`` (per stack) — MoQE's
    dense baseline quantizes the FFN of selected layers only (docs/MOQE.md §4)."""
    cfg = model.config
    out: dict[str, None] = {}
    for stack in ("encoder", "decoder"):
        other = [i for i in range(cfg.num_stack_layers(stack)) if i not in keep.get(stack, set())]
        if other:
            out[rf"^{stack}/layers_({'|'.join(map(str, other))})/{component_path}"] = None
    return out


def packed_bytes(model: Any) -> dict[str, dict[str, float]]:
    """Real storage per component from ``moqe_jax.quant.report.size_report`` (packed codes + scales/zeros of
    quantized leaves, bf16 for float leaves — MoQE's baseline): ``{"total"|component: {bytes, params,
    bits_per_param}}``."""
    from moqe_jax.quant.report import size_report

    rep = size_report(model)
    out = {c: {"bytes": v.bytes_after, "params": v.params, "bits_per_param": v.bits_per_param}
           for c, v in rep.components.items()}
    t = rep.total
    out["total"] = {"bytes": t.bytes_after, "params": t.params, "bits_per_param": t.bits_per_param}
    return out


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


# ---------------------------------------------------------------------------------------------
# tables / plots / provenance
# ---------------------------------------------------------------------------------------------
def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if np.isnan(v) else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that regenerates the current outputs (for captions)."""
    mod = getattr(sys.modules.get("__main__"), "__spec__", None)  # run as `python -m eval.x`
    if mod is not None and mod.name:
        return "python -m " + " ".join(shlex.quote(a) for a in [mod.name, *sys.argv[1:]])
    script = os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])


def write_markdown(path: Path, title: str, body: str, setup: Setup | None = None, extra: Sequence[str] = ()) -> None:
    """Write a results page with its regenerate command and notes."""
    lines = [f"# {title}", "", f"Regenerate: `{command_line()}`", ""]
    if setup is not None:
        lines += [f"> {n}" for n in setup.notes] + ([""] if setup.notes else [])
    lines += [body, ""]
    lines += list(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float), encoding="utf-8")


def new_figure(w: float = 6.4, h: float = 4.2, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(w, h))


def save_figure(fig: Any, path: Path, caption: str) -> None:
    """Save a PNG with the regenerate command in small print under it."""
    import matplotlib.pyplot as plt

    fig.text(0.01, 0.005, caption, fontsize=6, color="0.4", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Timer:
    """Wall and process CPU time of a block."""

    def __enter__(self) -> Timer:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0


def machine_note() -> str:
    dev = jax.devices()[0]
    return (f"jax {jax.__version__} on {dev.platform} ({getattr(dev, 'device_kind', '?')}), "
            f"{os.cpu_count()} CPU cores visible")
