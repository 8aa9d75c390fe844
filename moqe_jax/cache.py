"""moqe's on-disk caches: one root directory, and JAX's persistent compilation cache in it.

Root (:func:`cache_root`): ``$MOQE_CACHE_DIR``, else ``$XDG_CACHE_HOME/moqe_jax``, else ``~/.cache/moqe_jax``;
it holds the sub-1-bit dictionary tables (``moqe_jax.packed.sub1_dict``), ``corpus/`` (the demo's gettext corpus,
``moqe_jax.data.locate``) and ``xla/``, the compilation cache.

Why the compilation cache: every new batch/length bucket of the compiled decode loop costs seconds of tracing
and XLA compilation (2-core CPU: 1.6–1.8 s on the bundled model, 3.8–4.6 s on a switch-base-8 shape), paid
again by every process; with the cache a later process pays 0.26–0.46 s / 1.2–2.1 s
(benchmarks/results/compile_cache_cpu.md). JAX keeps compiled executables on disk
(``jax_compilation_cache_dir``); :func:`enable_compilation_cache` picks the directory and turns it on. The
``moqe`` CLI calls it before any command that compiles runs; library users call it themselves before their
first ``jit`` (docs/ARCHITECTURE.md, "Compile time"). Importing ``moqe_jax`` never changes JAX's configuration.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DISABLE_ENV", "DIR_ENV", "MIN_COMPILE_SECONDS", "ROOT_ENV", "cache_root", "default_cache_dir",
           "enable_compilation_cache", "xdg_cache_home"]

ROOT_ENV = "MOQE_CACHE_DIR"  # every on-disk cache of moqe lives under this root
DIR_ENV = "MOQE_COMPILATION_CACHE_DIR"  # the compilation cache only (default: cache_root() / "xla")
DISABLE_ENV = "MOQE_COMPILATION_CACHE"  # "0" / "off" / "false": leave JAX's cache setting alone
MIN_COMPILE_SECONDS = 0.5  # cache programs that took at least this long to compile (JAX's default: 1 s)


def xdg_cache_home() -> Path:
    """The user's cache directory by the XDG rule: ``$XDG_CACHE_HOME``, else ``~/.cache``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()


def cache_root() -> Path:
    """``$MOQE_CACHE_DIR``, else ``$XDG_CACHE_HOME/moqe_jax``, else ``~/.cache/moqe_jax``."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser()
    return xdg_cache_home() / "moqe_jax"


def default_cache_dir() -> Path:
    """The compilation cache: ``$MOQE_COMPILATION_CACHE_DIR``, else ``cache_root() / "xla"``."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV]).expanduser()
    return cache_root() / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default :func:`default_cache_dir`).

    Returns the directory in use, or None when the cache stays off: ``MOQE_COMPILATION_CACHE=0`` (also
    ``off``/``false``/``no``), or the directory cannot be created (a read-only home: compiling still works,
    only the reuse is lost). A cache directory already chosen for JAX (``JAX_COMPILATION_CACHE_DIR`` or
    ``jax.config``) is kept and returned. Call it before the first compilation of the process: JAX reads the
    setting when it first compiles.
    """
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return None  # before the jax import: switched off, this costs nothing
    import jax

    current = getattr(jax.config, "jax_compilation_cache_dir", None)  # JAX_COMPILATION_CACHE_DIR counts too
    if current:
        return Path(current)
    d = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(d, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return d
