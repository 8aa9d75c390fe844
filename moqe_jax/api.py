"""The facade: ``Model``, ``load_model``, ``save_model`` (docs/ARCHITECTURE.md "Public Python API").

It sits above ``moqe_jax.model`` (the pure network), ``moqe_jax.checkpoint`` (readers/writers that
return ``(SwitchConfig, params)``) and ``moqe_jax.quant`` (reports), so none of those import it.
``param_counts``/``param_shapes`` are re-exported from ``moqe_jax.model.api`` as part of the public API.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax import ops
from moqe_jax.checkpoint import store
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError, ConfigError
from moqe_jax.model.api import forward, param_counts, param_shapes
from moqe_jax.model.switch import init_params

__all__ = ["Model", "load_model", "save_model", "param_counts", "param_shapes"]


def _as_ids(a: Any, what: str) -> jax.Array:
    """``[batch, length]`` int32 ids (a 1-D sequence gets a batch axis); static checks only (traceable)."""
    arr = jnp.asarray(a)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ConfigError(f"{what} must be an integer array [batch, length], got {arr.dtype}{list(arr.shape)}")
    return arr.astype(jnp.int32)


def _as_mask(a: Any, shape: tuple[int, ...]) -> jax.Array | None:
    return None if a is None else jnp.asarray(a).reshape(shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A Switch model: ``config`` + ``params`` (float or quantized leaves, T5X tree of docs/T5X_SWITCH.md §2).

    A pytree: ``params`` are the leaves, ``config`` and ``kernels`` (the ``moqe_jax.ops`` kernel mode) static
    aux data, so a ``Model`` passes through ``jax.jit``/``jax.grad`` and a change of ``kernels`` retraces.
    """

    config: SwitchConfig = dataclasses.field(metadata={"static": True})
    params: dict
    kernels: str = dataclasses.field(default="auto", metadata={"static": True})

    def __post_init__(self) -> None:
        ops.check_mode(self.kernels)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def init(cls, config: SwitchConfig | str, seed: int = 0) -> Model:
        """Random T5X-style initialisation (see ``moqe_jax.model.switch.init_params``)."""
        cfg = SwitchConfig.preset(config) if isinstance(config, str) else config
        return cls(cfg, init_params(cfg, seed))

    def replace(self, config: SwitchConfig | None = None, params: dict | None = None) -> Model:
        return Model(config or self.config, self.params if params is None else params, self.kernels)

    def with_kernels(self, mode: str) -> Model:
        """A copy whose matmuls run in kernel ``mode`` (``auto``/``xla``/``pallas``/``interpret``)."""
        return dataclasses.replace(self, kernels=mode)

    # ---- inference -------------------------------------------------------------------------------
    def apply(self, input_ids: Any, decoder_input_ids: Any, attention_mask: Any = None,
              decoder_attention_mask: Any = None, train: bool = False) -> tuple[jax.Array, dict]:
        """``(logits [B,T,V] f32 jax array, aux)``; aux: ``aux_loss``, ``z_loss``, ``dropped_fraction``, ``moe``.

        Traceable (inputs may be tracers inside a caller's ``jax.jit``/``jax.grad``)."""
        ids = _as_ids(input_ids, "input_ids")
        dids = _as_ids(decoder_input_ids, "decoder_input_ids")
        return forward(self.config, self.params, ids, dids, _as_mask(attention_mask, ids.shape),
                       _as_mask(decoder_attention_mask, dids.shape), train, self.kernels)

    def logits(self, input_ids: Any, decoder_input_ids: Any, attention_mask: Any = None,
               decoder_attention_mask: Any = None) -> jax.Array:
        """Output logits ``[B, T, V]`` (float32 jax array; traceable)."""
        out, _ = self.apply(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)
        return out

    def generate(self, input_ids: Any, max_new_tokens: int = 32, num_beams: int = 1, attention_mask: Any = None,
                 length_penalty: float = 0.6) -> np.ndarray:
        """Greedy (``num_beams=1``) or beam-search decoding with a KV cache; ``[B, max_new_tokens]`` ids
        (after EOS: pad id)."""
        from moqe_jax.model import decode

        ids = _as_ids(input_ids, "input_ids")
        am = _as_mask(attention_mask, ids.shape)
        if num_beams <= 1:
            out = decode.greedy_search(self.config, self.params, ids, int(max_new_tokens), am, kernels=self.kernels)
        else:
            out = decode.beam_search(self.config, self.params, ids, int(max_new_tokens), int(num_beams), am,
                                     float(length_penalty), kernels=self.kernels)
        return np.asarray(out)

    # ---- reports / persistence --------------------------------------------------------------------
    def size_report(self) -> Any:
        from moqe_jax.quant.report import size_report

        return size_report(self)

    def save(self, directory: str | os.PathLike, format: str = "orbax") -> str:
        return save_model(self, directory, format=format)

    def param_counts(self) -> dict[str, int]:
        return param_counts(self.config)

    def __repr__(self) -> str:
        return f"Model({self.config.name}, {sum(param_counts(self.config).values()) / 1e9:.3f}B params)"


def load_model(source: str | os.PathLike, config: SwitchConfig | str | None = None, *,
               sharding: Any = None) -> Model:
    """``hf:DIR`` (HF Switch), ``t5x:DIR`` (T5X checkpoint; ``config`` or preset name required) or a
    directory written by :func:`save_model`. ``sharding`` (saved directories only): a
    ``jax.sharding.Sharding`` for every tensor or ``fn(name, shape) -> Sharding`` (Orbax sharded restore)."""
    src = os.fspath(source)
    cfg = SwitchConfig.preset(config) if isinstance(config, str) else config
    if sharding is not None and src.startswith(("hf:", "t5x:")):
        raise ConfigError(f"{src}: sharding= applies to saved model directories only")
    if src.startswith("hf:"):
        from moqe_jax.checkpoint.hf import load_hf

        return Model(*load_hf(src[3:], config=cfg))
    if src.startswith("t5x:"):
        from moqe_jax.checkpoint.t5x import load_t5x

        if cfg is None:
            raise ConfigError(f"{src}: T5X checkpoints carry no config; pass config= (a SwitchConfig or preset name)")
        return Model(*load_t5x(src[4:], cfg))
    try:
        return Model(*store.load(src, sharding))
    except CheckpointError as e:
        if os.path.exists(src):
            raise
        raise CheckpointError(f"{e} (use hf:DIR, t5x:DIR or a saved model dir)") from None


def save_model(model: Model, directory: str | os.PathLike, format: str = "orbax") -> str:
    """Config + (quantized) params, atomically, as ``format`` ``"orbax"`` or ``"safetensors"``; returns the
    directory (layout: ``moqe_jax.checkpoint.store``)."""
    return store.save_params(model.params, directory, config=model.config.to_dict(), format=format)
