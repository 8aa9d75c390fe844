"""Training loop: loss terms vs NumPy, 4-device CPU mesh = single device, kill-and-resume, bad configs.

(2 and 4 processes, checkpoints across process counts: tests/test_multiprocess.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from _helpers import tiny_f32_config, tiny_train_config

from moqe_jax import sharding as shd
from moqe_jax.errors import ConfigError
from moqe_jax.training import SyntheticData, cross_entropy_with_z_loss, train

REPO = Path(__file__).resolve().parents[1]


_cfg = tiny_f32_config
_tc = tiny_train_config


def test_cross_entropy_with_z_loss_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)) * 3
    targets = rng.integers(0, 11, size=(3, 5))
    w = (rng.random((3, 5)) > 0.3).astype(np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    ce_ref = ((lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]) * w).sum()
    z_ref = (1e-4 * lse ** 2 * w).sum()
    tot, ce, z = cross_entropy_with_z_loss(logits.astype(np.float32), targets, w.astype(np.float32), 1e-4)
    np.testing.assert_allclose([float(tot), float(ce), float(z)], [ce_ref + z_ref, ce_ref, z_ref], rtol=1e-5)


def test_sharding_rules() -> None:
    from moqe_jax.model.switch import init_params

    cfg = _cfg()
    abstract = jax.eval_shape(lambda: init_params(cfg, 0))
    axes = {"/".join(str(getattr(k, "key", k)) for k in kp): a for kp, a in
            jax.tree_util.tree_flatten_with_path(shd.param_axes(abstract), is_leaf=lambda x: isinstance(x, tuple))[0]}
    assert axes["encoder/layers_1/mlp/expert/wi/kernel"] == ("expert", "embed", "mlp")
    assert axes["decoder/layers_1/mlp/expert/wo/kernel"] == ("expert", "mlp", "embed")
    assert axes["token_embedder/embedding"] == ("vocab", "embed")
    assert axes["encoder/layers_0/attention/query/kernel"] == ("embed", "heads")
    assert axes["encoder/layers_0/mlp/wi/kernel"] == ("embed", "mlp")
    assert all(v != (None,) * len(v) or "router" in k or "norm" in k or "scale" in k for k, v in axes.items())
    assert shd.parse_mesh("data=2,expert=2") == {"data": 2, "expert": 2, "model": 1}
    with pytest.raises(ConfigError, match="bad mesh spec"):
        shd.parse_mesh("gpu=2")


def test_config_does_not_fit_mesh_errors_before_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    import moqe_jax.model.switch as sw

    def boom(*a, **k):  # any model compute would call init_params
        raise AssertionError("computed before validating the mesh")

    monkeypatch.setattr(sw, "init_params", boom)
    cfg = _cfg()  # 4 experts
    with pytest.raises(ConfigError, match="num_experts=4 is not divisible by the mesh expert axis \\(3\\)"):
        train(cfg, _tc(mesh={"expert": 3}), SyntheticData(cfg.vocab_size, 6))
    with pytest.raises(ConfigError, match="batch size 6 is not divisible by the data-parallel size 4"):
        train(cfg, _tc(mesh={"data": 2, "expert": 2}), SyntheticData(cfg.vocab_size, 6))
    with pytest.raises(ConfigError, match="d_ff=64 is not divisible by the mesh model axis \\(3\\)"):
        train(cfg, _tc(mesh={"model": 3}), SyntheticData(cfg.vocab_size, 6))
    with pytest.raises(ConfigError, match="needs 64 devices"):
        train(cfg, _tc(mesh={"data": 16, "expert": 4}), SyntheticData(cfg.vocab_size, 64))
    with pytest.raises(ConfigError, match="QAT needs a trained model"):
        train(cfg, _tc(qat_bits=2), SyntheticData(cfg.vocab_size, 8))


def _flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_kill_and_resume_reaches_same_params(tmp_path: Path) -> None:
    cfg = _cfg()
    data = SyntheticData(cfg.vocab_size, 8, 16, seed=1)
    ref = train(cfg, _tc(steps=5), data)
    # "killed" after the checkpoint at step 3 (a fresh manager and a fresh train() call resume it)
    part = train(cfg, _tc(steps=5, save_every=3, async_save=True), data, out_dir=tmp_path, stop_after=3)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert part.step == 3 and steps == [3]
    res = train(cfg, _tc(steps=5, save_every=3), data, out_dir=tmp_path)
    assert res.step == 5 and [h["step"] for h in res.history] == [4, 5]
    np.testing.assert_allclose([h["loss"] for h in res.history], [h["loss"] for h in ref.history[3:]], rtol=1e-6)
    a, b = _flat(ref.params), _flat(res.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert set(metrics[0]) >= {"loss", "ce", "aux_loss", "dropped_fraction", "expert_usage", "grad_norm"}


_MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    from moqe_jax.config import SwitchConfig
    from moqe_jax.training import SyntheticData, TrainConfig, train
    assert len(jax.devices()) == 4, jax.devices()
    cfg = SwitchConfig.preset("tiny", dtype="float32")
    data = SyntheticData(cfg.vocab_size, 8, 16, seed=1)
    out = {{}}
    for name, mesh in (("mesh", {{"data": 2, "expert": 2}}),):
        tc = TrainConfig(steps=4, batch_size=8, log_every=1000, eval_every=0, save_every=0, mesh=mesh,
                         warmup_steps=10, optimizer={opt!r})
        r = train(cfg, tc, data, log=lambda s: None)
        w = r.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
        out[name] = {{"loss": [h["loss"] for h in r.history], "aux": [h["aux_loss"] for h in r.history],
                      "w": np.asarray(w).ravel()[::97].tolist(), "nshards": len(w.addressable_shards),
                      "shard_shape": list(w.addressable_shards[0].data.shape)}}
    print("RESULT" + json.dumps(out))
""")


