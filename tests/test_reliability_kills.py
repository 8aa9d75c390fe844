"""Real SIGKILLs at random points of `moqe train` and `moqe compress --resume` (issue 16, "Done when"): after
every kill the rerun continues, the final result is bit-identical to an uninterrupted run, nothing outside the
run's own paths is created or deleted. Kill times come from the logged `seed` fixture (replay with
MOQE_TEST_SEED). Every process shares one JAX persistent compilation cache, so only the uninterrupted reference
run compiles and the killed runs reach their interesting part (steps and saves) within a second or two.

(Simulated crashes at fixed points are in tests/test_train_loop.py, tests/test_gptq_calibrate.py and
tests/test_reliability_store.py; saves alone are SIGKILLed in tests/test_reliability_store.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from moqe_jax import api

_CLI = "import sys; from moqe_jax.cli import main; sys.exit(main())"
_TRAIN = ["train", "--config", "tiny", "--set", 'dtype="float32"', "--data", "synthetic", "--steps", "6",
          "--batch-size", "8", "--warmup", "10", "--log-every", "1", "--eval-every", "0", "--save-every", "1",
          "--keep", "2"]
_COMPRESS = ["compress", "init:tiny", "--bits", "ternary", "--samples", "2", "--batch-size", "2", "--seq-len", "8",
             "--group-experts", "2", "--resume"]


def _env(cache: Path) -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", MOQE_NO_PROGRESS="1", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _run(args: list[str], env: dict[str, str]) -> str:
    p = subprocess.run([sys.executable, "-u", "-c", _CLI, *args], env=env, capture_output=True, text=True,
                       timeout=240, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def _kill(args: list[str], env: dict[str, str], delay: float, after_line: str | None = None) -> int | None:
    """Start the CLI, wait for a stdout line starting with ``after_line`` (if given), sleep ``delay`` and SIGKILL
    it. Returns the exit code when it finished before the kill, else None."""
    p = subprocess.Popen([sys.executable, "-u", "-c", _CLI, *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    assert p.stdout is not None
    if after_line is not None:
        for line in p.stdout:
            if line.startswith(after_line):
                break
    time.sleep(delay)
    rc = p.poll()
    if rc is None:
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    p.stdout.close()
    return rc


def _leaves(d: Path) -> tuple[object, list[np.ndarray]]:
    m = api.load_model(str(d))
    leaves, tree = jax.tree_util.tree_flatten(m.params)
    return tree, [np.asarray(x) for x in leaves]


def _assert_identical(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1], strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_sigkill_loop_train_resumes_to_the_uninterrupted_result(tmp_path, seed):
    rng = random.Random(seed)
    env = _env(tmp_path / "jax-cache")
    _run(_TRAIN + ["--out", str(tmp_path / "ref")], env)  # uninterrupted (and fills the compilation cache)
    ref = _leaves(tmp_path / "ref" / "model")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("user data")
    run = work / "run"
    for i in range(4):
        # the kill lands while steps run and checkpoints are written (async Orbax saves, keep-2 deletions),
        # or during the model export at the end
        delay = rng.uniform(0.0, 2.6)
        rc = _kill(_TRAIN + ["--out", str(run)], env, delay, after_line="training tiny")
        print(f"kill {i}: {delay:.2f} s after the first step started, {'finished first' if rc == 0 else 'killed'}")
        assert sorted(os.listdir(work)) == ["keep.txt", "run"]
        assert (work / "keep.txt").read_text() == "user data"
    out = _run(_TRAIN + ["--out", str(run)], env)
    assert "resumed from" in out or "compiling" in out
    _assert_identical(ref, _leaves(run / "model"))
    assert sorted(os.listdir(work)) == ["keep.txt", "run"]
    assert set(os.listdir(run)) <= {"checkpoints", "metrics.jsonl", "model", "model_config.json",
                                    "train_config.json"}
    ck = os.listdir(run / "checkpoints")
    assert ck and all(n.isdigit() for n in ck), ck  # no partial `<step>.orbax-checkpoint-tmp-*` left
    assert [n for n in os.listdir(run / "model") if n.startswith(".")] == []


def test_sigkill_loop_compress_resume_is_bit_identical(tmp_path, seed):
    rng = random.Random(seed)
    env = _env(tmp_path / "jax-cache")
    _run(_COMPRESS + ["--out", str(tmp_path / "ref")], env)
    ref = _leaves(tmp_path / "ref")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("user data")
    out = work / "o"
    allowed = {"keep.txt", "o", "o.gptq-progress", "o.gptq-progress.removing"}
    for i in range(3):
        # a warm run takes ~5 s: loading ~2 s, then calibration, per-layer progress saves, the final save and
        # the removal of the progress directory
        delay = rng.uniform(1.0, 6.0)
        rc = _kill(_COMPRESS + ["--out", str(out)], env, delay)
        print(f"kill {i}: at {delay:.2f} s, {'finished first' if rc == 0 else 'killed'}")
        names = set(os.listdir(work))
        assert {n for n in names if not n.startswith(".o.")} <= allowed, names  # .o.tmp-*: the store's own
        assert (work / "keep.txt").read_text() == "user data"
        if out.exists():  # the store makes OUT appear complete or not at all
            _assert_identical(ref, _leaves(out))
    _run(_COMPRESS + ["--out", str(out)], env)
    _assert_identical(ref, _leaves(out))
    assert sorted(os.listdir(work)) == ["keep.txt", "o"]


def test_kill_while_removing_finished_progress_never_blocks_the_next_resume(tmp_path, monkeypatch):
    """A kill while `moqe compress` removes its finished OUT.gptq-progress must not leave a half-deleted progress
    directory that the next `--resume` refuses (it is renamed aside first, in one step)."""
    import shutil

    from moqe_jax.calibration.driver import _Progress
    from moqe_jax.commands import compress

    prog = tmp_path / "o.gptq-progress"
    _Progress(str(prog), "fp", resume=True).save_step(1, "encoder", [], [], [np.zeros(3, np.float32)], None)
    real = shutil.rmtree

    def killed(path, ignore_errors=False):  # deletes the progress manifest, then the process dies
        if not os.path.exists(path):
            return real(path, ignore_errors=ignore_errors)
        os.remove(os.path.join(path, "state", "moqe_model.json"))
        raise SystemExit("killed")
    monkeypatch.setattr(shutil, "rmtree", killed)
    try:
        compress._remove_progress(str(prog))
    except SystemExit:
        pass
    monkeypatch.undo()
    assert _Progress(str(prog), "fp", resume=True).state is None  # no progress: the rerun starts over
    compress._remove_progress(str(prog))
    assert os.listdir(tmp_path) == []
