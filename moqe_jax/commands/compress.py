"""``moqe compress``: QMoE compression — routing-aware GPTQ (or RTN) of the experts to 2-bit / ternary.

  moqe compress MODEL --bits ternary --method gptq --calib-data synthetic --samples 128 --out DIR
  moqe compress MODEL --bits 2 --calib-data corpus --corpus-dir work_data/corpus --samples 1024 --out DIR
  moqe compress MODEL --bits ternary --calib-data calib.jsonl --samples 512 --resume --out DIR

MODEL: ``hf:DIR``, ``t5x:DIR`` (its ``config.json`` or ``--config``), a saved model directory, ``default``
(the bundled model) or ``init:PRESET`` (randomly initialised; smoke tests). Calibration data:
``synthetic`` (Zipf-distributed token ids, seeded), ``PATH.jsonl`` (one JSON object per line with
``input_ids`` and ``decoder_input_ids`` — or ``targets``, shifted right — as id lists) or ``corpus``
(a dataset built by ``moqe data``, ``--corpus-dir``: its training translation pairs, as for the README's
QMoE numbers, or with ``--calib-mode span`` span-corrupted English). Progress is checkpointed
after every layer under ``OUT.gptq-progress``; ``--resume`` continues a killed run there.
2-bit is QMoE's asymmetric min-max grid; ternary is ``{w_min, 0, w_max}`` per output channel. Inputs that no
calibration token activates are kept and quantized as QMoE's ``batch_gptq`` does (``--dead-inputs zero``: zeroed,
as gptq's ``fasterquant``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

from moqe_jax.commands.common import (
    MODEL_HELP,
    add_config_args,
    add_distributed_args,
    init_distributed,
    load_model_args,
)
from moqe_jax.errors import CheckpointError, DataError, QuantizationError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("compress", help="QMoE: GPTQ (or RTN) of the experts to 2-bit/ternary",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_config_args(p)
    p.add_argument("--bits", default="ternary", help="2, 3, 4 or ternary (default ternary)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--group-size", default="channel", metavar="channel|N",
                   help="one scale per output channel (default, QMoE) or per N inputs (a multiple of 8)")
    p.add_argument("--dynamic-groups", action="store_true",
                   help="with --group-size: refit each group's grid during the solve (gptq's default) instead of "
                        "fixing the grids from the weights first (static groups)")
    p.add_argument("--calib-data", default="synthetic", help="synthetic | PATH.jsonl | corpus (default synthetic)")
    p.add_argument("--corpus-dir", default=None,
                   help="dataset dir for --calib-data corpus (default $MOQE_DATA, work_data/corpus, data/corpus, "
                        "the corpus `moqe demo` caches)")
    p.add_argument("--calib-mode", choices=("mt", "span"), default="mt",
                   help="--calib-data corpus: mt = training translation pairs (how the README's QMoE numbers were "
                        "calibrated), span = span-corrupted English")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences (QMoE: 10K for 128 experts)")
    p.add_argument("--seq-len", type=int, default=64,
                   help="encoder length of synthetic/span samples; longest kept sequence of mt pairs")
    p.add_argument("--batch-size", type=int, default=16, help="calibration sequences per forward batch")
    p.add_argument("--components", default="experts", help="experts[,dense] by GPTQ; others RTN")
    p.add_argument("--actorder", action="store_true", help="GPTQ act-order (QMoE: hurts at ternary)")
    p.add_argument("--percdamp", type=float, default=0.1, help="relative Hessian damping (QMoE 0.1)")
    p.add_argument("--group-experts", type=int, default=16, help="experts solved per batched call (QMoE 16)")
    p.add_argument("--max-tokens-factor", type=float, default=4.0, help="cap per expert, × mean load (QMoE 4)")
    p.add_argument("--true-sequential", action="store_true", help="wo Hessian from the quantized wi's output")
    p.add_argument("--dead-inputs", choices=("keep", "zero"), default="keep",
                   help="inputs no calibration token activates: keep and quantize them (QMoE batch_gptq, default) "
                        "or zero them (gptq fasterquant)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from OUT.gptq-progress")
    p.add_argument("--overwrite", action="store_true",
                   help="discard existing OUT.gptq-progress and write into a non-empty OUT that is not a saved model")
    p.add_argument("--format", choices=("qtensor", "sub1"), default="qtensor",
                   help="sub1: QMoE's sub-1-bit dictionary code of the ternary experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for the compressed model (Model.save)")
    p.add_argument("--json", action="store_true", help="also write OUT/compress_report.json")
    p.add_argument("--mesh", default="", help="expert=N: the GPTQ expert solves sharded over N devices (of every "
                                              "process in a multi-host run; default: each process solves all)")
    add_distributed_args(p)
    p.set_defaults(func=run)


def _remove_progress(prog: str) -> None:
    """Remove a finished run's ``OUT.gptq-progress``: renamed aside first (one atomic step), so that a kill during
    the removal never leaves a half-deleted progress directory that the next ``--resume`` would refuse."""
    gone = prog + ".removing"
    shutil.rmtree(gone, ignore_errors=True)  # left by a run killed while removing its progress
    if os.path.isdir(prog):
        try:
            os.replace(prog, gone)
        except OSError:
            gone = prog
    shutil.rmtree(gone, ignore_errors=True)


def spec_from_bits(bits: str, group_size: str = "channel") -> Any:
    """``--bits`` / ``--group-size`` -> QMoE's grid: asymmetric min-max (GPTQ/QMoE zero point) or ternary."""
    from moqe_jax.packed.spec import QuantSpec, as_bits

    g = str(group_size).lower()
    if g != "channel" and not g.isdigit():
        raise QuantizationError(f"--group-size {group_size!r}: 'channel' or a positive multiple of 8")
    try:
        b = as_bits(str(bits).lower())
    except ValueError:
        raise QuantizationError(f"--bits {bits!r}: choose 2, 3, 4, 8 or ternary") from None
    try:
        return QuantSpec(bits=b, symmetric=b == "ternary", granularity=g)
    except ValueError as e:
        raise QuantizationError(f"--group-size {group_size!r}: {e}") from None


