"""`moqe` command line (one entry point, subcommands in ``moqe_jax/commands/<name>.py``).

Each command module defines ``register(subparsers)`` which adds its parser and sets
``func=handler(args) -> int``. Errors never escape as raw tracebacks: they are printed as one
line (set ``MOQE_DEBUG=1`` to see the traceback). ``MOQE_KERNELS`` (the matmul kernel mode) is read here
and handed to the commands as ``args.kernels``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from moqe_jax import __version__
from moqe_jax.cache import enable_compilation_cache

COMMANDS = ("info", "convert", "quantize", "compress", "eval", "train", "data", "demo", "bench", "plan")


ENVIRONMENT = """environment:
  MOQE_KERNELS=auto|xla|pallas|interpret   how packed matmuls run (default auto)
  MOQE_COMPILATION_CACHE=0                 do not turn on JAX's persistent compilation cache
  MOQE_COMPILATION_CACHE_DIR=DIR           where it lives (default $MOQE_CACHE_DIR/xla, ~/.cache/moqe_jax/xla)
  MOQE_CACHE_DIR=DIR                       root of moqe's caches (compiled programs, sub-1-bit dictionary, corpus)
  MOQE_DATA=DIR                            the default corpus for train/eval/demo
  MOQE_NO_PROGRESS=1                       no progress bars
  MOQE_DEBUG=1                             full tracebacks instead of one-line errors
  MOQE_COORDINATOR, MOQE_NUM_PROCESSES, MOQE_PROCESS_ID, MOQE_DISTRIBUTED, MOQE_DISTRIBUTED_TIMEOUT
                                           multi-host start-up (moqe train, docs/LAUNCH.md)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moqe", description="MoQE / QMoE: quantize and compress Mixture-of-Experts models in JAX.",
        epilog=ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moqe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"moqe_jax.commands.{name}").register(sub)
    return parser


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (ANSI escapes from tensor names, paths, …) are shown
    as ``\\xNN`` escapes instead of being interpreted."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the one read of MOQE_KERNELS (auto|xla|pallas|interpret): commands apply it with Model.with_kernels
    args.kernels = os.environ.get("MOQE_KERNELS", "auto")
    # compiled programs persist across runs (MOQE_COMPILATION_CACHE=0: off; docs/ARCHITECTURE.md "Compile time");
    # a command that never compiles (``set_defaults(uses_jax=False)``: `moqe data build`) skips it and the ~1 s
    # jax import it costs
    if getattr(args, "uses_jax", True):
        enable_compilation_cache()
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("moqe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's contract is one clear line
        if os.environ.get("MOQE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"moqe: error: {printable(msg)}", file=sys.stderr)
        return 2
    return int(rc or 0)
