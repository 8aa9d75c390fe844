"""``moqe convert``: T5X / Hugging Face / QMoE / saved model -> a saved model directory (Orbax or safetensors),
a legacy T5X checkpoint (``--to-t5x``), a Hugging Face directory (``--to-hf``) or QMoE's checkpoint layout
(``--to-qmoe``).

    moqe convert --from t5x:gs-copy/switch_base_8/checkpoint_500100 --config switch-base-8 --to out/base8
    moqe convert --from hf:switch-base-8 --to out/base8.st --format safetensors
    moqe convert --from out/base8 --to-t5x out/t5x_export [--dtype bfloat16]
    moqe convert --from out/base8-4bit --to-hf out/hf_export     # transformers loads it (dequantized)
    moqe convert --from out/base8-sub1 --to-qmoe out/qmoe_export # compressed experts in QMoE's layout

Every output carries its config, so every command reads it back with no ``--config``: a saved model in its
manifest, a T5X export in ``config.json`` next to ``checkpoint_<step>/`` (SwitchConfig fields), a Hugging Face
export in its ``config.json``. ``--to-hf`` dequantizes packed weights; transformers' logits then equal ours
with ``--set routing_mode=hf`` (HF routes per sequence with a fixed expert capacity). ``--to-qmoe`` keeps a
sub-1-bit model's experts compressed (QMoE's ``w_comp``/``row_off``/``ter_minmax`` per expert, scales in bf16
as the format stores them; run ``moqe compress --bits ternary --format sub1`` first) and writes the other
weights in HF's names: safetensors files by default (read back as ``qmoe:DIR`` without unpickling), torch
``.pt`` files with ``--qmoe-format pt`` (what QMoE's own ``load_sub1`` reads; needs torch).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any

from moqe_jax.commands.common import MODEL_HELP, add_config_args, load_model_args


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("convert", help="convert between saved model, T5X, Hugging Face and QMoE formats",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, metavar="MODEL", help=MODEL_HELP)
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--to", help="output directory (saved model)")
    dst.add_argument("--to-t5x", help="output directory for a legacy T5X checkpoint (checkpoint_<step>/ + config.json)")
    dst.add_argument("--to-hf", help="output directory for a Hugging Face Switch model (config.json + safetensors)")
    dst.add_argument("--to-qmoe", help="output directory for QMoE's checkpoint layout of a sub-1-bit model "
                     "(config.json, noexp, expNN, sizes)")
    add_config_args(p)
    p.add_argument("--format", choices=("orbax", "safetensors"), default="orbax", help="storage format for --to")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="array dtype for --to-t5x / --to-hf / --to-qmoe (its non-expert weights)")
    p.add_argument("--qmoe-format", choices=("safetensors", "pt"), default="safetensors",
                   help="file format for --to-qmoe: safetensors (read back without unpickling) or torch .pt "
                        "(QMoE's own loader; needs torch)")
    p.add_argument("--step", type=int, default=0, help="step number for --to-t5x")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --to-t5x checkpoint_<step>, or write --to into a non-empty directory")
    p.set_defaults(func=run)


def _to_t5x(model: Any, directory: str, step: int, dtype: str) -> str:
    from moqe_jax.api import CONFIG_FILE
    from moqe_jax.checkpoint.t5x_writer import export_t5x

    created = not os.path.exists(directory)
    try:
        out = export_t5x(model.params, directory, step=step, dtype=dtype)
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(model.config.to_json())
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return out


def run(args: argparse.Namespace) -> int:
    from moqe_jax.api import save_model
    from moqe_jax.checkpoint.store import disk_size

    if args.to_t5x and not args.overwrite and os.path.exists(os.path.join(args.to_t5x, f"checkpoint_{args.step}")):
        from moqe_jax.errors import CheckpointError

        raise CheckpointError(f"{os.path.join(args.to_t5x, f'checkpoint_{args.step}')} exists; pass --overwrite to "
                              "replace it or choose another --step")
    model = load_model_args(args, args.source)
    if args.to_t5x:
        out = _to_t5x(model, args.to_t5x, args.step, args.dtype)
    elif args.to_hf:
        out = model.to_hf(args.to_hf, dtype=args.dtype)
    elif args.to_qmoe:
        from moqe_jax.checkpoint.qmoe import bf16_rounded_scales

        if n := bf16_rounded_scales(model.params):
            print(f"moqe: note: QMoE stores expert scales (ter_minmax) in bf16; {n} scale value(s) are rounded on "
                  "export, so the exported model's logits match this model with bf16-rounded scales, not exactly",
                  file=sys.stderr)
        out = model.to_qmoe(args.to_qmoe, dtype=args.dtype, format=args.qmoe_format)
    else:
        out = save_model(model, args.to, format=args.format, overwrite=args.overwrite)
    print(f"wrote {out} ({disk_size(out) / 1e6:.2f} MB)")
    return 0
