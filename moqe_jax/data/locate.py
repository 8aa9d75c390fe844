"""Where the bundled default model, tokenizers and corpora are found: the defaults of ``moqe demo``/``moqe eval``,
in the library so Python users and the scripts in ``eval/`` resolve them the same way."""

from __future__ import annotations

import os
from pathlib import Path

from moqe_jax.cache import cache_root, xdg_cache_home
from moqe_jax.errors import DataError, MoqeError

__all__ = ["BUNDLED", "DATA_CANDIDATES", "cached_corpus_dir", "default_data_dir", "resolve_data",
           "resolve_corpus", "find_or_build_corpus", "resolve_tokenizer"]

#: The bundled default models (``moe/``, ``dense/``), their ``tokenizer/`` and ``sample.jsonl`` (package data).
BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "default"
DATA_CANDIDATES = ("work_data/corpus", "data/corpus")


def cached_corpus_dir() -> Path:
    """Where :func:`find_or_build_corpus` (``moqe demo``) caches the corpus: ``corpus/`` under moqe's one cache
    root (:func:`moqe_jax.cache.cache_root`: ``$MOQE_CACHE_DIR``, else ``$XDG_CACHE_HOME/moqe_jax``)."""
    return cache_root() / "corpus"


def _legacy_corpus_dir() -> Path:
    """Where moqe 0.1.0 cached it (``$XDG_CACHE_HOME/moqe/corpus``): still read, never written."""
    return xdg_cache_home() / "moqe" / "corpus"


def default_data_dir(need: str = "test.jsonl") -> str | None:
    """The corpus to use when none is named: ``$MOQE_DATA``, then ``work_data/corpus`` and ``data/corpus``
    (relative to the working directory), then the corpus ``moqe demo`` cached; the first that holds ``need``."""
    for d in (os.environ.get("MOQE_DATA"), *DATA_CANDIDATES, str(cached_corpus_dir()), str(_legacy_corpus_dir())):
        if d and (Path(d) / need).exists():
            return d
    return None


def _build_hint(d: str, missing: str) -> str:
    return (f"{d}: no corpus here ({missing} missing); build it with `moqe data build --out {d}` (or run "
            f"`moqe demo` once, which caches one in {cached_corpus_dir()})")


def resolve_corpus(arg: str | None, *need: str) -> str:
    """``arg``, else :func:`default_data_dir`; must hold every file/dir in ``need`` (default ``test.jsonl``)."""
    need = need or ("test.jsonl",)
    d = arg or default_data_dir(need[0]) or "work_data/corpus"
    for n in need:
        if not (Path(d) / n).exists():
            raise DataError(_build_hint(d, n))
    return d


def resolve_data(arg: str | None) -> str:
    """``arg``, else :func:`default_data_dir`; must hold ``test.jsonl``."""
    return resolve_corpus(arg, "test.jsonl")


def find_or_build_corpus(arg: str | None) -> str:
    """``arg`` or :func:`default_data_dir`; failing both, the corpus built once from ``/usr/share/locale`` into
    :func:`cached_corpus_dir` (so a fresh install can run the demo)."""
    if arg and (Path(arg) / "test.jsonl").is_file():
        return arg
    if arg:
        raise MoqeError(f"{arg}: no corpus here (test.jsonl missing); build it with `moqe data build --out {arg}`")
    found = default_data_dir()
    if found:
        return found
    cache = cached_corpus_dir()
    if not (cache / "test.jsonl").is_file():
        import sys

        from moqe_jax.data.corpus import build_corpus

        print(f"building the gettext corpus from /usr/share/locale into {cache} (once) ...", file=sys.stderr,
              flush=True)
        build_corpus("/usr/share/locale", cache)
    return str(cache)


def resolve_tokenizer(arg: str | None, model_dir: str | None, data: str | None) -> Path:
    """``arg``, else the model dir's ``tokenizer/``, the bundled tokenizer, then ``DATA/tokenizer``."""
    if arg:
        return Path(arg)
    cands = []
    if model_dir:
        cands.append(Path(model_dir) / "tokenizer")
    cands.append(BUNDLED / "tokenizer")
    if data:
        cands.append(Path(data) / "tokenizer")
    for c in cands:
        if c.exists():
            return c
    raise DataError(f"no tokenizer found (looked in {', '.join(map(str, cands))}); pass --tokenizer")
