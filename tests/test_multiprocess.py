"""Multi-host as users launch it: N CPU processes (gloo collectives, `jax.distributed`) equal one process.

One launcher starts N copies of this file (``python tests/test_multiprocess.py JOB.json``), each started by
``maybe_init_distributed`` from ``MOQE_COORDINATOR``/``MOQE_NUM_PROCESSES``/``MOQE_PROCESS_ID`` (the env route
of docs/LAUNCH.md). Each worker, on a mesh over all processes' devices (data×expert = N/2×2):

* pretraining: 2 processes train 2 steps from scratch and save an Orbax checkpoint (both write it), then
  restore the checkpoint ONE process (pytest) saved and train it on to step 4; 4 processes train 4 steps;
* runs 2 QAT steps (4-bit STE) from given float weights;
* runs the batched GPTQ solve (ternary, 6 experts: 4 devices get 2 dummy experts) sharded over the processes
  (``mesh`` with ``expert=N``; the calibration driver passes its mesh to this solve).

The pytest process computes the single-process references and restores the N-process checkpoint: losses,
restored parameters and GPTQ codes must equal the one-process run (losses to float rounding of the
partitioned reductions, restored parameters and GPTQ codes exactly).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moqe_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _cfg():
    from moqe_jax.config import SwitchConfig

    return SwitchConfig.preset("tiny", dtype="float32")


def _tc(mesh: dict | None = None, **kw):
    from moqe_jax.training import TrainConfig

    base = dict(steps=STEPS, batch_size=8, log_every=1000, eval_every=0, save_every=2, learning_rate=0.01,
                warmup_steps=10, async_save=False, mesh=mesh or {})
    base.update(kw)
    return TrainConfig(**base)


def _data(seed: int):
    from moqe_jax.training import SyntheticData

    return SyntheticData(_cfg().vocab_size, 8, 16, seed=seed % 1000)


def _params(seed: int) -> dict:
    """Random float weights as host NumPy (an eager Flax init would compile op by op in every process)."""
    from moqe_jax.model.api import param_shapes
    from moqe_jax.tree import unflatten_params

    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in param_shapes(_cfg()).items():
        leaf = path.rsplit("/", 1)[-1]
        std = 1.0 if (leaf == "scale" or "embedd" in path) else 1.0 / np.sqrt(shape[-2] if len(shape) > 1 else 1)
        flat[path] = (rng.standard_normal(shape) * std + (1.0 if leaf == "scale" else 0.0)).astype(np.float32)
    return unflatten_params(flat)


def _gptq(seed: int, mesh) -> dict:
    """GPTQ (ternary) of one stacked expert weight: 6 experts, so 4 devices get 2 dummy experts of padding."""
    from moqe_jax.packed.spec import QuantSpec
    from moqe_jax.quant.gptq import gptq_quantize

    rng = np.random.default_rng(seed)
    e, k, n = 6, 32, 16
    w = rng.standard_normal((e, k, n)).astype(np.float32)
    x = rng.standard_normal((e, 96, k)).astype(np.float32) @ rng.standard_normal((k, k)).astype(np.float32)
    qt, st = gptq_quantize(w, 2 * np.einsum("etk,etj->ekj", x, x), QuantSpec(bits="ternary"), mesh=mesh, group=None,
                           blocksize=16)
    out = {"codes": np.asarray(qt.codes()), "scales": np.asarray(qt.scales), "loss": st.loss}
    return out if qt.zeros is None else {**out, "zeros": np.asarray(qt.zeros)}


def _flat(params) -> dict:
    from moqe_jax.tree import flatten_params, to_host

    return flatten_params(to_host(params))


def _worker(job_file: str) -> None:
    """One of the N processes (run as a script)."""
    job = json.loads(Path(job_file).read_text())
    from moqe_jax.training import maybe_init_distributed

    assert maybe_init_distributed()  # from MOQE_COORDINATOR / MOQE_NUM_PROCESSES / MOQE_PROCESS_ID
    import jax

    from moqe_jax import sharding as shd
    from moqe_jax.training import train

    n, pid = jax.process_count(), jax.process_index()
    assert n == job["n"] and jax.device_count() == n, jax.devices()
    work = Path(job["work"])
    seed = job["seed"]
    mesh = {"data": n // 2, "expert": 2}
    cfg, quiet = _cfg(), (lambda s: None)
    out: dict = {}
    t0 = time.perf_counter()

    def phase(name: str) -> None:  # timings on stderr (shown when a worker fails)
        print(f"[process {pid}] {name} done at {time.perf_counter() - t0:.1f} s ({time.process_time():.1f} s CPU)",
              file=sys.stderr, flush=True)
    arrays: dict = {}
    if job["checkpoints"]:
        # pretraining from scratch, checkpoint saved by the N processes at step 2
        r = train(cfg, _tc(mesh), _data(seed), out_dir=work / "saved_by_n", stop_after=2, log=quiet)
        out["fresh_loss"] = [h["loss"] for h in r.history]
        arrays.update({f"fresh/{k}": v for k, v in _flat(r.params).items()})
        phase("pretrain")
        # the checkpoint ONE process saved: restored exactly (steps=2: no step runs), then trained on to step 4
        r = train(cfg, _tc(mesh, steps=2), _data(seed), out_dir=work / "saved_by_1", log=quiet)
        arrays.update({f"restored/{k}": v for k, v in _flat(r.params).items()})
        r = train(cfg, _tc(mesh), _data(seed), out_dir=work / "saved_by_1", log=quiet)
        out["resumed_loss"] = [h["loss"] for h in r.history]
        phase("restore + resume")
    else:  # pretraining from scratch, all steps
        r = train(cfg, _tc(mesh, save_every=0), _data(seed), log=quiet)
        out["fresh_loss"] = [h["loss"] for h in r.history]
        phase("pretrain")
    # QAT (STE, 4-bit experts) from the same float weights
    r = train(cfg, _tc(mesh, steps=2, save_every=0, qat_bits=4), _data(seed), init_params=_params(seed + 1), log=quiet)
    out["qat_loss"] = [h["loss"] for h in r.history]
    phase("qat")
    # GPTQ with the expert solves sharded over all processes
    gptq = _gptq(seed, shd.make_mesh({"expert": n}))
    phase("gptq")
    if pid == 0:
        np.savez(work / "worker.npz", **arrays, **{f"gptq/{k}": v for k, v in gptq.items()})
    print("RESULT" + json.dumps(out), flush=True)


def _launch(n: int, work: Path, seed: int, checkpoints: bool, timeout: int = 600) -> list[dict]:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    job = work / "job.json"
    job.write_text(json.dumps({"n": n, "work": str(work), "seed": seed, "checkpoints": checkpoints}))
    procs = []
    for i in range(n):
        env = dict(os.environ, MOQE_NO_PROGRESS="1", JAX_PLATFORMS="cpu", MOQE_COORDINATOR=f"localhost:{port}",
                   MOQE_NUM_PROCESSES=str(n), MOQE_PROCESS_ID=str(i), MOQE_DISTRIBUTED_TIMEOUT="120")
        env.pop("XLA_FLAGS", None)  # one CPU device per process
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(job)], env=env,
                                      cwd=str(REPO), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"process {len(outs)} failed:\n{e[-4000:]}"
            outs.append(json.loads(o.split("RESULT", 1)[1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _check_multiprocess(n: int, tmp_path: Path, seed: int, checkpoints: bool) -> None:
    from moqe_jax.training import train

    cfg, quiet = _cfg(), (lambda s: None)
    # single-process references (one device)
    ref = train(cfg, _tc(save_every=0), _data(seed), log=quiet)
    ref_loss = [h["loss"] for h in ref.history]
    assert np.all(np.isfinite(ref_loss)) and len(set(ref_loss)) == STEPS  # a real run (its batches differ)
    if checkpoints:
        one = train(cfg, _tc(), _data(seed), out_dir=tmp_path / "saved_by_1", stop_after=2, log=quiet)
        saved_by_1 = _flat(one.params)
    qat = train(cfg, _tc(steps=2, save_every=0, qat_bits=4), _data(seed), init_params=_params(seed + 1), log=quiet)
    gptq = _gptq(seed, None)

    outs = _launch(n, tmp_path, seed, checkpoints)
    assert all(o == outs[0] for o in outs), outs  # every process saw the same (replicated) metrics
    w = np.load(tmp_path / "worker.npz")
    np.testing.assert_allclose(outs[0]["fresh_loss"], ref_loss[:len(outs[0]["fresh_loss"])], rtol=2e-5)
    np.testing.assert_allclose(outs[0]["qat_loss"], [h["loss"] for h in qat.history], rtol=2e-5)
    # GPTQ sharded over N processes: the same codes, scales, zeros and losses as one process
    assert {k[5:] for k in w.files if k.startswith("gptq/")} == set(gptq)
    for k, v in gptq.items():
        np.testing.assert_array_equal(w[f"gptq/{k}"], v, err_msg=k)
    if not checkpoints:
        assert len(outs[0]["fresh_loss"]) == STEPS
        return
    # the checkpoint one process saved, restored by N processes: identical parameters, then the same losses
    for k, v in saved_by_1.items():
        np.testing.assert_array_equal(w[f"restored/{k}"], v, err_msg=k)
    np.testing.assert_allclose(outs[0]["resumed_loss"], ref_loss[2:], rtol=2e-5)
    # the checkpoint N processes saved, restored by one process (steps=2: nothing trained): identical
    back = _flat(train(cfg, _tc(steps=2), _data(seed), out_dir=tmp_path / "saved_by_n", log=quiet).params)
    assert set(back) == set(saved_by_1)
    for k, v in back.items():
        np.testing.assert_array_equal(w[f"fresh/{k}"], v, err_msg=k)
    # ... and trained on by one process, it follows the one-process run
    on = train(cfg, _tc(), _data(seed), out_dir=tmp_path / "saved_by_n", log=quiet)
    np.testing.assert_allclose([h["loss"] for h in on.history], ref_loss[2:], rtol=2e-5)


_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
          "SLURM_LOCALID": "1"}


def test_start_settings_from_flags_env_and_cluster() -> None:
    from moqe_jax.training.distributed import resolve_distributed

    assert resolve_distributed(environ={}) is None  # a plain single-process run
    st = resolve_distributed(environ={"MOQE_COORDINATOR": "h0:1234", "MOQE_NUM_PROCESSES": "4",
                                      "MOQE_PROCESS_ID": "3"})
    assert (st.coordinator, st.num_processes, st.process_id, st.cluster) == ("h0:1234", 4, 3, None)
    st = resolve_distributed("h1:99", 2, 1, environ={"MOQE_COORDINATOR": "h0:1234", "MOQE_NUM_PROCESSES": "4"})
    assert (st.coordinator, st.num_processes, st.process_id) == ("h1:99", 2, 1)  # flags win over the environment
    st = resolve_distributed(environ={"JAX_COORDINATOR_ADDRESS": "h2:5", "JAX_NUM_PROCESSES": "2",
                                      "JAX_PROCESS_ID": "0"})
    assert (st.coordinator, st.num_processes, st.process_id) == ("h2:5", 2, 0)
    # SLURM srun: JAX's cluster code fills coordinator/count/id; one task is a single-process run
    st = resolve_distributed(environ=_SLURM)
    assert (st.cluster, st.cluster_processes, st.coordinator, st.num_processes) == ("slurm", 4, None, None)
    assert resolve_distributed(environ={**_SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    st = resolve_distributed(environ={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "2"})
    assert (st.cluster, st.cluster_processes) == ("tpu", 4)
    assert resolve_distributed(environ={"TPU_WORKER_HOSTNAMES": "t0"}) is None  # a single-host TPU VM
    st = resolve_distributed(environ={"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4", "OMPI_COMM_WORLD_SIZE": "8"})
    assert (st.cluster, st.cluster_processes) == ("ompi", 8)
    assert resolve_distributed(mode="off", environ=_SLURM) is None
    st = resolve_distributed(environ={"MOQE_DISTRIBUTED": "on"})  # JAX's full detection (e.g. GCE TPU metadata)
    assert st is not None and st.cluster is None and st.coordinator is None


@pytest.mark.parametrize(("kw", "env", "match"), [
    ({}, {"MOQE_COORDINATOR": "h0:1234"}, "half-configured.*--num-processes.*--process-id.*missing"),
    ({"coordinator": "h0:1234", "num_processes": 2}, {}, "half-configured.*--process-id/MOQE_PROCESS_ID missing"),
    ({"num_processes": 2, "process_id": 0}, {}, "--coordinator/MOQE_COORDINATOR missing"),
    ({"coordinator": "h0:1234", "num_processes": 2, "process_id": 2}, {}, "process-id.*=2 is outside 0..1"),
    ({"coordinator": "h0", "num_processes": 2, "process_id": 0}, {}, "HOST:PORT"),
    ({}, {"MOQE_COORDINATOR": "h0:1", "MOQE_NUM_PROCESSES": "two", "MOQE_PROCESS_ID": "0"},
     "MOQE_NUM_PROCESSES='two': expected an integer"),
    ({"num_processes": 2}, _SLURM, "SLURM_NTASKS|slurm launcher started 4"),
    ({"coordinator": "h0:1"}, {"MOQE_DISTRIBUTED": "off"}, "MOQE_DISTRIBUTED=off but --coordinator"),
    ({}, {"MOQE_DISTRIBUTED": "yes"}, "use auto, on or off"),
])
def test_half_configured_start_is_one_clear_error(kw: dict, env: dict, match: str) -> None:
    from moqe_jax.training.distributed import resolve_distributed

    with pytest.raises(ConfigError, match=match):
        resolve_distributed(**kw, environ=env)


def test_cli_half_configured_start_fails_before_any_work(tmp_path: Path, capsys, monkeypatch) -> None:
    from moqe_jax.cli import main

    for k in ("MOQE_COORDINATOR", "MOQE_NUM_PROCESSES", "MOQE_PROCESS_ID", "MOQE_DISTRIBUTED",
              "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    rc = main(["train", "--config", "tiny", "--data", "synthetic", "--steps", "1", "--out", str(tmp_path / "r"),
               "--coordinator", "localhost:1", "--num-processes", "2"])
    assert rc == 2 and "half-configured" in capsys.readouterr().err and not (tmp_path / "r").exists()
    rc = main(["compress", "init:tiny", "--out", str(tmp_path / "c"), "--process-id", "1"])
    assert rc == 2 and "--coordinator/MOQE_COORDINATOR" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_two_processes_equal_one_and_checkpoints_cross_process_counts(tmp_path: Path, seed: int) -> None:
    _check_multiprocess(2, tmp_path, seed, checkpoints=True)


def test_four_processes_equal_one(tmp_path: Path, seed: int) -> None:
    _check_multiprocess(4, tmp_path, seed, checkpoints=False)


if __name__ == "__main__":
    _worker(sys.argv[1])
