"""One compiled decode loop (moqe_jax.model.decode.generate): equal to the previous per-call loop on a random
tiny model and the bundled model, EOS / min_new_tokens / buckets, packed weights kept packed inside the loop,
and one clear error per bad input (docs/ARCHITECTURE.md "Model", issue 13)."""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_tiny_model

import moqe_jax
from moqe_jax import Model, QuantSpec
from moqe_jax.errors import ConfigError
from moqe_jax.model import decode


# ---- the previous implementation (greedy/beam as before this change), the reference ------------------------
@functools.partial(jax.jit, static_argnums=(0, 3))
def _old_greedy(cfg, params, input_ids, max_new_tokens, attention_mask=None):
    b = input_ids.shape[0]
    _, enc_valid, cross = decode.encode_for_decoding(cfg, params, input_ids, attention_mask)
    cache = decode.init_cache(cfg, b, max_new_tokens)
    out = jnp.full((b, max_new_tokens), cfg.pad_token_id, jnp.int32)
    tok = jnp.full((b,), cfg.decoder_start_token_id, jnp.int32)

    def cond(s):
        return (s[0] < max_new_tokens) & ~jnp.all(s[4])

    def body(s):
        i, tok, cache, out, done = s
        logits, cache = decode.decode_step(cfg, params, tok, i, cache, cross, enc_valid)
        nxt = jnp.where(done, cfg.pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        return i + 1, nxt, cache, out.at[:, i].set(nxt), done | (nxt == cfg.eos_token_id)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), tok, cache, out, jnp.zeros((b,), bool)))[3]


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _old_beam(cfg, params, input_ids, max_new_tokens, k, length_penalty=0.6):
    b = input_ids.shape[0]
    _, enc_valid, cross = decode.encode_for_decoding(cfg, params, input_ids)
    enc_valid = jnp.repeat(enc_valid, k, axis=0)
    cross = jax.tree_util.tree_map(lambda a: jnp.repeat(a, k, axis=0), cross)
    cache = decode.init_cache(cfg, b * k, max_new_tokens)
    seqs = jnp.full((b, k, max_new_tokens), cfg.pad_token_id, jnp.int32)
    tok = jnp.full((b * k,), cfg.decoder_start_token_id, jnp.int32)
    scores = jnp.tile(jnp.array([0.0] + [-1e9] * (k - 1), jnp.float32)[None], (b, 1))
    neg = jnp.float32(-1e30)

    def body(s):
        i, tok, cache, seqs, scores, done, lengths = s
        logits, cache = decode.decode_step(cfg, params, tok, i, cache, cross, enc_valid)
        v = logits.shape[-1]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, v)
        lp = jnp.where(done[..., None], jnp.full((v,), neg).at[cfg.pad_token_id].set(0.0)[None, None], lp)
        top, idx = jax.lax.top_k((scores[..., None] + lp).reshape(b, k * v), k)
        beam, nxt = idx // v, (idx % v).astype(jnp.int32)
        prev_done = jnp.take_along_axis(done, beam, axis=1)
        seqs = jnp.take_along_axis(seqs, beam[..., None], axis=1).at[:, :, i].set(nxt)
        lengths = jnp.take_along_axis(lengths, beam, axis=1) + (~prev_done).astype(jnp.int32)
        flat = (beam + jnp.arange(b)[:, None] * k).reshape(-1)
        cache = jax.tree_util.tree_map(lambda a: a[flat], cache)
        return i + 1, nxt.reshape(-1), cache, seqs, top, prev_done | (nxt == cfg.eos_token_id), lengths

    init = (jnp.int32(0), tok, cache, seqs, scores, jnp.zeros((b, k), bool), jnp.zeros((b, k), jnp.int32))
    _, _, _, seqs, scores, _, lengths = jax.lax.while_loop(
        lambda s: (s[0] < max_new_tokens) & ~jnp.all(s[5]), body, init)
    norm = scores / (((5.0 + lengths.astype(jnp.float32)) / 6.0) ** length_penalty)
    return jnp.take_along_axis(seqs, jnp.argmax(norm, axis=1)[:, None, None], axis=1)[:, 0]


def _tiny(seed: int, **kw) -> Model:
    # capacity factor 64: the T5X path drops no token, so every routing mode computes the same function
    return random_tiny_model(seed, dtype="float32", eval_capacity_factor=64.0, **kw)


def _ids(seed: int, b: int, n: int, vocab: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (b, n))
    ids[-1, n - 2:] = 0  # one padded row
    return ids.astype(np.int32)


