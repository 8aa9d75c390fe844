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
