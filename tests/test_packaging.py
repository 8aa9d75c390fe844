"""The wheel installs exactly `moqe_jax` and `pallas_kernels`, and works next to a project that has its own
`configs/`, `train/` and `eval/` packages (no top-level names of ours can shadow or be shadowed by them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["MOQE_NO_PROGRESS"] = "1"
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def test_wheel_installs_two_packages_and_runs_next_to_a_foreign_project(tmp_path: Path) -> None:
    # build from a copy of what the wheel is made of, so the checkout gets no build/ folder
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    for d in ("moqe_jax", "pallas_kernels"):
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], cwd=tmp_path)
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"moqe_jax", "pallas_kernels"}
    assert {"moqe_jax/configs/presets.toml", "moqe_jax/py.typed", "pallas_kernels/py.typed"} <= set(names)

    # a scratch venv: the wheel in its own site-packages, dependencies from this test environment (no network)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "test_env_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp_path)

    proj = tmp_path / "proj"
    for pkg in ("configs", "train", "eval"):
        (proj / pkg).mkdir(parents=True)
        (proj / pkg / "__init__.py").write_text(f"OWNER = 'proj.{pkg}'\n")
    out = _run([str(venv / "bin" / "moqe"), "info", "--preset", "switch-base-8"], cwd=proj).stdout
    assert out.startswith("switch-base-8: d_model=768") and "experts=8" in out
    code = ("import configs, train, eval, moqe_jax; from moqe_jax import SwitchConfig; "
            "c = SwitchConfig.preset('switch-base-8'); "
            "print(c.name, c.num_experts, configs.OWNER, train.OWNER, eval.OWNER, moqe_jax.__file__)")
    name, experts, *owners, where = _run([str(py), "-c", code], cwd=proj).stdout.split()
    assert (name, experts) == ("switch-base-8", "8")
    assert owners == ["proj.configs", "proj.train", "proj.eval"]
    assert Path(where).is_relative_to(site)  # the installed wheel, not the checkout
