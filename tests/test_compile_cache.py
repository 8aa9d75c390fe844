"""``moqe_jax.enable_compilation_cache``: a second process loads the decode loop from JAX's persistent cache.

The cache is switched on only inside subprocesses (conftest.py keeps it off for the suite); hits and misses
are read from JAX's own monitoring events, so a cache that is silently not used fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moqe_jax
from moqe_jax import cli
from moqe_jax.cache import MIN_COMPILE_SECONDS, cache_root, default_cache_dir, enable_compilation_cache
from moqe_jax.packed import sub1_dict

ROOT = Path(__file__).resolve().parents[1]

# one greedy generate of a tiny random model; prints the cache dir in use, the minimum compile time it set, and
# JAX's cache hit/miss counts (every program is cached here: a fast machine may compile the tiny loop in < 0.5 s)
_SCRIPT = r"""
import json, sys
import jax, numpy as np
counts = {"hits": 0, "misses": 0}
def on_event(name, **kw):
    if name == "/jax/compilation_cache/cache_hits": counts["hits"] += 1
    if name == "/jax/compilation_cache/cache_misses": counts["misses"] += 1
jax.monitoring.register_event_listener(on_event)
import moqe_jax
d = moqe_jax.enable_compilation_cache(*sys.argv[1:])
min_s = jax.config.jax_persistent_cache_min_compile_time_secs
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # every program, however fast this machine
from moqe_jax.api import Model
m = Model.init("tiny", seed=0)
out = np.asarray(m.generate(np.array([[5, 6, 7, 1]]), max_new_tokens=3))
print(json.dumps({"dir": None if d is None else str(d), "min_s": min_s, "out": out.tolist(), **counts}))
"""


def _run(env_extra: dict[str, str], *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOQE_COMPILATION_CACHE", "JAX_COMPILATION"))}
    env.update(env_extra, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, *args], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_second_process_hits_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "xla"
    first = _run({"MOQE_COMPILATION_CACHE_DIR": str(cache)})
    assert first["dir"] == str(cache) and first["min_s"] == MIN_COMPILE_SECONDS
    assert first["misses"] >= 1, first  # (a program compiled twice in one process may already hit)
    assert any(cache.iterdir()), "nothing was written to the cache directory"
    second = _run({"MOQE_COMPILATION_CACHE_DIR": str(cache)})
    assert second["hits"] >= 1 and second["misses"] == 0, second  # every program now comes from disk
    assert second["out"] == first["out"]  # and computes the same tokens


def test_off_switch_and_existing_jax_setting(tmp_path: Path) -> None:
    off = _run({"MOQE_COMPILATION_CACHE": "0", "MOQE_COMPILATION_CACHE_DIR": str(tmp_path / "a")})
    assert off["dir"] is None and off["hits"] == 0 and not (tmp_path / "a").exists()
    # a directory chosen for JAX itself is kept (and used), not replaced by ours
    kept = _run({"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax"), "MOQE_COMPILATION_CACHE_DIR": str(tmp_path / "b")})
    assert kept["dir"] == str(tmp_path / "jax") and not (tmp_path / "b").exists()
    # an explicit path argument wins over the default directory
    explicit = _run({"MOQE_COMPILATION_CACHE_DIR": str(tmp_path / "c")}, str(tmp_path / "d"))
    assert explicit["dir"] == str(tmp_path / "d") and not (tmp_path / "c").exists()


def test_unwritable_dir_leaves_jax_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jax

    monkeypatch.delenv("MOQE_COMPILATION_CACHE")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    before = jax.config.jax_compilation_cache_dir
    assert enable_compilation_cache(blocker / "xla") is None
    assert jax.config.jax_compilation_cache_dir == before


def test_default_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MOQE_COMPILATION_CACHE_DIR", "MOQE_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "moqe_jax" and default_cache_dir() == tmp_path / "moqe_jax" / "xla"
    monkeypatch.setenv("MOQE_CACHE_DIR", str(tmp_path / "root"))  # the one root of moqe's caches
    assert default_cache_dir() == tmp_path / "root" / "xla"
    assert sub1_dict._cache_path().parent == tmp_path / "root"
    monkeypatch.setenv("MOQE_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert moqe_jax.enable_compilation_cache is enable_compilation_cache  # the public name


def test_cli_turns_the_cache_on_before_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    calls: list[str] = []
    parser = argparse.ArgumentParser(prog="moqe")
    parser.add_subparsers(dest="command", required=True).add_parser("probe").set_defaults(
        func=lambda args: calls.append("command") or 0)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: calls.append("cache"))
    assert cli.main(["probe"]) == 0
    assert calls == ["cache", "command"]
    parser = argparse.ArgumentParser(prog="moqe")  # a command that never compiles opts out
    parser.add_subparsers(dest="command", required=True).add_parser("probe").set_defaults(
        func=lambda args: calls.append("command") or 0, uses_jax=False)
    calls.clear()
    assert cli.main(["probe"]) == 0
    assert calls == ["command"]


def test_data_build_never_imports_jax(tmp_path: Path) -> None:
    """`moqe data build` (parsing + SentencePiece) runs without the ~1 s jax import: no compilation cache."""
    argv = ["data", "build", "--locale-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    code = f"import sys; from moqe_jax.cli import main; rc = main({argv!r}); print(rc, 'jax' in sys.modules)"
    env = {**os.environ, "MOQE_COMPILATION_CACHE": "1", "MOQE_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr
    assert "locale directory does not exist" in out.stderr and not (tmp_path / "cache").exists()


def test_corpus_cache_lives_under_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moqe_jax.data import locate

    for var in ("MOQE_DATA", "MOQE_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert locate.cached_corpus_dir() == tmp_path / "xdg" / "moqe_jax" / "corpus"
    assert locate.default_data_dir() is None
    legacy = tmp_path / "xdg" / "moqe" / "corpus"  # where 0.1.0 cached it: still found
    legacy.mkdir(parents=True)
    (legacy / "test.jsonl").write_text("{}\n")
    assert locate.default_data_dir() == str(legacy)
    monkeypatch.setenv("MOQE_CACHE_DIR", str(tmp_path / "root"))
    new = tmp_path / "root" / "corpus"
    new.mkdir(parents=True)
    (new / "test.jsonl").write_text("{}\n")
    assert locate.cached_corpus_dir() == new and locate.default_data_dir() == str(new)  # the root wins


def test_help_lists_every_environment_variable_the_package_reads() -> None:
    """`moqe --help` names each ``MOQE_*`` variable that ``moqe_jax`` reads (so the list cannot go stale)."""
    import re

    pkg = Path(moqe_jax.__file__).parent
    names = {m for f in pkg.rglob("*.py") for m in re.findall(r"[\"'](MOQE_[A-Z_]+)[\"']", f.read_text())}
    assert {"MOQE_KERNELS", "MOQE_COMPILATION_CACHE", "MOQE_CACHE_DIR"} <= names  # the scan finds them
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", cli.ENVIRONMENT))
    assert not missing, f"moqe --help does not list {missing}"
    assert cli.ENVIRONMENT in cli.build_parser().format_help()
