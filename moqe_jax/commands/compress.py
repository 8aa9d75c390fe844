"""``moqe compress``: QMoE compression — routing-aware GPTQ (or RTN) of the experts to 2-bit / ternary.

  moqe compress MODEL --bits ternary --method gptq --calib-data synthetic --samples 128 --out DIR
  moqe compress MODEL --bits 2 --calib-data corpus --corpus-dir work_data/corpus --samples 1024 --out DIR
  moqe compress MODEL --bits ternary --calib-data calib.jsonl --samples 512 --resume --out DIR

MODEL: anything ``moqe_jax.load_model`` accepts (``hf:DIR``, ``t5x:DIR`` with ``--preset``, a saved
model directory) or ``init:PRESET`` (randomly initialised; smoke tests). Calibration data:
``synthetic`` (Zipf-distributed token ids, seeded), ``PATH.jsonl`` (one JSON object per line with
``input_ids`` and ``decoder_input_ids`` — or ``targets``, shifted right — as id lists) or ``corpus``
(span-corrupted English of a dataset built by ``moqe data``, ``--corpus-dir``). Progress is checkpointed
after every layer under ``OUT.gptq-progress``; ``--resume`` continues a killed run there.
2-bit is QMoE's asymmetric min-max grid; ternary is ``{w_min, 0, w_max}`` per output channel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

import numpy as np

from moqe_jax.errors import DataError, QuantizationError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("compress", help="QMoE: GPTQ (or RTN) of the experts to 2-bit/ternary",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="hf:DIR, t5x:DIR (needs --preset), a saved model directory or init:PRESET")
    p.add_argument("--preset", help="config preset of a t5x: MODEL")
    p.add_argument("--bits", default="ternary", help="2, 3, 4 or ternary (default ternary)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--calib-data", default="synthetic", help="synthetic | PATH.jsonl | corpus (default synthetic)")
    p.add_argument("--corpus-dir", default="work_data/corpus", help="dataset dir for --calib-data corpus")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences (QMoE: 10K for 128 experts)")
    p.add_argument("--seq-len", type=int, default=64, help="encoder length of synthetic/corpus samples")
    p.add_argument("--batch-size", type=int, default=16, help="calibration sequences per forward batch")
    p.add_argument("--components", default="experts", help="experts[,dense] by GPTQ; others RTN")
    p.add_argument("--actorder", action="store_true", help="GPTQ act-order (QMoE: hurts at ternary)")
    p.add_argument("--percdamp", type=float, default=0.1, help="relative Hessian damping (QMoE 0.1)")
    p.add_argument("--group-experts", type=int, default=16, help="experts solved per batched call (QMoE 16)")
    p.add_argument("--max-tokens-factor", type=float, default=4.0, help="cap per expert, × mean load (QMoE 4)")
    p.add_argument("--true-sequential", action="store_true", help="wo Hessian from the quantized wi's output")
    p.add_argument("--resume", action="store_true", help="continue a killed run from OUT.gptq-progress")
    p.add_argument("--format", choices=("qtensor", "sub1"), default="qtensor",
                   help="sub1: QMoE's sub-1-bit dictionary code of the ternary experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for the compressed model (Model.save)")
    p.add_argument("--json", action="store_true", help="also write OUT/compress_report.json")
    p.set_defaults(func=run)


def spec_from_bits(bits: str) -> Any:
    from moqe_jax.packed.spec import QuantSpec

    b = str(bits).lower()
    if b in ("ternary", "tern", "1.5"):
        return QuantSpec(bits="ternary")
    if b not in ("2", "3", "4", "8"):
        raise QuantizationError(f"--bits {bits!r}: choose 2, 3, 4, 8 or ternary")
    return QuantSpec(bits=int(b), symmetric=False)  # QMoE/GPTQ: asymmetric min-max with a zero-point


def _load(args: argparse.Namespace) -> Any:
    from moqe_jax.api import Model, load_model

    if args.model.startswith("init:"):
        return Model.init(args.model[5:], seed=args.seed)
    return load_model(args.model, config=args.preset)


def _pad_rows(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    n = max(1, max(len(r) for r in rows))
    ids = np.zeros((len(rows), n), np.int32)
    mask = np.zeros((len(rows), n), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def synthetic_batches(vocab: int, samples: int, seq_len: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Zipf-distributed ids with local repetition (seeded); decoder = start token + half-length targets."""
    rng = np.random.default_rng(seed)
    t = max(2, seq_len // 2)
    out = []
    for s in range(0, samples, batch_size):
        b = min(batch_size, samples - s)
        ids = np.minimum(rng.zipf(1.3, size=(b, seq_len + t)), vocab - 1).astype(np.int32)
        ids = np.where(rng.random(ids.shape) < 0.3, np.roll(ids, 1, axis=1), ids)
        ids = np.maximum(ids, 2)
        dec = np.concatenate([np.zeros((b, 1), np.int32), ids[:, seq_len:seq_len + t - 1]], axis=1)
        out.append({"input_ids": ids[:, :seq_len], "decoder_input_ids": dec})
    return out


def jsonl_batches(path: str, samples: int, batch_size: int) -> list[dict]:
    rows_in, rows_dec = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    enc = [int(t) for t in r["input_ids"]]
                    if "decoder_input_ids" in r:
                        dec = [int(t) for t in r["decoder_input_ids"]]
                    else:
                        dec = [0] + [int(t) for t in r["targets"]][:-1]
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{path}:{ln}: expected input_ids and decoder_input_ids/targets id lists ({e})"
                                    ) from None
                rows_in.append(enc)
                rows_dec.append(dec)
                if len(rows_in) >= samples:
                    break
    except OSError as e:
        raise DataError(f"{path}: cannot read calibration data ({e.strerror})") from None
    if not rows_in:
        raise DataError(f"{path}: no calibration sample")
    out = []
    for s in range(0, len(rows_in), batch_size):
        ids, am = _pad_rows(rows_in[s:s + batch_size])
        dids, dm = _pad_rows(rows_dec[s:s + batch_size])
        dm[:, 0] = 1  # the decoder start token (id 0) is a real position
        out.append({"input_ids": ids, "attention_mask": am, "decoder_input_ids": dids, "decoder_attention_mask": dm})
    return out