def test_greedy_and_beam_equal_previous_loop(seed: int) -> None:
    """Random tiny model, an EOS id that really occurs (early exit): the new loop (unbucketed t5x, bucketed,
    the default routing) equals the previous implementation token for token."""
    m = _tiny(seed)
    cfg = m.config
    ids = _ids(seed, 3, 7)
    first = np.asarray(_old_greedy(cfg, m.params, jnp.asarray(ids), 9))
    eos = int(first[0, 2])  # row 0 ends by step 3 under this EOS id
    j = int(np.flatnonzero(first[0] == eos)[0])
    ref_cfg = cfg.replace(eos_token_id=eos)
    ref = np.asarray(_old_greedy(ref_cfg, m.params, jnp.asarray(ids), 9))
    assert (ref[0, :j + 1] == first[0, :j + 1]).all() and (ref[0, j + 1:] == cfg.pad_token_id).all()
    np.testing.assert_array_equal(m.generate(ids, 9, eos_id=eos, routing_mode="t5x", bucket=False), ref)
    np.testing.assert_array_equal(m.generate(ids, 9, eos_id=eos, routing_mode="t5x", bucket=True), ref)
    np.testing.assert_array_equal(Model(ref_cfg, m.params).generate(ids, 9), ref)  # default routing + buckets
    ref_b = np.asarray(_old_beam(ref_cfg, m.params, jnp.asarray(ids), 9, 3))
    np.testing.assert_array_equal(m.generate(ids, 9, num_beams=3, eos_id=eos), ref_b)


def test_bundled_model_sentences_equal_previous_loop() -> None:
    """The bundled model on a few corpus sentences: routing t5x unbucketed == previous loop exactly; the default
    (dropless when available, buckets) == previous loop with capacity large enough to drop nothing."""
    from moqe_jax.data.locate import BUNDLED
    from moqe_jax.data.tokenizer import Tokenizer

    m = moqe_jax.load_model(BUNDLED / "moe")
    tok = Tokenizer(BUNDLED / "tokenizer" / "spm.model")
    rows = [json.loads(line) for line in (BUNDLED / "sample.jsonl").read_text().splitlines()[:5]]
    enc = tok.encode_batch([r["src"] for r in rows], add_eos=True)
    ids = np.zeros((len(enc), max(map(len, enc))), np.int32)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = e
    ref = np.asarray(_old_greedy(m.config, m.params, jnp.asarray(ids), 12))
    np.testing.assert_array_equal(m.generate(ids, 12, routing_mode="t5x", bucket=False), ref)
    wide = m.config.replace(eval_capacity_factor=64.0)
    ref_wide = np.asarray(_old_greedy(wide, m.params, jnp.asarray(ids), 12))
    np.testing.assert_array_equal(Model(wide, m.params).generate(ids, 12), ref_wide)
    assert any(t.strip() for t in tok.decode_batch(ref_wide))


def test_min_new_tokens_max_new_tokens_and_prefix(seed: int) -> None:
    m = _tiny(seed)
    ids = _ids(seed, 2, 6)
    full = m.generate(ids, 12)
    eos = int(full[0, 0])
    short = m.generate(ids, 5, eos_id=eos)
    assert short.shape == (2, 5) and short[0, 0] == eos and (short[0, 1:] == 0).all()
    held = m.generate(ids, 5, eos_id=eos, min_new_tokens=3)
    assert (held[:, :3] != eos).all()
    # without EOS hits, a shorter run (another cache bucket) is a prefix of a longer one
    np.testing.assert_array_equal(m.generate(ids, 5, eos_id=2 if eos != 2 else 3, min_new_tokens=5),
                                  m.generate(ids, 12, eos_id=2 if eos != 2 else 3, min_new_tokens=12)[:, :5])


def test_rows_independent_of_batch_and_buckets_compile_once(seed: int) -> None:
    """Each row generated alone equals it in a batch; shapes inside one bucket reuse one compiled program."""
    m = _tiny(seed)
    ids = _ids(seed, 3, 9)
    batch = m.generate(ids, 6)
    for r in range(3):
        n = int((ids[r] > 0).sum())
        np.testing.assert_array_equal(m.generate(ids[r:r + 1, :n], 6), batch[r:r + 1])
    before = decode.greedy_search._cache_size()
    m.generate(_ids(seed + 1, 4, 13), 7)  # batch 3 -> 4, length 9 -> 13, new 6 -> 7: same buckets (4, 16, 8)
    m.generate(_ids(seed + 2, 3, 10), 8)
    assert decode.greedy_search._cache_size() == before


def _while_operand_shapes(hlo: str) -> str:
    return "\n".join(line.split(" while(")[0] for line in hlo.splitlines() if " while(" in line)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec("ternary")], ids=["int4", "ternary"])
