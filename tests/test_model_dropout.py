"""Fine-tuning options of Flaxformer's T5/MoE architecture (docs/FINETUNING.md): dropout (where it sits, its
broadcast masks, rates, determinism, off at eval), the training loop's per-step dropout key (reproducible, resumes
exactly, QAT), Flaxformer's sparse layer layouts vs a transcription of its rule, and ``num_expert_replicas > 1`` vs
a NumPy reference of the MoE layer."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import np_top1_dispatch

from moqe_jax.api import Model, param_shapes
from moqe_jax.config import SwitchConfig, layout_sparse_indices
from moqe_jax.errors import ConfigError
from moqe_jax.model.layers import Experts, MlpBlock, MoeLayer, MultiHeadAttention, dropout
from moqe_jax.model.switch import SwitchTransformer, init_params, train_rngs
from moqe_jax.training import SyntheticData, TrainConfig, train

_init = jax.jit(init_params, static_argnums=(0, 1))


def _cfg(**kw) -> SwitchConfig:
    return SwitchConfig.preset("tiny", dtype="float32", **kw)


def _ids(seed: int, v: int = 128) -> tuple[jax.Array, jax.Array]:
    rs = np.random.default_rng(seed)
    ids = rs.integers(2, v, (2, 9))
    ids[1, 7:] = 0
    dec = rs.integers(2, v, (2, 6))
    dec[:, 0] = 0
    return jnp.asarray(ids), jnp.asarray(dec)


def _zero_fraction_ok(zero: np.ndarray, rate: float) -> None:
    """The fraction of dropped entries is within 5 binomial standard deviations of ``rate``."""
    n = zero.size
    assert abs(zero.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / n) + 1e-12, (zero.mean(), rate, n)


# ---- Flaxformer's sparse layer layouts ---------------------------------------------------------------------
def _flaxformer_is_sparse(layer: int, num_layers: int, num_sparse: int, layout: str) -> bool:
    """Transcription of flaxformer moe_architecture._is_sparse_layer (docs/FINETUNING.md §2)."""
    if layout == "bottom":
        return layer < num_sparse
    if layout == "middle":
        return num_layers - num_sparse <= 2 * layer < num_layers + num_sparse
    if layout == "mixed" and num_sparse > 0:
        sparse_index = num_layers // num_sparse
        return layer % sparse_index == sparse_index - 1
    if layout == "top":
        return layer >= num_layers - num_sparse
    return False


def test_layouts_match_flaxformer_rule() -> None:
    for n_layers in (1, 2, 3, 4, 6, 7, 12, 15, 24):
        for n in range(n_layers + 1):
            for layout in ("bottom", "middle", "mixed", "top"):
                if layout == "mixed" and n and n_layers % n:
                    with pytest.raises(ConfigError, match="divide"):
                        layout_sparse_indices(n_layers, n, layout)
                    continue
                ref = tuple(i for i in range(n_layers) if _flaxformer_is_sparse(i, n_layers, n, layout))
                assert layout_sparse_indices(n_layers, n, layout) == ref, (n_layers, n, layout)
    # hand-checked cases
    assert layout_sparse_indices(12, 4, "middle") == (4, 5, 6, 7)
    assert layout_sparse_indices(7, 2, "middle") == (3, 4)
    assert layout_sparse_indices(12, 3, "top") == (9, 10, 11)
    assert layout_sparse_indices(12, 6, "mixed") == (1, 3, 5, 7, 9, 11)


def test_layout_config_fields_defaults_and_errors() -> None:
    base = SwitchConfig.preset("switch-base-8")
    assert base.encoder_sparse_layout == base.decoder_sparse_layout == "mixed"
    assert base.sparse_layers("encoder") == (1, 3, 5, 7, 9, 11)  # today's rule, unchanged
    # mixed given a count = the step rule with step N // n; other layouts per stack
    assert base.replace(num_sparse_encoder_layers=3).sparse_layers("encoder") == (3, 7, 11)
    c = base.replace(encoder_sparse_layout="top", num_sparse_encoder_layers=2, decoder_sparse_layout="bottom",
                     num_sparse_decoder_layers=3)
    assert c.sparse_layers("encoder") == (10, 11) and c.sparse_layers("decoder") == (0, 1, 2)
    with pytest.raises(ConfigError, match="num_sparse_encoder_layers"):
        base.replace(encoder_sparse_layout="bottom")
    with pytest.raises(ConfigError, match="divisor"):
        base.replace(num_sparse_decoder_layers=5)
    with pytest.raises(ConfigError, match=r"\[0, 12\]"):
        base.replace(encoder_sparse_layout="top", num_sparse_encoder_layers=13)
    with pytest.raises(ConfigError, match="sparse_layout must be one of"):
        base.replace(decoder_sparse_layout="interleaved")
    # HF import keeps today's layouts; HF export writes what HF can express and rejects the rest
    hf = {"num_layers": 12, "num_decoder_layers": 12, "num_sparse_encoder_layers": 6,
          "num_sparse_decoder_layers": 3}
    got = SwitchConfig.from_hf(hf)
    assert got.sparse_layers("encoder") == (1, 3, 5, 7, 9, 11) and got.sparse_layers("decoder") == (3, 7, 11)
    assert got.num_sparse_encoder_layers is None and got.encoder_sparse_layout == "mixed"
    tiny_top = _cfg(encoder_sparse_layout="top", num_sparse_encoder_layers=1)  # 2 layers: top-1 = layer 1
    assert SwitchConfig.from_hf(tiny_top.to_hf()).sparse_layers("encoder") == tiny_top.sparse_layers("encoder")
    with pytest.raises(ConfigError, match="every-k-th-layer"):
        c.to_hf()
    # the model builds the layout's layers: experts only where the layout says
    shapes = param_shapes(_cfg(encoder_sparse_layout="bottom", num_sparse_encoder_layers=1,
                               decoder_sparse_layout="top", num_sparse_decoder_layers=2))
    experts = sorted({k.split("/mlp/")[0] for k in shapes if "/expert/" in k})
    assert experts == ["decoder/layers_0", "decoder/layers_1", "encoder/layers_0"]


# ---- dropout masks of each kind vs a reference of their positions ----------------------------------------
class _Probe(nn.Module):
    cfg: SwitchConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return dropout(self, x, 0.3, False)


def test_dropout_mask_is_broadcast_over_length_and_honours_rate(seed: int) -> None:
    x = jnp.ones((64, 5, 256), jnp.float32)
    y = np.asarray(_Probe(_cfg()).apply({}, x, rngs={"dropout": jax.random.PRNGKey(seed)}))
    assert set(np.unique(y)) <= {0.0, np.float32(1.0) / np.float32(0.7)}
    assert (y == y[:, :1, :]).all()  # one mask per (batch row, feature), shared by every position
    _zero_fraction_ok(y[:, 0, :] == 0, 0.3)


def test_attention_weight_dropout_positions(seed: int) -> None:
    """With q/k kernels 0 (uniform weights 1/K) and v/out identities on one-hot keys, the output IS the attention
    weights: Flaxformer drops whole keys per (batch, head), the same for every query, and rescales by 1/keep."""
    k = 8
    cfg = _cfg(d_model=k, num_heads=1, d_kv=k, dropout_rate=0.25)
    eye = jnp.eye(k, dtype=jnp.float32)
    params = {"query": {"kernel": jnp.zeros((k, k))}, "key": {"kernel": jnp.zeros((k, k))},
              "value": {"kernel": eye}, "out": {"kernel": eye}}
    b, q = 512, 3
    xq = jnp.ones((b, q, k), jnp.float32)
    xkv = jnp.broadcast_to(eye, (b, k, k))
    bias = jnp.zeros((1, 1, q, k), jnp.float32)
    att = MultiHeadAttention(cfg)
    out, _ = att.apply({"params": params}, xq, xkv, bias, deterministic=False,
                       rngs={"dropout": jax.random.PRNGKey(seed)})
    o = np.asarray(out)
    np.testing.assert_allclose(np.asarray(att.apply({"params": params}, xq, xkv, bias)[0]), 1.0 / k, rtol=1e-6)
    assert (o == o[:, :1, :]).all()  # broadcast over queries
    kept = o[:, 0, :] != 0
    np.testing.assert_allclose(o[:, 0, :][kept], 1.0 / k / 0.75, rtol=1e-6)
    _zero_fraction_ok(~kept, 0.25)


def test_mlp_and_expert_hidden_dropout_positions(seed: int) -> None:
    """Identity wi/wo on positive inputs make the MLP output its hidden layer: the dense MLP drops hidden units per
    (batch row) for all positions; an expert drops its own hidden units for every token routed to it."""
    f = 32
    cfg = _cfg(d_model=f, d_ff=f, num_experts=4, dropout_rate=0.2, expert_dropout_rate=0.5)
    assert cfg.expert_dropout == 0.5 and cfg.replace(expert_dropout_rate=None).expert_dropout == 0.2
    eye = jnp.eye(f, dtype=jnp.float32)
    key = jax.random.PRNGKey(seed)
    x = jnp.ones((128, 4, f), jnp.float32)
    y, _ = MlpBlock(cfg).apply({"params": {"wi": {"kernel": eye}, "wo": {"kernel": eye}}}, x, True,
                               rngs={"dropout": key})
    y = np.asarray(y)
    assert (y == y[:, :1, :]).all()
    _zero_fraction_ok(y[:, 0, :] == 0, 0.2)
    np.testing.assert_allclose(y[y != 0], 1.0 / 0.8, rtol=1e-6)
    # experts: capacity layout [E, N, D] and the sorted (ragged) layout give each expert one mask [F]
    e = 4
    ep = {"wi": {"kernel": jnp.broadcast_to(eye, (e, f, f))}, "wo": {"kernel": jnp.broadcast_to(eye, (e, f, f))}}
    xe = jnp.ones((e, 6, f), jnp.float32)
    ye = np.asarray(Experts(cfg).apply({"params": ep}, xe, True, rngs={"dropout": key}))
    assert (ye == ye[:, :1, :]).all()
    assert set(np.unique(ye)) <= {0.0, 2.0}
    np.testing.assert_array_equal(np.asarray(Experts(cfg).apply({"params": ep}, xe)), 1.0)  # eval: no dropout
    sizes = jnp.asarray([3, 0, 2, 1], jnp.int32)
    yr = np.asarray(Experts(cfg).apply({"params": ep}, jnp.ones((7, f)), sizes, True, method=Experts.ragged,
                                       rngs={"dropout": key}))
    assert (yr[0] == yr[1]).all() and (yr[0] == yr[2]).all() and (yr[3] == yr[4]).all()
    masks = []
    for s in range(8):  # rate over many draws: 8 keys × 4 experts × 32 units
        masks.append(np.asarray(Experts(cfg).apply({"params": ep}, xe, True,
                                                   rngs={"dropout": jax.random.fold_in(key, s)}))[:, 0, :] == 0)
    _zero_fraction_ok(np.stack(masks), 0.5)


# ---- the whole model ------------------------------------------------------------------------------------------
def _mini(**kw) -> SwitchConfig:
    """1 encoder + 1 decoder layer, both sparse (small programs to compile)."""
    return _cfg(**{"num_layers": 1, "num_decoder_layers": 1, "encoder_sparse_step": 1, "decoder_sparse_step": 1, **kw})


@functools.partial(jax.jit, static_argnums=(0, 4))
def _fwd(cfg: SwitchConfig, params: dict, ids: jax.Array, dec: jax.Array, train: bool, rngs: dict | None) -> jax.Array:
    return SwitchTransformer(cfg).apply({"params": params}, ids, dec, train=train, rngs=rngs)[0]


@pytest.fixture(scope="module")
def params() -> dict:
    return _init(_mini(), 3)


@pytest.mark.parametrize("mode", ["t5x", "dropless"])
def test_dropout_off_at_eval_deterministic_in_training(params: dict, seed: int, mode: str) -> None:
    ids, dec = _ids(seed)
    base = _mini(routing_mode=mode)
    drop = base.replace(dropout_rate=0.1, expert_dropout_rate=0.4)
    key = jax.random.PRNGKey(seed)
    ref = _fwd(base, params, ids, dec, False, None)
    got = _fwd(drop, params, ids, dec, False, train_rngs(key))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))  # eval: bit-identical to no dropout
    a = _fwd(drop, params, ids, dec, True, train_rngs(key))
    b = _fwd(drop, params, ids, dec, True, train_rngs(key))
    c = _fwd(drop, params, ids, dec, True, train_rngs(jax.random.fold_in(key, 1)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # deterministic given the key
    assert not np.array_equal(np.asarray(a), np.asarray(c))  # another key, other masks
    if mode == "t5x":
        ref_t = _fwd(base, params, ids, dec, True, None)
        got_t = _fwd(base, params, ids, dec, True, train_rngs(key))
        np.testing.assert_array_equal(np.asarray(got_t), np.asarray(ref_t))  # rate 0: rng unused, today's result
        assert not np.array_equal(np.asarray(a), np.asarray(ref_t))
        # expert dropout alone changes the output of a model with experts, and nothing in one without
        e_only = _fwd(base.replace(expert_dropout_rate=0.5), params, ids, dec, True, train_rngs(key))
        assert not np.array_equal(np.asarray(e_only), np.asarray(ref_t))
        m = Model(drop, params)
        with pytest.raises(ConfigError, match="'dropout' rng"):
            m.apply(ids, dec, train=True)


def test_expert_dropout_only_inside_experts(seed: int) -> None:
    ids, dec = _ids(seed)
    dense = _mini(encoder_sparse_step=0, decoder_sparse_step=0)
    dp = _init(dense, 1)
    ref = _fwd(dense, dp, ids, dec, True, None)
    got = _fwd(dense.replace(expert_dropout_rate=0.5), dp, ids, dec, True, train_rngs(jax.random.PRNGKey(seed)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))  # no experts: nothing dropped


def test_dropout_rate_validation() -> None:
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ConfigError, match="dropout_rate"):
            _cfg(dropout_rate=bad)
    with pytest.raises(ConfigError, match="expert_dropout_rate"):
        _cfg(expert_dropout_rate=1.5)
    assert _cfg(dropout_rate=0.1).to_hf()["dropout_rate"] == 0.1


# ---- training: per-step dropout key, reproducible, resumes exactly, QAT ------------------------------------------
def _tc(**kw) -> TrainConfig:
    base = dict(steps=3, batch_size=8, log_every=1000, eval_every=0, save_every=0, learning_rate=0.01,
                warmup_steps=10, async_save=False, optimizer="adamw")
    base.update(kw)
    return TrainConfig(**base)


def _flat(p) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(p)[0]}


def test_train_with_dropout_reproducible_resumes_and_qat(tmp_path) -> None:
    cfg = _mini(dropout_rate=0.1, expert_dropout_rate=0.3)
    init = jax.tree.map(np.asarray, _init(cfg, 0))
    data = SyntheticData(cfg.vocab_size, 8, 16, seed=1)
    a = train(cfg, _tc(), data, init_params=init)
    b = train(cfg, _tc(), data, init_params=init)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    other = train(cfg, _tc(seed=7), data, init_params=init)  # same weights and batches, other dropout keys
    assert all(x["loss"] != y["loss"] for x, y in zip(other.history, a.history, strict=True))
    # killed after step 2, resumed: the same keys are drawn -> the same params
    part = train(cfg, _tc(save_every=2), data, out_dir=tmp_path / "run", init_params=init, stop_after=2)
    assert part.step == 2
    res = train(cfg, _tc(save_every=2), data, out_dir=tmp_path / "run", init_params=init)
    assert [h["loss"] for h in res.history] == [h["loss"] for h in a.history[2:]]
    fa, fr = _flat(a.params), _flat(res.params)
    for k in fa:
        np.testing.assert_array_equal(fr[k], fa[k], err_msg=k)
    # QAT (STE fake-quant of the experts) with dropout: runs, finite, reproducible
    q1 = train(cfg, _tc(steps=2, qat_bits=2), data, init_params=init)
    q2 = train(cfg, _tc(steps=2, qat_bits=2), data, init_params=init)
    assert all(np.isfinite(h["loss"]) for h in q1.history)
    assert [h["loss"] for h in q1.history] == [h["loss"] for h in q2.history]


# ---- num_expert_replicas > 1 vs a NumPy reference of Flaxformer's MoeLayer -------------------------------------
def _np_moe_replicas(x, wr, wi, wo, e, r, cf, min_cap, mgs):
    """Flaxformer MoeLayer, f64, top-1 in token order: ``_maybe_pad`` to a multiple of E·R tokens, the smallest
    group count >= max(T // max_group_size, E·R) dividing T and divisible by E·R, capacity round(cf·S/E)."""
    b, l, d = x.shape
    n = e * r
    pb = ps = 0
    if (b * l) % n:
        pb = next(p for p in range(1, n + 1) if ((b + p) * l) % n == 0)
        ps = next(p for p in range(1, n + 1) if (b * (l + p)) % n == 0)
        pb, ps = (pb, 0) if ps * b > pb * l else (0, ps)
    xp = np.zeros((b + pb, l + ps, d))
    xp[:b, :l] = x
    t = xp.shape[0] * xp.shape[1]
    g = next(g for g in range(max(t // mgs, n), t + 1) if t % g == 0 and g % n == 0)
    s = t // g
    cap = max(int(round(cf * s / e)), min_cap)
    flat = xp.reshape(t, d)
    out, _ = np_top1_dispatch(flat, wr, g, s, cap, lambda k, tok: np.maximum(tok @ wi[k], 0) @ wo[k])
    return out.reshape(xp.shape)[:b, :l], (g, s, cap)


def test_num_expert_replicas_vs_numpy(seed: int) -> None:
    e, d, f = 2, 8, 12
    rs = np.random.default_rng(seed)
    x = rs.standard_normal((3, 5, d))
    wr = rs.standard_normal((d, e))
    wi = rs.standard_normal((e, d, f)) / np.sqrt(d)
    wo = rs.standard_normal((e, f, d)) / np.sqrt(f)
    p = {"router": {"router_weights": {"w": {"kernel": wr}}}, "expert": {"wi": {"kernel": wi}, "wo": {"kernel": wo}}}
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    layouts = set()
    for r in (1, 2, 3):
        cfg = _cfg(d_model=d, d_ff=f, num_experts=e, num_expert_replicas=r, max_group_size=8,
                   eval_capacity_factor=1.0, min_expert_capacity=1)
        out, _ = jax.jit(lambda p, x, cfg=cfg: MoeLayer(cfg).apply({"params": p}, x))(p, jnp.asarray(x, jnp.float32))
        ref, lay = _np_moe_replicas(x, wr, wi, wo, e, r, 1.0, 1, 8)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5, err_msg=f"replicas={r}")
        layouts.add(lay)
    assert len(layouts) == 3  # the replica count changes padding / groups / capacity


# ---- expert dropout with the experts split over an `expert` mesh axis (2 forced CPU devices) ----------------------
_EP_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from moqe_jax import sharding as shd
from moqe_jax.config import SwitchConfig
from moqe_jax.model.layers import MoeLayer
f, e = 32, 4
eye = jnp.eye(f, dtype=jnp.float32)
wr = np.zeros((f, e), np.float32)
wr[np.arange(f), np.arange(f) % e] = 10.0  # token with feature j hot -> expert j % e
p = {"router": {"router_weights": {"w": {"kernel": jnp.asarray(wr)}}},
     "expert": {"wi": {"kernel": jnp.broadcast_to(eye, (e, f, f))}, "wo": {"kernel": jnp.broadcast_to(eye, (e, f, f))}}}
x = np.full((16, f), 0.01, np.float32)
x[np.arange(16), np.arange(16) % e] = 1.0  # token t -> expert t % e
mesh = shd.make_mesh(shd.parse_mesh({"data": 1, "expert": 2, "model": 1}))
res = {}
for mode in ("dropless", "t5x"):
    cfg = SwitchConfig.preset("tiny", dtype="float32", d_model=f, d_ff=f, num_experts=e, routing_mode=mode,
                              expert_dropout_rate=0.5, train_capacity_factor=4.0)
    def run(key, cfg=cfg):
        with shd.activation_mesh(mesh):
            return MoeLayer(cfg).apply({"params": p}, jnp.asarray(x).reshape(2, 8, f), True, rngs={"dropout": key})[0]
    res[mode] = (np.asarray(jax.jit(run)(jax.random.PRNGKey({seed}))).reshape(16, f) != 0).tolist()
print("RESULT" + json.dumps(res))
"""


def test_expert_dropout_masks_per_expert_on_an_expert_mesh(seed: int) -> None:
    """Experts on different shards of the `expert` axis draw different masks; one expert's tokens share one."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MOQE_NO_PROGRESS="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    p = subprocess.run([sys.executable, "-c", _EP_SCRIPT.replace("{seed}", str(seed % 2 ** 31))], env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    for mode, keep in json.loads(p.stdout.split("RESULT", 1)[1]).items():
        keep = np.asarray(keep)  # [16 tokens, F]; token t went to expert t % 4 (experts 0,1 | 2,3 per shard)
        masks = [keep[t] for t in range(4)]
        for t in range(16):
            np.testing.assert_array_equal(keep[t], masks[t % 4], err_msg=f"{mode} token {t}")
        assert not (masks[0] == masks[2]).all() and not (masks[1] == masks[3]).all(), mode  # shards differ
        _zero_fraction_ok(~np.stack(masks), 0.5)