def corpus_batches(corpus_dir: str, vocab: int, samples: int, seq_len: int, batch_size: int, seed: int) -> list[dict]:
    from moqe_jax.data.corpus import english_sentences
    from moqe_jax.data.span_corruption import mlm_batches
    from moqe_jax.data.tokenizer import Tokenizer

    tok = Tokenizer(os.path.join(corpus_dir, "tokenizer"))
    if tok.vocab_size > vocab:
        raise DataError(f"{corpus_dir}: tokenizer vocabulary {tok.vocab_size} > model vocabulary {vocab}")
    sents = english_sentences(corpus_dir)
    token_lists = tok.encode_batch(sents[: max(4 * samples, 1000)])
    it = mlm_batches(token_lists, tok.vocab_size, batch_size, inputs_length=seq_len, seed=seed)
    out = []
    for s in range(0, samples, batch_size):
        b = next(it)
        n = min(batch_size, samples - s)
        out.append({"input_ids": b["input_ids"][:n], "decoder_input_ids": b["decoder_input_ids"][:n]})
    return out


def calibration_data(args: argparse.Namespace, vocab: int) -> list[dict]:
    if args.samples <= 0:
        raise DataError("--samples must be positive")
    src = args.calib_data
    if src == "synthetic":
        return synthetic_batches(vocab, args.samples, args.seq_len, args.batch_size, args.seed)
    if src == "corpus":
        return corpus_batches(args.corpus_dir, vocab, args.samples, args.seq_len, args.batch_size, args.seed)
    if src.endswith(".jsonl"):
        return jsonl_batches(src, args.samples, args.batch_size)
    raise DataError(f"--calib-data {src!r}: use synthetic, corpus or a PATH.jsonl")


def run(args: argparse.Namespace) -> int:
    from moqe_jax.quant.policy import parse_components, quantize_model_rtn

    t0 = time.time()
    spec = spec_from_bits(args.bits)
    comps = parse_components(args.components)
    if args.format == "sub1" and not spec.is_ternary:
        raise QuantizationError("--format sub1 needs --bits ternary (QMoE's sub-1-bit code is for ternary experts)")
    model = _load(args)
    ckpt = os.path.normpath(args.out) + ".gptq-progress"  # sibling: Model.save replaces OUT atomically
    if args.method == "rtn":
        out = quantize_model_rtn(model, spec, comps)
        print(f"RTN {spec.describe()} of {', '.join(comps)}")
    else:
        from moqe_jax.calibration import gptq_quantize_model

        calib = calibration_data(args, model.config.vocab_size)
        out, rep = gptq_quantize_model(model, spec, calib, components=comps, checkpoint_dir=ckpt,
                                       max_tokens_factor=args.max_tokens_factor, percdamp=args.percdamp,
                                       actorder=args.actorder, group_experts=args.group_experts,
                                       true_sequential=args.true_sequential, resume=args.resume)
        print(f"GPTQ {spec.describe()} of {', '.join(comps)}, {sum(len(b['input_ids']) for b in calib)} "
              f"calibration samples")
        print(rep.table())
    if args.format == "sub1":
        from moqe_jax.pipeline import compress_sub1

        out, _ = compress_sub1(out)
    out.save(args.out)
    if args.json and args.method == "gptq":  # after the save: Model.save replaces OUT as a whole
        with open(os.path.join(args.out, "compress_report.json"), "w") as f:
            json.dump(rep.to_dict(), f, indent=1)
    shutil.rmtree(ckpt, ignore_errors=True)  # the run is complete: progress no longer needed
    print(f"saved {args.out} ({time.time() - t0:.1f} s total)")
    return 0
