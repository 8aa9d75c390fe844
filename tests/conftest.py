"""Test-run rules: every test's random inputs come from a logged, replayable seed; nothing skips silently.

- ``seed`` fixture: a fresh 32-bit seed per test, or ``MOQE_TEST_SEED`` to replay one. A failing test's
  report shows the seed and the command that replays it.
- A skip is a failure unless the test is marked ``gpu`` and the machine has no CUDA GPU (a missing test
  dependency or a broken project module must fail the run, not shrink it).
- The terminal summary counts the GPU-marked tests that were skipped, so the CI log shows it.
- The ``moqe`` CLI's persistent compilation cache is off for the suite (``MOQE_COMPILATION_CACHE=0``, inherited
  by subprocesses): a test run neither reads nor fills ``~/.cache``; tests/test_compile_cache.py turns it on
  in its own subprocesses.
"""

from __future__ import annotations

import functools
import os
import secrets

import pytest

SEED_ENV = "MOQE_TEST_SEED"
os.environ["MOQE_COMPILATION_CACHE"] = "0"
_SEED = pytest.StashKey[int]()


@functools.cache
def _cuda_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop jax's compiled executables after each test module, so one pytest process does not carry every
    program of the suite. (A full CI run once segfaulted inside XLA:CPU compilation late in the run, in a
    test that passes alone; keeping the process small is the mitigation, the cause is not known.)"""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed: ``MOQE_TEST_SEED`` when set (replay), otherwise fresh each run."""
    env = os.environ.get(SEED_ENV)
    value = int(env) if env else secrets.randbits(32)
    request.node.stash[_SEED] = value
    request.node.user_properties.append(("seed", value))
    return value


def _skip_allowed(item: pytest.Item) -> bool:
    return item.get_closest_marker("gpu") is not None and not _cuda_gpu()


def _skip_reason(rep: pytest.TestReport | pytest.CollectReport) -> str:
    lr = rep.longrepr
    return str(lr[2]) if isinstance(lr, tuple) and len(lr) == 3 else str(lr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    if item.stash.get(_SEED, None) is not None:
        s = item.stash[_SEED]
        rep.sections.append(("seed", f"seed {s}; replay: {SEED_ENV}={s} python -m pytest '{item.nodeid}'"))
    if rep.skipped and not hasattr(rep, "wasxfail") and not _skip_allowed(item):
        rep.outcome = "failed"
        rep.longrepr = f"skipped, but only GPU-marked tests may skip (and only without a CUDA GPU): {_skip_reason(rep)}"
    return rep


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A whole module that skips (``pytest.importorskip`` / ``pytest.skip(allow_module_level=True)``) fails."""
    rep = yield
    if rep.skipped:
        rep.outcome = "failed"
        rep.longrepr = f"{collector.nodeid}: module skipped at collection: {_skip_reason(rep)}"
    return rep


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    n = sum(1 for r in terminalreporter.stats.get("skipped", []) if "gpu" in getattr(r, "keywords", {}))
    if n:
        terminalreporter.write_line(f"GPU-marked tests skipped: {n} (no CUDA GPU)")
    else:
        where = "CUDA GPU present" if _cuda_gpu() else "no CUDA GPU"
        terminalreporter.write_line(f"GPU-marked tests skipped: 0 ({where})")
