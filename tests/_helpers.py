"""Shared test helpers (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import errno

import jax.numpy as jnp
import numpy as np

from moqe_jax.tree import flatten_params, unflatten_params


def random_tiny_model(seed: int, **overrides):
    """`tiny` preset with random weights from ``param_shapes`` (cheaper than a Flax init)."""
    from moqe_jax import api
    from moqe_jax.config import SwitchConfig

    cfg = SwitchConfig.preset("tiny", **overrides)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in api.param_shapes(cfg).items():
        leaf = path.rsplit("/", 1)[-1]
        std = 1.0 if (leaf == "scale" or "embedd" in path) else 1.0 / np.sqrt(shape[-2] if len(shape) > 1 else 1)
        flat[path] = jnp.asarray(rng.standard_normal(shape) * std + (1.0 if leaf == "scale" else 0.0), jnp.float32)
    return api.Model(cfg, unflatten_params(flat))


def enospc() -> OSError:
    """A full disk, as the OS reports it."""
    return OSError(errno.ENOSPC, "No space left on device")


def wrapped_enospc() -> Exception:
    """How Orbax's writer threads report a full disk: the OSError wrapped in another exception."""
    try:
        raise enospc()
    except OSError as e:
        try:
            raise RuntimeError("async save failed") from e
        except RuntimeError as w:
            return w


def tiny_fixture(seed: int):
    """A module-scoped ``tiny`` fixture: ``random_tiny_model(seed)`` (in a test module: ``tiny = tiny_fixture(5)``)."""
    import pytest

    @pytest.fixture(scope="module")
    def tiny():
        return random_tiny_model(seed)
    return tiny


def same_params(a: dict, b: dict) -> bool:
    """Same parameter paths and bit-identical arrays."""
    fa, fb = flatten_params(a), flatten_params(b)
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def changed_model(model, scale: float = 1.0, shift: float = 1.0):
    """``model`` with every weight replaced by ``w * scale + shift`` (a different model of the same shapes)."""
    return model.replace(params=unflatten_params({k: np.asarray(v) * scale + shift
                                                  for k, v in flatten_params(model.params).items()}))


def assert_failed_save_message(msg: str, directory, *needles: str) -> None:
    """A failed save's error: one line, names ``directory``, says the previous model is unchanged, and holds
    each of ``needles`` (the cause and the fix)."""
    assert "\n" not in msg and str(directory) in msg and "previous model is unchanged" in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


def tiny_f32_config(**kw):
    """The ``tiny`` preset in float32 (the training tests' model)."""
    from moqe_jax.config import SwitchConfig

    return SwitchConfig.preset("tiny", dtype="float32", **kw)


def tiny_train_config(**kw):
    """A short synchronous training run (4 steps, batch 8, no eval/save unless ``kw`` says so)."""
    from moqe_jax.training import TrainConfig

    base = dict(steps=4, batch_size=8, log_every=1000, eval_every=0, save_every=0, learning_rate=0.01,
                warmup_steps=10, async_save=False)
    base.update(kw)
    return TrainConfig(**base)


def hf_inputs(randint, vocab: int, b: int, length: int, t: int, enc_pad: dict[int, int], dec_pad: dict[int, int]):
    """(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) for HF parity tests: random ids
    from ``randint(lo, hi, shape)``, rows padded from ``enc_pad[row]`` / ``dec_pad[row]`` on, decoder start 0."""
    ids = randint(2, vocab, (b, length))
    am = np.ones_like(ids)
    for row, start in enc_pad.items():
        am[row, start:] = 0
    ids[am == 0] = 0
    dec = randint(2, vocab, (b, t))
    dec[:, 0] = 0
    dm = np.ones_like(dec)
    for row, start in dec_pad.items():
        dm[row, start:] = 0
    return ids, am, dec, dm


def random_qt(rng: np.random.Generator, spec, shape: tuple[int, ...]):
    """A QuantizedTensor with random codes, scales (and zeros where ``spec`` has them)."""
    from moqe_jax.packed import QuantizedTensor

    *batch, k, n = shape
    g = spec.num_groups(k)
    scales = rng.uniform(0.2, 1.5, (*batch, g, n)) * (1e-2 if spec.scheme == "log" else 1.0)
    zeros = None
    if spec.is_ternary:
        zeros = -rng.uniform(0.2, 1.5, (*batch, g, n))
    elif spec.has_zeros:
        zeros = rng.integers(0, spec.maxq + 1, (*batch, g, n)).astype(np.float64)
    return QuantizedTensor.from_codes(rng.integers(0, spec.maxq + 1, shape), scales, zeros, spec)


def np_top1_dispatch(flat: np.ndarray, wr: np.ndarray, g: int, s: int, cap: int, expert):
    """NumPy (f64) top-1 routing in token order, as Flaxformer's MoeLayer: ``g`` groups of ``s`` tokens, each
    expert takes at most ``cap`` tokens per group; a token's output is ``p_k · expert(k, x)`` (0 when dropped).
    Returns (out, number of dropped tokens)."""
    out = np.zeros_like(flat)
    ndrop = 0
    for gi in range(g):
        count = np.zeros(wr.shape[-1], int)
        for tok in range(gi * s, (gi + 1) * s):
            logit = flat[tok] @ wr
            p = np.exp(logit - logit.max())
            p /= p.sum()
            k = int(np.argmax(p))
            if count[k] < cap:
                out[tok] = p[k] * expert(k, flat[tok])
            else:
                ndrop += 1
            count[k] += 1
    return out, ndrop
