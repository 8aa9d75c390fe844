"""Whole-model check (t5x mode, f32) against an independent float64 NumPy implementation of the
Flaxformer Switch forward pass (docs/T5X_SWITCH.md §4.2–§4.10): masks on queries and keys, the
encoder/decoder logit masks, shared relative-position biases, RMSNorm, dense and MoE layers with
grouping / capacity / dropping, tied or separate output logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import np_top1_dispatch

from moqe_jax.api import Model
from moqe_jax.config import SwitchConfig


def _bucket(rp: int, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> int:
    n = -rp
    ret = 0
    nb = num_buckets
    if bidirectional:
        nb //= 2
        if n < 0:
            ret += nb
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = nb // 2
    if n < max_exact:
        return ret + n
    v = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (nb - max_exact))
    return ret + min(v, nb - 1)


def _relpos(table, q, k, bidirectional):
    b = np.array([[_bucket(j - i, bidirectional) for j in range(k)] for i in range(q)])
    return table[:, b]  # [H, q, k]


def _norm(x, s, eps=1e-6):
    return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps) * s


def _attn(p, xq, xkv, mask, bias, h):
    b, tq, _ = xq.shape
    tk = xkv.shape[1]
    q = (xq @ p["query"]["kernel"]).reshape(b, tq, h, -1)
    k = (xkv @ p["key"]["kernel"]).reshape(b, tk, h, -1)
    v = (xkv @ p["value"]["kernel"]).reshape(b, tk, h, -1)
    lg = np.einsum("bqhd,bkhd->bhqk", q, k)
    if bias is not None:
        lg = lg + bias[None]
    # −1e10 swamps qk and the relpos bias in f32/bf16 (ulp 1024), so a fully masked query row is uniform
    lg = np.where(mask[:, None], lg, -1e10)
    w = np.exp(lg - lg.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, tq, -1) @ p["out"]["kernel"]


def _act(cfg, x, p):
    if cfg.gated:
        u = x @ p["wi_0"]
        g = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        return (g * (x @ p["wi_1"])) @ p["wo"]
    return np.maximum(x @ p["wi"], 0) @ p["wo"]


def _dense(cfg, p, x):
    return _act(cfg, x, {k: v["kernel"] for k, v in p.items()})


def _moe(cfg, p, x):
    b, l, d = x.shape
    e = cfg.num_experts
    t = b * l
    pb = ps = 0
    if t % e:
        pb = next(i for i in range(1, 10 ** 5) if (t + i * l) % e == 0)
        ps = next(i for i in range(1, 10 ** 5) if (t + i * b) % e == 0)
        pb, ps = (pb, 0) if ps * b > pb * l else (0, ps)
    xp = np.zeros((b + pb, l + ps, d))
    xp[:b, :l] = x
    t = xp.shape[0] * xp.shape[1]
    g = max(t // cfg.max_group_size, e)
    while g < t and not (t % g == 0 and g % e == 0):
        g += 1
    s = t // g
    cap = max(int(round(cfg.eval_capacity_factor * s / e)), cfg.min_expert_capacity)
    flat = xp.reshape(t, d)
    wr = p["router"]["router_weights"]["w"]["kernel"]
    ex = {k: v["kernel"] for k, v in p["expert"].items()}
    out, ndrop = np_top1_dispatch(flat, wr, g, s, cap,
                                  lambda k, tok: _act(cfg, tok[None], {n: w[k] for n, w in ex.items()})[0])
    return out.reshape(xp.shape)[:b, :l], ndrop


def _ffn(cfg: SwitchConfig, p: dict, y: np.ndarray, sparse: bool):
    """The MLP sublayer: MoE (output, dropped tokens) on sparse layers, dense (output, 0) elsewhere."""
    return _moe(cfg, p, y) if sparse else (_dense(cfg, p, y), 0)


def np_switch(cfg: SwitchConfig, p: dict, ids: np.ndarray, dec: np.ndarray):
    h = cfg.num_heads
    emb = p["token_embedder"]["embedding"]
    drops = 0
    # encoder
    valid = ids > 0
    lm = valid[..., None].astype(float)
    mask = valid[:, :, None] & valid[:, None, :]
    bias = _relpos(p["encoder"]["relpos_bias"]["rel_embedding"], ids.shape[1], ids.shape[1], True)
    x = emb[ids]
    for i in range(cfg.num_layers):
        lp = p["encoder"][f"layers_{i}"]
        y = _norm(x, lp["pre_attention_layer_norm"]["scale"]) * lm
        x = x + _attn(lp["attention"], y, y, mask, bias, h)
        y = _norm(x, lp["pre_mlp_layer_norm"]["scale"]) * lm
        o, nd = _ffn(cfg, lp["mlp"], y, i in cfg.sparse_layers("encoder"))
        x, drops = x + o, drops + nd
    enc = _norm(x, p["encoder"]["encoder_norm"]["scale"]) * lm
    # decoder
    t = dec.shape[1]
    nxt = np.concatenate([dec[:, 1:], np.zeros((dec.shape[0], 1), int)], 1)
    dvalid = (dec > 0) | (nxt > 0) | (np.arange(t)[None] == 0)  # get_decoder_logit_mask
    dlm = dvalid[..., None].astype(float)
    # T5X attention masks come from decoder_target_tokens > 0; targets = inputs shifted left, the last one
    # being EOS/next token (> 0) unless the last input is padding or EOS
    targets = np.concatenate([dec[:, 1:], np.where((dec[:, -1:] > 0) & (dec[:, -1:] != 1), 5, 0)], 1)
    tvalid = targets > 0
    causal = np.tril(np.ones((t, t), bool))[None]
    smask = causal & tvalid[:, :, None] & tvalid[:, None, :]
    cmask = tvalid[:, :, None] & valid[:, None, :]
    sbias = _relpos(p["decoder"]["relpos_bias"]["rel_embedding"], t, t, False)
    x = emb[dec]
    for i in range(cfg.num_decoder_layers):
        lp = p["decoder"][f"layers_{i}"]
        y = _norm(x, lp["pre_self_attention_layer_norm"]["scale"]) * dlm
        x = x + _attn(lp["self_attention"], y, y, smask, sbias, h)
        y = _norm(x, lp["pre_cross_attention_layer_norm"]["scale"]) * dlm
        x = x + _attn(lp["encoder_decoder_attention"], y, enc, cmask, None, h)
        y = _norm(x, lp["pre_mlp_layer_norm"]["scale"]) * dlm
        o, nd = _ffn(cfg, lp["mlp"], y, i in cfg.sparse_layers("decoder"))
        x, drops = x + o, drops + nd
    y = _norm(x, p["decoder"]["decoder_norm"]["scale"]) * dlm
    if cfg.tie_word_embeddings:
        logits = y @ emb.T / np.sqrt(cfg.d_model)
    else:
        logits = y @ p["decoder"]["logits_dense"]["kernel"]
    return enc, logits, drops


@pytest.mark.parametrize("variant", ["tied-relu", "dense-logits-gated"])
def test_t5x_mode_model_vs_numpy_reference(variant):
    over = dict(dtype="float32", eval_capacity_factor=1.0, min_expert_capacity=1, max_group_size=8,
                num_layers=3, num_decoder_layers=3)
    if variant != "tied-relu":
        over.update(tie_word_embeddings=False, activation="gated-gelu", encoder_sparse_step=1)
    cfg = SwitchConfig.preset("tiny", **over)
    m = Model.init(cfg, seed=4)
    rs = np.random.RandomState(11)
    p64 = __import__("jax").tree_util.tree_map(lambda a: np.asarray(a, np.float64), m.params)
    # stronger routing and relpos signal so both matter
    for stack in ("encoder", "decoder"):
        p64[stack]["relpos_bias"]["rel_embedding"] *= 4.0
    m = Model(cfg, __import__("jax").tree_util.tree_map(lambda a: np.asarray(a, np.float32), p64))
    ids = rs.randint(2, cfg.vocab_size, (3, 9))
    ids[1, 6:] = 0
    ids[2, 8:] = 0
    dec = rs.randint(2, cfg.vocab_size, (3, 7))
    dec[:, 0] = 0
    dec[0, 5:] = 0
    dec[0, 4] = 1  # input EOS followed by padding: logit mask keeps it, the target mask does not
    logits, aux = m.apply(ids, dec)
    enc_ref, logits_ref, drops = np_switch(cfg, p64, ids, dec)
    assert drops > 0  # the capacity rule is exercised
    enc = np.asarray(aux["encoder_output"])
    np.testing.assert_allclose(enc, enc_ref, rtol=0, atol=2e-4 * np.abs(enc_ref).max())
    np.testing.assert_allclose(np.asarray(logits), logits_ref, rtol=0, atol=2e-4 * np.abs(logits_ref).max())
    assert np.all(enc[1, 6:] == 0) and np.all(np.asarray(logits)[0, 6:] == 0)  # logit masks
