"""The test run fails loudly (tests/conftest.py): a broken project module, a skip outside GPU-marked tests and
a module-level importorskip fail the run; GPU-marked skips are counted in the summary; seeds replay."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

_BREAK_SPEC = '''
import importlib.abc
import sys


class _Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "moqe_jax.packed.spec":
            raise ImportError("moqe_jax.packed.spec: deliberately broken")
        return None


sys.meta_path.insert(0, _Broken())
'''

_RULES = '''
import pytest


def test_plain_skip():
    pytest.skip("not allowed")


@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_gpu_skip():
    pass


def test_seeded(seed):
    print(f"SEED={seed}")
    assert seed < 0
'''


def _pytest(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "MOQE_TEST_SEED"}
    full.update(JAX_PLATFORMS="cpu", MOQE_NO_PROGRESS="1", **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=600)


def test_broken_project_module_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "break_spec.py").write_text(_BREAK_SPEC)
    r = _pytest(["-q", "-p", "break_spec", "tests/test_qtensor.py"], ROOT,
                PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "deliberately broken" in out and "passed" not in out


def test_skips_fail_except_gpu_marked_and_seed_replays(tmp_path: Path) -> None:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
    (tmp_path / "test_rules.py").write_text(_RULES)
    (tmp_path / "test_module_skip.py").write_text('import pytest\npytest.importorskip("no_such_module_xyz")\n')
    r = _pytest(["-rA", "--continue-on-collection-errors", "test_rules.py", "test_module_skip.py"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert re.search(r"FAILED test_rules.py::test_plain_skip - skipped, but only GPU-marked", out), out
    assert "SKIPPED [1] test_rules.py" in out and "GPU-marked tests skipped: 1 (no CUDA GPU)" in out, out
    assert "ERROR test_module_skip.py" in out and "no_such_module_xyz" in out, out
    seed = int(re.search(r"SEED=(\d+)", out).group(1))
    assert f"replay: MOQE_TEST_SEED={seed} python -m pytest 'test_rules.py::test_seeded'" in out, out
    again = _pytest(["-rA", "test_rules.py::test_seeded"], tmp_path, MOQE_TEST_SEED=str(seed))
    assert f"SEED={seed}" in again.stdout, again.stdout
