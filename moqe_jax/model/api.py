"""Public model API: ``Model``, ``load_model``, ``param_counts`` (docs/ARCHITECTURE.md "Public Python API")."""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError, ConfigError
from moqe_jax.model.components import COMPONENTS, component_of
from moqe_jax.model.switch import SwitchTransformer, init_params

__all__ = ["Model", "load_model", "param_counts", "param_shapes"]


@functools.partial(jax.jit, static_argnums=(0, 6))
def _forward(cfg: SwitchConfig, params: dict, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask,
             train: bool = False):
    return SwitchTransformer(cfg).apply({"params": params}, input_ids, decoder_input_ids, attention_mask,
                                        decoder_attention_mask, train)


def _as_ids(a: Any, what: str) -> jax.Array:
    arr = np.asarray(a)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{what} must be an integer array [batch, length], got {arr.dtype}{list(arr.shape)}")
    return jnp.asarray(arr, jnp.int32)


class Model:
    """A Switch model: ``config`` + ``params`` (float or quantized leaves, T5X tree of spec §2)."""

    def __init__(self, config: SwitchConfig, params: dict):
        self.config = config
        self.params = params

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def init(cls, config: SwitchConfig | str, seed: int = 0) -> Model:
        """Random T5X-style initialisation (see ``moqe_jax.model.switch.init_params``)."""
        cfg = SwitchConfig.preset(config) if isinstance(config, str) else config
        return cls(cfg, init_params(cfg, seed))

    def replace(self, config: SwitchConfig | None = None, params: dict | None = None) -> Model:
        return Model(config or self.config, self.params if params is None else params)

    # ---- inference -------------------------------------------------------------------------------
    def apply(self, input_ids: Any, decoder_input_ids: Any, attention_mask: Any = None,
              decoder_attention_mask: Any = None, train: bool = False) -> tuple[jax.Array, dict]:
        """``(logits [B,T,V] f32 jax array, aux)``; aux: ``aux_loss``, ``z_loss``, ``dropped_fraction``, ``moe``."""
        ids = _as_ids(input_ids, "input_ids")
        dids = _as_ids(decoder_input_ids, "decoder_input_ids")
        am = None if attention_mask is None else jnp.asarray(np.asarray(attention_mask).reshape(ids.shape))
        dm = None if decoder_attention_mask is None else jnp.asarray(
            np.asarray(decoder_attention_mask).reshape(dids.shape))
        return _forward(self.config, self.params, ids, dids, am, dm, train)

    def logits(self, input_ids: Any, decoder_input_ids: Any, attention_mask: Any = None,
               decoder_attention_mask: Any = None) -> np.ndarray:
        """Output logits ``[B, T, V]`` as a float32 NumPy array."""
        out, _ = self.apply(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)
        return np.asarray(out, np.float32)

    def generate(self, input_ids: Any, max_new_tokens: int = 32, num_beams: int = 1, attention_mask: Any = None,
                 length_penalty: float = 0.6) -> np.ndarray:
        """Greedy (``num_beams=1``) or beam-search decoding with a KV cache; ``[B, max_new_tokens]`` ids
        (after EOS: pad id)."""
        from moqe_jax.model import decode

        ids = _as_ids(input_ids, "input_ids")
        am = None if attention_mask is None else jnp.asarray(np.asarray(attention_mask).reshape(ids.shape))
        if num_beams <= 1:
            out = decode.greedy_search(self.config, self.params, ids, int(max_new_tokens), am)
        else:
            out = decode.beam_search(self.config, self.params, ids, int(max_new_tokens), int(num_beams), am,
                                     float(length_penalty))
        return np.asarray(out)

    # ---- reports / persistence --------------------------------------------------------------------
    def size_report(self) -> Any:
        from moqe_jax.quant.report import size_report

        return size_report(self)

    def save(self, directory: str | os.PathLike) -> Any:
        from moqe_jax.checkpoint.store import save_model

        return save_model(self, directory)

    def param_counts(self) -> dict[str, int]:
        return param_counts(self.config)

    def __repr__(self) -> str:
        return f"Model({self.config.name}, {sum(param_counts(self.config).values()) / 1e9:.3f}B params)"


def load_model(source: str | os.PathLike, config: SwitchConfig | str | None = None) -> Model:
    """``hf:DIR`` (HF Switch), ``t5x:DIR`` (T5X checkpoint; ``config`` or preset name required) or a
    directory written by ``Model.save``."""
    src = os.fspath(source)
    cfg = SwitchConfig.preset(config) if isinstance(config, str) else config
    if src.startswith("hf:"):
        from moqe_jax.checkpoint.hf import load_hf

        return load_hf(src[3:], config=cfg)
    if src.startswith("t5x:"):
        from moqe_jax.checkpoint.t5x import load_t5x_model

        if cfg is None:
            raise ConfigError(f"{src}: T5X checkpoints carry no config; pass config= (a SwitchConfig or preset name)")
        return load_t5x_model(src[4:], cfg)
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such model directory (use hf:DIR, t5x:DIR or a saved model dir)")
    from moqe_jax.checkpoint.store import load_model as _load

    return _load(src)


# ---- parameter accounting ---------------------------------------------------------------------------
def param_shapes(cfg: SwitchConfig) -> dict[str, tuple[int, ...]]:
    """``{"encoder/layers_1/mlp/expert/wi/kernel": shape, ...}`` via ``jax.eval_shape`` (no allocation)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, 0))
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        out["/".join(str(getattr(k, "key", k)) for k in path)] = tuple(leaf.shape)
    return out


@functools.lru_cache(maxsize=64)
def param_counts(cfg: SwitchConfig) -> dict[str, int]:
    """Parameter count per component (``moqe_jax.model.components.COMPONENTS``), computed abstractly."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for path, shape in param_shapes(cfg).items():
        counts[component_of(path)] += math.prod(shape)
    return counts
