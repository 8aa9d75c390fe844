"""``moqe bench generate``: the end-to-end generation benchmark of a source checkout (``benchmarks/generate.py``).

The benchmark lives in the checkout's ``benchmarks/`` folder (it needs the test extra: torch, transformers,
matplotlib) and the installed library never imports it (docs/ARCHITECTURE.md "Packaging"), so this command
runs ``python -m benchmarks.generate ARGS`` in that checkout: the folder next to the installed ``moqe_jax``
(editable install) or the current directory. Arguments after ``generate`` go to the benchmark unchanged
(``moqe bench generate --help`` lists them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from moqe_jax.errors import ConfigError

BENCHMARKS = {"generate": "benchmarks.generate"}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="benchmarks of a source checkout (generate: tokens/s vs HF)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see --help after NAME)")
    p.set_defaults(func=run)


def checkout_root() -> Path:
    """The source checkout holding ``benchmarks/``: next to the installed package, else the working directory."""
    import moqe_jax

    for root in (Path(moqe_jax.__file__).resolve().parents[1], Path.cwd()):
        if (root / "benchmarks" / "generate.py").is_file():
            return root
    raise ConfigError("moqe bench needs a source checkout: no benchmarks/generate.py next to the installed "
                      "moqe_jax or in the current directory; run it from a clone of the repository")


def run(args: argparse.Namespace) -> int:
    root = checkout_root()
    return subprocess.call([sys.executable, "-m", BENCHMARKS[args.name], *args.args], cwd=root)
