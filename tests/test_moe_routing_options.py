"""Flaxformer router options (issue 17, docs/ROUTING.md): tokens-choose top-k with batch-prioritized routing and
capacity drops, experts-choose, padding tokens ignored, router bias, jitter; against an independent NumPy float64
transcription of Flaxformer's ``TokensChooseMaskedRouter`` / ``ExpertsChooseMaskedRouter`` / ``MoeLayer`` rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moqe_jax.config import SwitchConfig
from moqe_jax.errors import ConfigError
from moqe_jax.model.layers import MoeLayer

E, D, F = 4, 16, 24


# ---- the NumPy float64 reference (written from Flaxformer's routing.py / moe_layers.py) -------------------------
def _groups(t: int, e: int, max_group_size: int) -> int:
    g = max(t // max_group_size, e)
    while g < t and not (t % g == 0 and g % e == 0):
        g += 1
    return g


def _np_moe(x, p, *, k=1, cf=1.0, min_cap=1, mgs=64, bpr=False, router="tokens_choose", ignore_padding=False):
    """Returns ``(out [B, L, D], metrics)``. No ``_maybe_pad``: tests use ``B·L`` divisible by ``E``."""
    x = np.asarray(x, np.float64)
    b, l, d = x.shape
    w = p["router"]["router_weights"]["w"]
    wr = np.asarray(w["kernel"], np.float64)
    wi = np.asarray(p["expert"]["wi"]["kernel"], np.float64)
    wo = np.asarray(p["expert"]["wo"]["kernel"], np.float64)
    e = wr.shape[1]
    t = b * l
    g = _groups(t, e, mgs)
    s = t // g
    cap = max(int(round(cf * s / e)), min_cap)
    xg = x.reshape(g, s, d)
    logits = xg @ wr + (np.asarray(w["bias"], np.float64) if "bias" in w else 0.0)
    valid = np.abs(xg).sum(-1) > 0 if ignore_padding else np.ones((g, s), bool)
    pr = np.exp(logits - logits.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)

    def expert_fn(j, v):
        return np.maximum(v @ wi[j], 0) @ wo[j]

    out = np.zeros_like(xg)
    n_disp = n_somewhere = conf = 0.0
    aux = 0.0
    for gi in range(g):
        if router == "experts_choose":
            prm = pr[gi] * valid[gi][:, None]
            taken = np.zeros(s, bool)
            for j in range(e):
                for tok in np.argsort(-prm[:, j], kind="stable")[:cap]:  # top-C tokens, ties: lower index
                    out[gi, tok] += prm[tok, j] * expert_fn(j, xg[gi, tok])
                    n_disp += 1
                    conf += prm[tok, j]
                    taken[tok] = True
            n_somewhere += taken.sum()
            continue
        choice = np.argsort(-pr[gi], axis=-1, kind="stable")[:, :k]  # [S, k] best first, ties: lower index
        gate1 = np.where(valid[gi], pr[gi, np.arange(s), choice[:, 0]], 0.0)
        order = np.argsort(-gate1, kind="stable") if bpr else np.arange(s)
        count = np.zeros(e, int)
        kept = np.zeros((s, k), bool)
        for j in range(k):  # all 1st choices claim capacity before any 2nd choice
            for tok in order:
                if not valid[gi, tok]:
                    continue
                ex = choice[tok, j]
                kept[tok, j] = count[ex] < cap
                count[ex] += 1
        for tok in range(s):
            for j in range(k):
                if kept[tok, j]:
                    gj = pr[gi, tok, choice[tok, j]]
                    out[gi, tok] += gj * expert_fn(choice[tok, j], xg[gi, tok])
                    conf += gj
        n_disp += kept.sum()
        n_somewhere += kept.any(-1).sum()
        mask = np.zeros((s, e))
        for tok in range(s):
            if valid[gi, tok]:
                mask[tok, choice[tok]] = 1.0
        aux += np.mean(mask.mean(0) * (pr[gi] * valid[gi][:, None]).mean(0)) * e * e / g
    n_tok = valid.sum()
    metrics = {"fraction_tokens_left_behind": 1.0 - n_somewhere / n_tok, "router_confidence": conf / n_disp,
               "expert_usage": 1.0 if router == "experts_choose" else n_disp / (e * cap * g),
               "aux_loss": 0.0 if router == "experts_choose" else aux, "capacity": cap}
    return out.reshape(b, l, d), metrics


# ---- helpers ------------------------------------------------------------------------------------------------------
def _params(rng, bias: bool = False):
    w = {"kernel": jnp.asarray(rng.standard_normal((D, E)), jnp.float32)}
    if bias:
        w["bias"] = jnp.asarray(rng.standard_normal(E), jnp.float32)
    return {"router": {"router_weights": {"w": w}},
            "expert": {"wi": {"kernel": jnp.asarray(rng.standard_normal((E, D, F)) / np.sqrt(D), jnp.float32)},
                       "wo": {"kernel": jnp.asarray(rng.standard_normal((E, F, D)) / np.sqrt(F), jnp.float32)}}}


def _cfg(**kw) -> SwitchConfig:
    base = dict(d_model=D, d_ff=F, num_experts=E, dtype="float32", max_group_size=64, eval_capacity_factor=1.0,
                min_expert_capacity=1)
    return SwitchConfig.preset("tiny", **{**base, **kw})


def _run(layer, p, x, train=False, rngs=None):
    """``layer.apply`` under ``jax.jit`` (one compile instead of many eager ops)."""
    return jax.jit(lambda p, x, r: layer.apply({"params": p}, x, train, rngs=r))(p, jnp.asarray(x), rngs)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# ---- tokens choose ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bpr", [False, True])
def test_top2_tokens_choose_matches_numpy_with_drops(seed, bpr):
    rng = np.random.default_rng(seed)
    p = _params(rng, bias=True)
    x = rng.standard_normal((2, 16, D)).astype(np.float32)  # 32 tokens -> 4 groups of 8, capacity 2
    x[1, 12:] = 0.0  # padding rows (ignored)
    cfg = _cfg(num_selected_experts=2, batch_prioritized_routing=bpr, router_bias=True,
               router_ignore_padding_tokens=True)
    out, info = _run(MoeLayer(cfg), p, jnp.asarray(x))
    ref, m = _np_moe(x, p, k=2, bpr=bpr, ignore_padding=True)
    assert m["capacity"] == 2 and m["fraction_tokens_left_behind"] < 0.5
    kept2 = np.asarray(info["dispatch"]).sum(-1)
    assert (kept2[:, :12] < 2).any() and (kept2[0] == 2).any()  # some choices dropped, some tokens keep both
    assert not np.asarray(info["dispatch"])[1, 12:].any()  # padding goes nowhere
    assert out.dtype == jnp.float32 and _rel(out, ref) <= 1e-5
    for name in ("fraction_tokens_left_behind", "router_confidence", "expert_usage", "aux_loss"):
        assert abs(float(info[name]) - m[name]) <= 1e-5 * max(1.0, abs(m[name])), name


def test_bpr_changes_which_tokens_drop(seed):
    """The same inputs under BPR and token order: both equal their reference, and the kept sets differ."""
    rng = np.random.default_rng(seed)
    p = _params(rng)
    x = rng.standard_normal((1, 32, D)).astype(np.float32)
    outs = {}
    for bpr in (False, True):
        cfg = _cfg(num_selected_experts=2, batch_prioritized_routing=bpr, max_group_size=32, eval_capacity_factor=0.5)
        out, info = _run(MoeLayer(cfg), p, jnp.asarray(x))
        assert _rel(out, _np_moe(x, p, k=2, bpr=bpr, cf=0.5, mgs=32)[0]) <= 1e-5
        outs[bpr] = np.asarray(info["dispatch"])
        # decoder layers never use BPR: equal to the token-order result
        dec, _ = _run(MoeLayer(cfg, decoder=True), p, jnp.asarray(x))
        assert _rel(dec, _np_moe(x, p, k=2, cf=0.5, mgs=32)[0]) <= 1e-5
    assert (outs[False] != outs[True]).any()


def test_top1_default_unchanged_and_k1_options(seed):
    """num_selected_experts=1 without options is the Switch router (same as the explicit k=1 field); BPR top-1
    matches the reference."""
    rng = np.random.default_rng(seed)
    p = _params(rng)
    x = jnp.asarray(rng.standard_normal((2, 16, D)), jnp.float32)
    a, ia = _run(MoeLayer(_cfg()), p, x)
    b, ib = _run(MoeLayer(_cfg(), num_selected=1), p, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _rel(a, _np_moe(x, p)[0]) <= 1e-5
    c, _ = _run(MoeLayer(_cfg(batch_prioritized_routing=True)), p, x)
    assert _rel(c, _np_moe(x, p, bpr=True)[0]) <= 1e-5


# ---- experts choose -----------------------------------------------------------------------------------------------
def test_experts_choose_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    p = _params(rng)
    x = rng.standard_normal((2, 16, D)).astype(np.float32)
    x[0, 14:] = 0.0
    cfg = _cfg(router_type="experts_choose", router_ignore_padding_tokens=True, eval_capacity_factor=1.5)
    out, info = _run(MoeLayer(cfg), p, jnp.asarray(x))
    ref, m = _np_moe(x, p, cf=1.5, router="experts_choose", ignore_padding=True)
    assert m["capacity"] == 3 and _rel(out, ref) <= 1e-5
    assert float(info["expert_usage"]) == 1.0 and float(info["aux_loss"]) == 0.0
    for name in ("fraction_tokens_left_behind", "router_confidence"):
        assert abs(float(info[name]) - m[name]) <= 1e-5, name
    assert np.asarray(info["dispatch"]).sum() == E * 3 * 4  # every expert fills its buffer in each group
    # the decoder stays tokens-choose (top-1 here)
    dec, _ = _run(MoeLayer(cfg, decoder=True), p, jnp.asarray(x))
    assert _rel(dec, _np_moe(x, p, cf=1.5, ignore_padding=True)[0]) <= 1e-5


def test_experts_choose_capacity_over_group_is_config_error():
    cfg = _cfg(router_type="experts_choose", eval_capacity_factor=8.0)
    p = _params(np.random.default_rng(0))
    with pytest.raises(ConfigError, match="exceeds the 8 tokens of a group"):
        _run(MoeLayer(cfg), p, jnp.ones((2, 16, D)))


# ---- jitter --------------------------------------------------------------------------------------------------------
def test_jitter_deterministic_train_only_and_router_only(seed):
    rng = np.random.default_rng(seed)
    p = _params(rng)
    x = jnp.asarray(rng.standard_normal((2, 16, D)), jnp.float32)
    cfg = _cfg(router_jitter_noise=0.3, train_capacity_factor=4.0)  # no drops in training
    layer = MoeLayer(cfg)
    k1, k2 = jax.random.PRNGKey(seed % 1000), jax.random.PRNGKey(seed % 1000 + 1)
    a, ia = _run(layer, p, x, True, rngs={"jitter": k1})
    b, _ = _run(layer, p, x, True, rngs={"jitter": k1})
    c, ic = _run(layer, p, x, True, rngs={"jitter": k2})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # eval: no noise, no rng needed; equal to the no-jitter config
    ev, _ = _run(layer, p, x, False)
    ev0, _ = _run(MoeLayer(cfg.replace(router_jitter_noise=0.0)), p, x, False)
    np.testing.assert_array_equal(np.asarray(ev), np.asarray(ev0))
    # training without noise (same capacity): the experts see the un-jittered inputs, so for tokens whose
    # expert is unchanged, out / gate is the same expert output
    tr0, i0 = _run(MoeLayer(cfg.replace(router_jitter_noise=0.0)), p, x, True)
    same = np.asarray(ia["expert"]) == np.asarray(i0["expert"])
    assert same.sum() > 16
    ya = np.asarray(a)[same] / np.asarray(ia["gate"])[same][:, None]
    y0 = np.asarray(tr0)[same] / np.asarray(i0["gate"])[same][:, None]
    assert _rel(ya, y0) <= 1e-5
    assert not np.allclose(np.asarray(ia["gate"]), np.asarray(i0["gate"]))
    with pytest.raises(ConfigError, match="needs a PRNG key"):
        _run(layer, p, x, True)


# ---- modes, config and formats --------------------------------------------------------------------------------------
def test_dropless_topk_options(seed):
    """Dropless: top-2 with bias and ignored padding equals the t5x reference at a capacity that drops nothing."""
    rng = np.random.default_rng(seed)
    p = _params(rng, bias=True)
    x = rng.standard_normal((2, 16, D)).astype(np.float32)
    x[0, :3] = 0.0
    cfg = _cfg(routing_mode="dropless", num_selected_experts=2, router_bias=True, router_ignore_padding_tokens=True,
               batch_prioritized_routing=True)
    out, info = _run(MoeLayer(cfg), p, jnp.asarray(x))
    ref, _ = _np_moe(x, p, k=2, cf=E, ignore_padding=True)  # capacity = S: nothing dropped
    assert _rel(out, ref) <= 1e-5 and not np.asarray(info["dispatch"])[0, :3].any()


def test_modes_reject_what_they_cannot_represent():
    with pytest.raises(ConfigError, match="routing_mode='hf'"):
        _cfg(routing_mode="hf", num_selected_experts=2)
    with pytest.raises(ConfigError, match="routing_mode='hf'"):
        _cfg(routing_mode="hf", batch_prioritized_routing=True)
    with pytest.raises(ConfigError, match="needs routing_mode='t5x'"):
        _cfg(routing_mode="dropless", router_type="experts_choose")
    for bad in ({"num_selected_experts": 0}, {"num_selected_experts": E + 1}, {"router_type": "scatter"},
                {"router_jitter_noise": 1.0}, {"router_jitter_noise": -0.1}, {"router_bias": 1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            _cfg(**bad)
    # hf mode keeps jitter and bias (transformers has both)
    cfg = _cfg(routing_mode="hf", router_jitter_noise=0.01, router_bias=True)
    assert cfg.router_bias and cfg.router_jitter_noise == 0.01


def test_hf_config_round_trip_and_rejections():
    cfg = _cfg(router_jitter_noise=0.01, router_bias=True, router_ignore_padding_tokens=True)
    hf = cfg.to_hf()
    assert (hf["router_jitter_noise"], hf["router_bias"], hf["router_ignore_padding_tokens"]) == (0.01, True, True)
    back = SwitchConfig.from_hf(hf)
    assert (back.router_jitter_noise, back.router_bias, back.router_ignore_padding_tokens) == (0.01, True, True)
    # legacy Hub keys no transformers code reads do not change the (top-1) HF model
    legacy = {**hf, "num_selected_experts": 2, "router_type": "tokens_masked"}
    assert SwitchConfig.from_hf(legacy).num_selected_experts == 1
    for bad in ({"num_selected_experts": 2}, {"batch_prioritized_routing": True}, {"router_type": "experts_choose"}):
        with pytest.raises(ConfigError, match="cannot be written to a Hugging Face config.json"):
            cfg.replace(**bad).to_hf()


# ---- packed experts ---------------------------------------------------------------------------------------------
def test_top2_packed_experts_match_dequantized(seed):
    """Top-2 with BPR and drops: QuantizedTensor (int4) and Sub1Tensor (ternary) experts through moqe_jax.ops equal
    the same layer on the float-dequantized weights."""
    from moqe_jax.packed import QuantSpec
    from moqe_jax.quant.rtn import quantize_tensor
    from moqe_jax.quant.sub1 import encode

    rng = np.random.default_rng(seed)
    p = _params(rng)
    x = jnp.asarray(rng.standard_normal((2, 16, D)), jnp.float32)
    cfg = _cfg(num_selected_experts=2, batch_prioritized_routing=True)
    for make in (lambda w: quantize_tensor(w, QuantSpec(bits=4)),
                 lambda w: encode(quantize_tensor(w, QuantSpec(bits="ternary")))):
        packed = {n: make(p["expert"][n]["kernel"]) for n in ("wi", "wo")}
        pq = {**p, "expert": {n: {"kernel": w} for n, w in packed.items()}}
        pf = {**p, "expert": {n: {"kernel": w.dequantize(jnp.float32)} for n, w in packed.items()}}
        yq, iq = _run(MoeLayer(cfg, "xla"), pq, x)
        yf, _ = _run(MoeLayer(cfg, "xla"), pf, x)
        assert float(iq["fraction_tokens_left_behind"]) >= 0.0
        assert _rel(yq, yf) <= 1e-5
        assert _rel(yf, _np_moe(x, pf, k=2, bpr=True)[0]) <= 1e-5


def test_model_qat_step_with_options():
    """A whole model: experts-choose encoder, top-2 tokens-choose decoder, BPR, router bias (initialised to 0), jitter:
    eval forward, and a QAT step (STE fake-quant of the experts, value_and_grad) deterministic given the key."""
    from moqe_jax.model.switch import SwitchTransformer, init_params
    from moqe_jax.training.config import TrainConfig
    from moqe_jax.training.loss import make_loss_fn

    cfg = SwitchConfig.preset("tiny", num_experts=4, num_selected_experts=2, router_type="experts_choose",
                              batch_prioritized_routing=True, router_bias=True, router_jitter_noise=0.1)
    params = jax.jit(lambda: init_params(cfg, 0))()  # compiled: much faster than Flax's eager init
    i = cfg.sparse_layers("encoder")[0]
    bias = params["encoder"][f"layers_{i}"]["mlp"]["router"]["router_weights"]["w"]["bias"]
    assert bias.shape == (4,) and not np.asarray(bias).any()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 8)), jnp.int32)
    logits, aux = jax.jit(lambda p, i: SwitchTransformer(cfg).apply({"params": p}, i, i))(params, ids)
    assert np.isfinite(np.asarray(logits)).all()
    enc = [v for n, v in aux["moe"].items() if n.startswith("encoder")]
    dec = [v for n, v in aux["moe"].items() if n.startswith("decoder")]
    assert enc and dec and all(float(v["expert_usage"]) == 1.0 for v in enc)
    assert all(int(np.asarray(v["dispatch"]).sum(-1).max()) == 2 for v in dec)
    batch = {"input_ids": ids, "decoder_input_ids": ids, "targets": ids, "weights": jnp.ones(ids.shape, jnp.float32)}
    step = jax.jit(jax.value_and_grad(make_loss_fn(cfg, TrainConfig(qat_bits=4)), has_aux=True))
    (l1, _), g1 = step(params, batch, jax.random.PRNGKey(1))
    (l2, _), _ = step(params, batch, jax.random.PRNGKey(1))
    (l3, _), _ = step(params, batch, jax.random.PRNGKey(2))
    assert np.isfinite(float(l1)) and float(l1) == float(l2) and float(l1) != float(l3)
    gw = g1["encoder"][f"layers_{i}"]["mlp"]["expert"]["wi"]["kernel"]
    assert np.isfinite(np.asarray(gw)).all() and np.asarray(gw).any()


def test_hf_and_t5x_carry_router_bias(tmp_path, seed):
    """router_bias: the bias travels as transformers' ``router.classifier.bias`` through HF export and import, and as
    ``router_weights/w/bias`` through T5X export and load."""
    from types import SimpleNamespace

    from safetensors.numpy import load_file

    from moqe_jax.checkpoint.hf import load_hf
    from moqe_jax.checkpoint.hf_export import export_hf
    from moqe_jax.model.switch import init_params
    from moqe_jax.tree import flatten_params, unflatten_params

    cfg = SwitchConfig.preset("tiny", router_bias=True, router_jitter_noise=0.01, encoder_sparse_step=2,
                              decoder_sparse_step=2)
    params = jax.tree.map(np.asarray, jax.jit(lambda: init_params(cfg, 0))())
    flat = flatten_params(params)
    rng = np.random.default_rng(seed)
    biases = [k for k in flat if k.endswith("router_weights/w/bias")]
    assert biases
    for k in biases:
        flat[k] = rng.standard_normal(flat[k].shape).astype(np.float32)
    d = export_hf(SimpleNamespace(config=cfg, params=unflatten_params(flat)), tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sum(n.endswith("mlp.router.classifier.bias") for n in tensors) == len(biases)
    cfg2, p2 = load_hf(d)
    assert cfg2.router_bias and cfg2.router_jitter_noise == 0.01
    f2 = flatten_params(p2)
    for k in biases:
        np.testing.assert_array_equal(np.asarray(f2[k]), flat[k])
    # T5X checkpoints carry no config: the bias is the param router_weights/w/bias; the loader names the field
    from moqe_jax.checkpoint.t5x import load_t5x
    from moqe_jax.checkpoint.t5x_writer import export_t5x
    from moqe_jax.errors import CheckpointError

    t5x_dir = export_t5x(unflatten_params(flat), str(tmp_path / "t5x"))
    _, p3 = load_t5x(t5x_dir, cfg, progress=False)
    for k in biases:
        np.testing.assert_array_equal(np.asarray(flatten_params(p3)[k]), flat[k])
    with pytest.raises(CheckpointError, match="a router bias: set router_bias=True"):
        load_t5x(t5x_dir, cfg.replace(router_bias=False), progress=False)
