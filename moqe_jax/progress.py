"""The one progress bar of the project: tqdm on stderr.

tqdm itself decides whether stderr is a terminal (``disable=None``); ``MOQE_NO_PROGRESS=1`` turns every
bar off. Log lines printed while a bar is open go through :func:`write` so they do not garble it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress", "write"]


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             enable: bool | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar (iterate it, or call ``.update(n)``); ``enable`` None = only on a terminal."""
    if os.environ.get("MOQE_NO_PROGRESS") == "1":
        enable = False
    disable = None if enable is None else not enable
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, disable=disable, **kwargs)


def write(msg: str) -> None:
    """Print a log line above any open bar (stdout)."""
    tqdm.write(msg)
