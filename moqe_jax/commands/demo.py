"""``moqe demo``: the main job end to end on the bundled default model, in a few minutes on a laptop CPU.

load → size report → quantize the experts (MoQE 4-bit RTN, 2-bit RTN; QMoE ternary GPTQ → sub-1-bit)
→ BLEU on a sample of every direction → ONE summary table (size, bits/param, BLEU, tokens/s).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from moqe_jax.commands.common import add_weight_layout_arg
from moqe_jax.data.locate import BUNDLED
from moqe_jax.errors import MoqeError
from moqe_jax.progress import progress, write

TRAIN_HINT = ("moqe data build --out work_data/corpus && STEPS=1500 train/recipes/default_model.sh && "
              "python -m train.export_default (train/recipes/default_model.md)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="quantize + compress + evaluate the bundled model; one summary table")
    p.add_argument("--model", default=str(BUNDLED / "moe"), help="model dir (default: the bundled MoE model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: MODEL/tokenizer or the bundled one)")
    p.add_argument("--data", default=None, help="corpus dir (default $MOQE_DATA, work_data/corpus, data/corpus, "
                                                "else built from /usr/share/locale into ~/.cache/moqe_jax/corpus)")
    p.add_argument("--samples", type=int, default=5, help="test sentences per direction (default 5)")
    p.add_argument("--directions", default="all")
    p.add_argument("--calib", type=int, default=128, help="GPTQ calibration sentences (default 128)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    add_weight_layout_arg(p)  # also applied to the models the demo quantizes (they are made in bytes)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if not model_dir.exists():
        raise MoqeError(f"bundled model not found at {model_dir}; train it with `{TRAIN_HINT}` "
                        "or pass --model DIR")
    from moqe_jax.api import load_model
    from moqe_jax.calibration import calibration_batches
    from moqe_jax.data.corpus import read_jsonl
    from moqe_jax.data.locate import find_or_build_corpus, resolve_tokenizer
    from moqe_jax.evaluate import evaluate_model, load_tokenizer
    from moqe_jax.packed.spec import QuantSpec
    from moqe_jax.pipeline import compress_sub1, quantize

    data = find_or_build_corpus(args.data)
    tok = load_tokenizer(resolve_tokenizer(args.tokenizer, str(model_dir), data))
    t0 = time.perf_counter()
    model = load_model(model_dir, weight_layout=args.weight_layout).with_kernels(args.kernels)
    print(f"loaded {model!r} from {model_dir}")
    _print_size(model)

    steps: list[tuple[str, Any]] = [
        ("bf16 (float)", lambda: model),
        ("experts 4-bit RTN (MoQE)", lambda: quantize(model, QuantSpec(bits=4), components=("experts",))),
        ("experts 2-bit RTN (MoQE)", lambda: quantize(model, QuantSpec(bits=2), components=("experts",))),
        ("experts ternary GPTQ → sub-1-bit (QMoE)", lambda: compress_sub1(quantize(
            model, QuantSpec(bits="ternary"), components=("experts",), method="gptq",
            calib=calibration_batches(tok, read_jsonl(Path(data) / "train.jsonl"), n=args.calib,
                                      batch_size=args.batch_size, seed=args.seed)), verbose=False)[0]),
    ]
    rows = []
    bar = progress(total=len(steps), desc="demo")
    for label, make in steps:
        bar.set_description(label)
        tq = time.perf_counter()
        m = make()
        if args.weight_layout is not None:  # the quantized models: same repack as load_model's
            m = m.with_weight_layout(args.weight_layout)
        qs = time.perf_counter() - tq
        r = evaluate_model(m, tokenizer=tok, data=data, directions=args.directions, samples=args.samples,
                           batch_size=args.batch_size, seed=args.seed)
        sz = _packed_bytes(m)
        rows.append((label, sz["total"], sz["experts"], r.bleu, r.chrf, r.tokens_per_s, qs))
        bar.update(1)
        write(f"{label}: BLEU {r.bleu:.2f}")
    bar.close()
    base = rows[0][1]
    print()
    print(f"{'model':<42}{'size MB':>9}{'×':>6}{'expert bits/param':>18}{'BLEU':>7}{'chrF':>7}{'tok/s':>8}"
          f"{'quant s':>8}")
    for label, total, exp, bleu, chrf, tps, qs in rows:
        print(f"{label:<42}{total / 1e6:>9.2f}{base / total:>6.2f}{exp:>18.3f}{bleu:>7.2f}{chrf:>7.2f}"
              f"{tps:>8.0f}{qs:>8.1f}")
    print(f"\nBLEU: sacrebleu corpus BLEU averaged over directions ({args.directions}), {args.samples} test "
          f"sentences each, greedy decoding. Size: real packed bytes (MB = 10^6 bytes), bf16 for non-expert weights. "
          f"Total {time.perf_counter() - t0:.0f} s.")
    return 0


def _packed_bytes(model: Any) -> dict[str, float]:
    """Total bytes and expert bits/param (``moqe_jax.quant.report.size_report``: real packed bytes, bf16 floats)."""
    from moqe_jax.quant.report import size_report

    rep = size_report(model)
    exp = rep.components.get("experts")
    return {"total": rep.total.bytes_after, "experts": exp.bits_per_param if exp else float("nan")}


def _print_size(model: Any) -> None:
    from moqe_jax.quant.report import size_report

    print(size_report(model).format_table())