def _run(script: str, env_extra: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, MOQE_NO_PROGRESS="1", JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))


def test_four_device_mesh_matches_single_device() -> None:
    p = _run(_MESH_SCRIPT.format(repo=str(REPO), opt="adafactor"),
             {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(p.stdout.split("RESULT", 1)[1])["mesh"]
    assert m["nshards"] == 4 and m["shard_shape"][0] == 2  # 4 experts over expert=2: 2 per device
    # single-device reference, same seed and batches (in this process: reuses the compiled step)
    cfg = _cfg()
    r = train(cfg, _tc(steps=4), SyntheticData(cfg.vocab_size, 8, 16, seed=1))
    w = r.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    s = {"loss": [h["loss"] for h in r.history], "aux": [h["aux_loss"] for h in r.history],
         "w": np.asarray(w).ravel()[::97].tolist()}
    np.testing.assert_allclose(m["loss"], s["loss"], rtol=2e-5)
    np.testing.assert_allclose(m["aux"], s["aux"], rtol=2e-5)
    np.testing.assert_allclose(m["w"], s["w"], rtol=1e-4, atol=1e-6)
    assert s["loss"][-1] < s["loss"][0]


def test_mlm_objective_trains() -> None:
    """Span-corruption (T5 MLM) data through the same loop: deterministic batches, loss goes down."""
    from moqe_jax.training import MLMData

    cfg = _cfg()  # vocab 128: sentinels 28..127, real tokens 3..27
    rng = np.random.default_rng(0)
    sents = [list(rng.integers(3, 28, rng.integers(4, 12))) for _ in range(200)]
    data = MLMData(sents, sents[:50], cfg.vocab_size, batch_size=8, inputs_length=16)
    b0, b0b = data.batch(0), data.batch(0)
    assert b0["input_ids"].shape == (8, 16) and np.array_equal(b0["targets"], b0b["targets"])
    assert (b0["input_ids"] >= cfg.vocab_size - 100).any()  # sentinels present
    r = train(cfg, _tc(steps=6, learning_rate=0.05, eval_every=6, eval_batches=2), data)
    assert np.mean([h["ce"] for h in r.history[-2:]]) < np.mean([h["ce"] for h in r.history[:2]])
    assert r.eval_history and np.isfinite(r.eval_history[-1]["eval_ce"])
