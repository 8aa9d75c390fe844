"""``moqe convert``: T5X / Hugging Face / saved model -> a saved model directory (Orbax or safetensors),
or (``--to-t5x``) a legacy T5X checkpoint written with our fixture writer.

    moqe convert --from t5x:gs-copy/switch_base_8/checkpoint_500100 --config switch-base-8 --to out/base8
    moqe convert --from hf:switch-base-8 --to out/base8.st --format safetensors
    moqe convert --from out/base8 --to-t5x out/t5x_export [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

from moqe_jax.errors import CheckpointError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("convert", help="convert T5X / HF checkpoints to a saved model (Orbax/safetensors)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, help="t5x:PATH, hf:PATH or a saved model directory")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--to", help="output directory (saved model)")
    dst.add_argument("--to-t5x", help="output directory for a legacy T5X checkpoint (checkpoint_<step>/)")
    p.add_argument("--config", help="config preset name (required for t5x: sources), e.g. switch-base-8")
    p.add_argument("--format", choices=("orbax", "safetensors"), default="orbax", help="storage format for --to")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="array dtype for --to-t5x")
    p.add_argument("--step", type=int, default=0, help="step number for --to-t5x")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moqe_jax.api import load_model, save_model
    from moqe_jax.checkpoint.store import disk_size
    from moqe_jax.checkpoint.t5x_writer import export_t5x

    src = args.source
    if src.startswith("t5x:") and not args.config:
        raise CheckpointError(f"{src}: T5X checkpoints carry no config; pass --config PRESET")
    model = load_model(src, args.config)
    if args.to_t5x:
        created = not os.path.exists(args.to_t5x)
        try:
            out = export_t5x(model.params, args.to_t5x, step=args.step, dtype=args.dtype)
        except BaseException:
            if created:
                shutil.rmtree(args.to_t5x, ignore_errors=True)
            raise
    else:
        out = save_model(model, args.to, format=args.format)
    print(f"wrote {out} ({disk_size(out) / 2**20:.2f} MiB)")
    return 0