def _load(args: argparse.Namespace) -> Any:
    return load_model_args(args, seed=args.seed)


def _calib_tokenizer(args: argparse.Namespace) -> str:
    """The corpus's ``tokenizer/``, else the model's, else the bundled one for the bundled model (the corpus that
    ``moqe demo`` caches has no tokenizer of its own)."""
    from pathlib import Path

    from moqe_jax.commands.common import local_dir, model_source
    from moqe_jax.data.locate import BUNDLED

    cands = [Path(args.corpus_dir) / "tokenizer"]
    model_dir = local_dir(args.model)
    if model_dir:
        cands.append(Path(model_dir) / "tokenizer")
        if Path(model_source(args.model)).resolve().parent == BUNDLED.resolve():
            cands.append(BUNDLED / "tokenizer")
    for c in cands:
        if c.exists():
            return str(c)
    raise DataError(f"{args.corpus_dir}: no tokenizer/ here or next to the model; build the corpus with its "
                    f"tokenizer with `moqe data build --out {args.corpus_dir}`")


def calibration_data(args: argparse.Namespace, vocab: int) -> list[dict]:
    """The batches named by ``--calib-data`` (sources: ``moqe_jax.calibration``)."""
    from moqe_jax.calibration import calibration_batches, jsonl_batches, synthetic_batches

    if args.samples <= 0:
        raise DataError("--samples must be positive")
    if args.batch_size <= 0 or args.seq_len <= 0:
        raise DataError(f"--batch-size and --seq-len must be positive, got {args.batch_size} and {args.seq_len}")
    src = args.calib_data
    if src == "synthetic":
        return synthetic_batches(vocab, args.samples, args.seq_len, args.batch_size, args.seed)
    if src == "corpus":
        from moqe_jax.data.corpus import english_sentences, read_jsonl
        from moqe_jax.data.locate import resolve_corpus
        from moqe_jax.data.tokenizer import Tokenizer

        args.corpus_dir = resolve_corpus(args.corpus_dir, "train.jsonl")
        tok_dir = _calib_tokenizer(args)
        tok = Tokenizer(tok_dir)
        if tok.vocab_size > vocab:
            raise DataError(f"{tok_dir}: tokenizer vocabulary {tok.vocab_size} > model vocabulary {vocab}")
        texts = read_jsonl(os.path.join(args.corpus_dir, "train.jsonl")) if args.calib_mode == "mt" \
            else english_sentences(args.corpus_dir)
        return calibration_batches(tok, texts, mode=args.calib_mode, n=args.samples, batch_size=args.batch_size,
                                   seed=args.seed, max_len=args.seq_len)
    if src.endswith(".jsonl"):
        return jsonl_batches(src, args.samples, args.batch_size)
    raise DataError(f"--calib-data {src!r}: use synthetic, corpus or a PATH.jsonl")


