"""``moqe eval MODEL --data DIR``: per-direction BLEU/chrF (+ average), MT token CE and MLM loss.

The model may be float, RTN/GPTQ-quantized, QAT-exported or sub-1-bit: evaluation runs the same
jitted ``Model.generate`` / ``Model.logits`` path for all of them (``moqe_jax.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moqe_jax.commands.common import (
    MODEL_HELP,
    add_config_args,
    add_weight_layout_arg,
    load_model_args,
    local_dir,
    model_source,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="BLEU/chrF per direction, MT token CE and MLM loss of a (quantized) model")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--data", default=None,
                   help="corpus dir from `moqe data build` (default $MOQE_DATA, work_data/corpus, data/corpus, "
                        "the corpus `moqe demo` caches)")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece model/dir (default: MODEL/tokenizer, the bundled tokenizer, DATA/tokenizer)")
    add_config_args(p)
    add_weight_layout_arg(p)
    p.add_argument("--directions", default="all", help="'all' or a comma list, e.g. en-de,de-en")
    p.add_argument("--samples", type=int, default=100, help="test sentences per direction (default 100; 0 = all)")
    p.add_argument("--split", default="test", choices=("test", "valid", "train"))
    p.add_argument("--mlm", action="store_true", help="also the span-corruption MLM loss on held-out English")
    p.add_argument("--mt-loss", action="store_true", help="also the teacher-forced token CE of the references")
    p.add_argument("--no-bleu", action="store_true", help="skip decoding (losses only)")
    p.add_argument("--beams", type=int, default=1, help="beam size (default 1 = greedy, MoQE's setting)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the sentence sample and of the MLM corruption")
    p.add_argument("--json", default=None, help="also write the full result (with hypotheses) to this JSON file")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from moqe_jax.data.locate import resolve_data, resolve_tokenizer
    from moqe_jax.errors import ConfigError
    from moqe_jax.evaluate import evaluate_model, format_result

    for flag, v, lo in (("--batch-size", args.batch_size, 1), ("--beams", args.beams, 1),
                        ("--samples", args.samples, 0)):
        if v < lo:
            raise ConfigError(f"{flag} must be >= {lo}, got {v}")
    src = model_source(args.model)
    need_data = not args.no_bleu or args.mt_loss or args.mlm
    data = resolve_data(args.data) if need_data else None
    model = load_model_args(args, src)  # first: it recovers a directory left by a killed save (MODEL/tokenizer)
    tok = resolve_tokenizer(args.tokenizer, local_dir(src), data)
    res = evaluate_model(model, tokenizer=tok, data=data, directions=args.directions,
                         samples=args.samples or None, split=args.split, bleu=not args.no_bleu,
                         mt_loss=args.mt_loss, mlm=args.mlm, batch_size=args.batch_size, num_beams=args.beams,
                         seed=args.seed)
    print(format_result(res, f"{src} on {data} ({args.split}, {args.samples or 'all'} sentences/direction)"))
    print(f"evaluated in {res.seconds:.1f} s")
    bad = res.nonfinite_losses()
    if bad:
        print(f"moqe: warning: non-finite loss ({', '.join(bad)})", file=sys.stderr)
    if args.json:  # NaN/inf are written as null and listed under "nonfinite": always valid JSON
        Path(args.json).write_text(json.dumps(res.to_dict(with_text=True), indent=1, ensure_ascii=False,
                                              allow_nan=False), encoding="utf-8")
    return 0
