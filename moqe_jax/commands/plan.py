"""``moqe plan``: per-device memory of a job on a mesh, from abstract shapes (no weights are allocated).

``moqe plan --preset switch-c-2048 --mesh data=4,expert=64 --job qat --device-memory 80GB --batch 256 --length 512``
prints per-device bytes by category (params, packed params, optimizer state, gradients, weight copies,
activations, KV cache, GPTQ Hessians and work buffers), whether the job fits in ``--device-memory``, and the
smallest mesh that fits when it does not. Method and accuracy: docs/MEMORY_PLAN.md. ``--json`` for scripts.
Sizes: ``80GB`` = 80·10⁹ bytes, ``80GiB`` = 80·2³⁰; the table prints binary units.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from moqe_jax.commands.common import add_config_args, config_from_args
from moqe_jax.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="per-device memory plan of train/qat/gptq/generate on a mesh",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "config preset name or JSON file (required)")
    p.add_argument("--mesh", default="", help="mesh sizes, e.g. data=4,expert=64,model=1 (default: one device)")
    p.add_argument("--job", required=True, choices=("train", "qat", "gptq", "generate"))
    p.add_argument("--device-memory", default=None, metavar="SIZE", help="memory per device, e.g. 80GB or 80GiB")
    p.add_argument("--batch", type=int, default=32, help="global batch (rows; generate: prompts) [32]")
    p.add_argument("--length", type=int, default=512, help="tokens per row (generate: prompt length) [512]")
    p.add_argument("--bits", default=None, help="qat/gptq/generate: 8, 4, 3, 2, ternary or sub1 "
                                                "[qat 2, gptq 2, generate 4]")
    p.add_argument("--decode-length", type=int, default=None, help="generate: new tokens (KV cache) [--length]")
    p.add_argument("--num-beams", type=int, default=1, help="generate: beams [1]")
    p.add_argument("--group-experts", type=int, default=16, help="gptq: experts per batched solve [16]")
    p.add_argument("--optimizer", default="adafactor", choices=("adafactor", "adamw"), help="train/qat [adafactor]")
    p.add_argument("--max-devices", type=int, default=65536, help="largest mesh the suggestion searches [65536]")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moqe_jax.plan import plan_memory

    cfg = config_from_args(args)
    if cfg is None:
        raise ConfigError("moqe plan needs --preset NAME (or --config FILE.json), e.g. --preset switch-c-2048")
    plan = plan_memory(cfg, args.mesh, args.job, batch=args.batch, length=args.length, bits=args.bits,
                       decode_length=args.decode_length, num_beams=args.num_beams, group_experts=args.group_experts,
                       optimizer=args.optimizer, device_memory=args.device_memory, max_devices=args.max_devices)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.table())
    return 0