def test_packed_experts_stay_packed_inside_the_loop(seed: int, spec: QuantSpec) -> None:
    """No float [E, K, N] expert weight is an operand of the decode while loop (XLA would otherwise hoist
    the dequantization out of it and hold a float copy for the whole generation), and the packed model
    generates exactly what the same model with the dequantized float experts generates."""
    m = _tiny(seed)
    q = moqe_jax.quantize(m, spec)
    cfg = q.config
    ids = jnp.asarray(_ids(seed, 2, 8))
    mask = ids > 0
    args = (cfg, q.params, ids, 8, mask, jnp.ones((2,), bool), jnp.int32(8), jnp.int32(0), jnp.int32(1))
    hlo = decode.greedy_search.lower(*args, kernels="xla").compile().as_text()
    loop = _while_operand_shapes(hlo)
    assert loop, "no while loop in the compiled program"
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
    float_expert = re.compile(rf"(f32|bf16|f16)\[{e},({d},{f}|{f},{d})\]")
    assert not float_expert.search(loop), "a dequantized expert weight is carried through the decode loop"
    # the same check sees a float expert weight when the model is float (the test can fail)
    hlo_f = decode.greedy_search.lower(cfg, m.params, *args[2:], kernels="xla").compile().as_text()
    assert float_expert.search(_while_operand_shapes(hlo_f))
    deq = jax.tree_util.tree_map(lambda w: w.dequantize(jnp.float32) if moqe_jax.packed.is_packed(w) else w,
                                 q.params, is_leaf=moqe_jax.packed.is_packed)
    np.testing.assert_array_equal(q.with_kernels("xla").generate(ids, 8), Model(cfg, deq).generate(ids, 8))


# ---- bad input: one clear ConfigError each, before anything is compiled ------------------------------------
_CASES = {
    "empty batch": (dict(input_ids=np.zeros((0, 5), np.int32)), "empty"),
    "empty length": (dict(input_ids=np.zeros((2, 0), np.int32)), "empty"),
    "3-d ids": (dict(input_ids=np.ones((1, 2, 3), np.int32)), r"\[batch, length\]"),
    "float ids": (dict(input_ids=np.ones((1, 3), np.float32)), "integer"),
    "ragged ids": (dict(input_ids=[[5, 6, 1], [7, 1]]), "different lengths"),
    "all-padding row": (dict(input_ids=np.array([[5, 6, 1], [0, 0, 0]])), r"row\(s\) \[1\].*all padding"),
    "all-masked row": (dict(input_ids=np.array([[5, 6, 1], [7, 8, 1]]), attention_mask=np.array([[1, 1, 1],
                                                                                               [0, 0, 0]])),
                       "all padding"),
    "id >= vocab": (dict(input_ids=np.array([[5, 128]])), r"token id 128 outside the vocabulary \[0, 128\)"),
    "negative id": (dict(input_ids=np.array([[-1, 5]])), "token id -1 outside"),
    "mask shape": (dict(input_ids=np.array([[5, 6, 1]]), attention_mask=np.ones((1, 4))), "does not match"),
    "mask values": (dict(input_ids=np.array([[5, 6, 1]]), attention_mask=np.array([[1, 2, 1]])), "0/1"),
    "max_new 0": (dict(max_new_tokens=0), r"max_new_tokens must be in \[1, 4096\], got 0"),
    "max_new > cache": (dict(max_new_tokens=5000), "KV cache holds max_cache_len=4096"),
    "max_new > given cache": (dict(max_new_tokens=20, max_cache_len=16), "max_cache_len=16"),
    "max_new float": (dict(max_new_tokens=3.5), "must be an integer"),
    "min_new > max_new": (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens"),
    "num_beams 0": (dict(num_beams=0), "num_beams"),
    "eos outside vocab": (dict(eos_id=500), "eos_id"),
    "routing mode": (dict(routing_mode="fast"), "routing_mode must be one of"),
    "length_penalty nan": (dict(length_penalty=float("nan")), "length_penalty"),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_bad_input_one_clear_error(case: str) -> None:
    m = _tiny(0)
    kw, msg = _CASES[case]
    kw = {"input_ids": np.array([[5, 6, 7, 1]]), "max_new_tokens": 4, **kw}
    with pytest.raises(ConfigError, match=msg):
        m.generate(**kw)


def test_generate_inside_jit_is_a_clear_error() -> None:
    m = _tiny(0)
    with pytest.raises(ConfigError, match="outside jax.jit"):
        jax.jit(lambda x: jnp.asarray(m.generate(x, 3)))(jnp.ones((1, 3), jnp.int32))


def test_bench_command_runs_the_checkout_benchmark() -> None:
    """`moqe bench generate ARGS` is registered and hands ARGS to benchmarks/generate.py of this checkout."""
    from pathlib import Path

    from moqe_jax.cli import build_parser
    from moqe_jax.commands import bench

    args = build_parser().parse_args(["bench", "generate", "--quick", "--models", "bundled"])
    assert args.name == "generate" and args.args == ["--quick", "--models", "bundled"]
    assert bench.checkout_root() == Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "nothing"])