def run(args: argparse.Namespace) -> int:
    from moqe_jax.quant.policy import parse_components, quantize_model_rtn

    t0 = time.time()
    init_distributed(args)
    import jax

    from moqe_jax import sharding as shd

    mesh = shd.make_mesh(args.mesh) if args.mesh else None
    spec = spec_from_bits(args.bits, args.group_size)
    comps = parse_components(args.components)
    if args.format == "sub1" and not spec.is_ternary:
        raise QuantizationError("--format sub1 needs --bits ternary (QMoE's sub-1-bit code is for ternary experts)")
    if args.format == "sub1" and spec.granularity != "channel":
        raise QuantizationError("--format sub1 needs --group-size channel (QMoE's code has one scale per channel)")
    if args.dynamic_groups and spec.granularity == "channel":
        raise QuantizationError("--dynamic-groups needs --group-size N")
    ckpt = os.path.normpath(args.out) + ".gptq-progress"  # sibling: Model.save replaces OUT atomically
    if jax.process_count() > 1:  # every process keeps its own progress (one writer per directory)
        ckpt = os.path.join(ckpt, f"process-{jax.process_index()}")
    if args.method == "gptq":  # option and progress checks before any (slow) loading
        from moqe_jax.quant.gptq_ffn import GPTQOptions

        GPTQOptions(max_tokens_factor=args.max_tokens_factor, percdamp=args.percdamp, group_experts=args.group_experts,
                    dead_inputs=args.dead_inputs)
        from moqe_jax.quant.gptq import check_options

        check_options(args.dead_inputs, not args.dynamic_groups, args.actorder, spec, "--dynamic-groups")
        if not args.resume and not args.overwrite and os.path.isdir(ckpt) and os.listdir(ckpt):
            raise CheckpointError(f"{ckpt}: holds the progress of an earlier run; continue it with --resume or "
                                  "discard it with --overwrite")
    model = _load(args)
    if args.method == "rtn":
        out = quantize_model_rtn(model, spec, comps)
        print(f"RTN {spec.describe()} of {', '.join(comps)}")
    else:
        from moqe_jax.calibration import gptq_quantize_model

        calib = calibration_data(args, model.config.vocab_size)
        out, rep = gptq_quantize_model(model, spec, calib, components=comps, checkpoint_dir=ckpt,
                                       max_tokens_factor=args.max_tokens_factor, percdamp=args.percdamp,
                                       actorder=args.actorder, group_experts=args.group_experts,
                                       true_sequential=args.true_sequential, resume=args.resume,
                                       dead_inputs=args.dead_inputs, static_groups=not args.dynamic_groups,
                                       mesh=mesh)
        print(f"GPTQ {spec.describe()} of {', '.join(comps)}, {sum(len(b['input_ids']) for b in calib)} "
              f"calibration samples")
        print(rep.table())
    if args.format == "sub1":
        from moqe_jax.pipeline import compress_sub1

        out, _ = compress_sub1(out)
    if jax.process_index() != 0:  # process 0 writes the model (every process holds all of it)
        shutil.rmtree(ckpt, ignore_errors=True)
        return 0
    # process 0 alone: Orbax would wait for the other processes at its barriers, the safetensors store does not
    out.save(args.out, overwrite=args.overwrite, format="safetensors" if jax.process_count() > 1 else "orbax")
    if args.json and args.method == "gptq":  # after the save: Model.save replaces OUT as a whole
        with open(os.path.join(args.out, "compress_report.json"), "w") as f:
            json.dump(rep.to_dict(), f, indent=1)
    _remove_progress(os.path.normpath(args.out) + ".gptq-progress")  # complete: not needed
    print(f"saved {args.out} ({time.time() - t0:.1f} s total)")
    return 0
