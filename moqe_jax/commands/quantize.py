"""``moqe quantize``: MoQE round-to-nearest quantization of a model's experts (or other components).

  moqe quantize MODEL --bits 4 --scheme linear --granularity channel --components experts --out DIR [--report]
  moqe quantize --config switch-base-128 --bits 2 --report      # projected size, no weights allocated
  moqe quantize --config moqe-5.3b --bits 2 --report            # MoQE's 5.3B MT config (docs/MOQE.md §3)

MODEL: ``hf:DIR``, ``t5x:DIR`` (its ``config.json`` or ``--config``), a directory written by ``Model.save``
or ``default`` (the bundled model); with no MODEL, ``--config NAME|FILE.json`` gives the projected report.
Linear is symmetric absmax by default (MoQE/FasterTransformer); ``--asymmetric`` gives GPTQ/QMoE's min-max
grid with a zero-point; ``--mse`` searches the clipping range (linear/ternary) or refines the log scale (Marian).
``--override REGEX=BITS|float`` (repeatable) sets a per-path bit width or keeps matching parameters in float.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from moqe_jax.commands.common import MODEL_HELP, add_config_args, config_from_args, load_model_args
from moqe_jax.errors import QuantizationError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("quantize", help="MoQE RTN quantization (experts by default) / projected size report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    add_config_args(p, "config preset name or JSON file (projected report when no MODEL; the config of a t5x: "
                       "MODEL without config.json)")
    p.add_argument("--bits", default="4", help="8, 4, 3, 2 or ternary (default 4)")
    p.add_argument("--scheme", choices=("linear", "log"), default="linear")
    p.add_argument("--granularity", default="channel", help="channel or group:N (groups of N along the input axis)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=True,
                     help="absmax grid, FasterTransformer's rule (default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="min-max grid with a zero-point")
    p.add_argument("--mse", action="store_true", help="MSE grid search (GPTQ) / log-scale refinement (Marian)")
    p.add_argument("--components", default="experts",
                   help="comma list of experts,dense,self_attn,cross_attn,embeddings,logits,router,relpos")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=BITS",
                   help="per-path bit width (or 'float' to keep in float), first match wins; repeatable")
    p.add_argument("--out", help="directory to save the quantized model (Model.save)")
    p.add_argument("--report", action="store_true", help="print the per-component size report")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace) -> Any:
    from moqe_jax.quant.rtn import as_spec

    return as_spec({"bits": args.bits, "scheme": args.scheme, "granularity": args.granularity,
                    "symmetric": args.symmetric, "mse": args.mse})


def parse_overrides(items: list[str], base: Any) -> dict[str, Any]:
    from moqe_jax.quant.rtn import as_spec

    out: dict[str, Any] = {}
    for item in items:
        pat, sep, val = item.rpartition("=")
        if not sep or not pat:
            raise QuantizationError(f"--override {item!r}: expected REGEX=BITS or REGEX=float")
        if val.lower() in ("float", "none", "fp", "bf16"):
            out[pat] = None
        else:
            out[pat] = as_spec({**base.to_dict(), "bits": val})
    return out


def run(args: argparse.Namespace) -> int:
    from moqe_jax.quant.policy import parse_components

    spec = spec_from_args(args)
    comps = parse_components(args.components)
    overrides = parse_overrides(args.override, spec)
    if args.model is None:
        if not args.config:
            raise QuantizationError("give a MODEL to quantize, or --config NAME|FILE.json for a projected size report")
        if args.out:
            raise QuantizationError("--out needs a MODEL (a preset alone has no weights); drop --out or give MODEL")
        from moqe_jax.quant.report import projected_report

        plain = not args.set and not args.config.endswith(".json")  # names projected_report knows (moqe-5.3b)
        rep = projected_report(args.config if plain else config_from_args(args), spec, comps, overrides=overrides)
        print(rep.to_json() if args.json else rep.format_table())
        return 0
    if not args.out and not args.report:
        raise QuantizationError("nothing to do: pass --out DIR to save and/or --report")
    from moqe_jax.quant.policy import quantize_model_rtn
    from moqe_jax.quant.report import size_report

    model = load_model_args(args)
    qmodel = quantize_model_rtn(model, spec, comps, overrides=overrides)
    if args.out:
        qmodel.save(args.out)
        print(f"saved {spec.describe()} ({','.join(comps)}) model to {args.out}")
    if args.report:
        rep = size_report(qmodel)
        print(json.dumps(rep.to_dict(), indent=2) if args.json else rep.format_table())
    return 0
