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

    def with_weight_layout(self, layout: str = "words") -> Model:
        """A copy whose ``QuantizedTensor`` weights are held in ``layout`` (``"words"``: the kernels' uint32 words,
        read as they are by the compiled decode loop; ``"bytes"``: the stored byte layout). One exact repack,
        outside ``jit``; formats without a word layout stay bytes (docs/KERNELS.md, docs/FORMATS.md §1)."""
        from moqe_jax.packed.qtensor import convert_layout

        return dataclasses.replace(self, params=convert_layout(self.params, layout))

    # ---- inference -------------------------------------------------------------------------------
    def apply(self, input_ids: Any, decoder_input_ids: Any, attention_mask: Any = None,
              decoder_attention_mask: Any = None, train: bool = False, rng: Any = None) -> tuple[jax.Array, dict]:
        """``(logits [B,T,V] f32 jax array, aux)``; aux: ``aux_loss``, ``z_loss``, ``dropped_fraction``, ``moe``.

        ``train=True``: train capacity factor, and with ``rng`` (a PRNG key) dropout / router noise when the config
        sets them (docs/FINETUNING.md). Traceable (inputs may be tracers inside a caller's ``jax.jit``/``jax.grad``)."""
        ids = _as_ids(input_ids, "input_ids")
        dids = _as_ids(decoder_input_ids, "decoder_input_ids")
        return forward(self.config, self.params, ids, dids, _as_mask(attention_mask, ids.shape),
                       _as_mask(decoder_attention_mask, dids.shape), train, self.kernels, rng)

    def logits(self, input_ids: Any, decoder_input_ids: Any, attention_mask: Any = None,
               decoder_attention_mask: Any = None) -> jax.Array:
        """Output logits ``[B, T, V]`` (float32 jax array; traceable)."""
        out, _ = self.apply(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)
        return out

    def generate(self, input_ids: Any, max_new_tokens: int = 32, num_beams: int = 1, attention_mask: Any = None,
                 length_penalty: float = 0.6, *, eos_id: int | None = None, min_new_tokens: int = 0,
                 routing_mode: str | None = None, bucket: bool | None = None,
                 max_cache_len: int = 4096) -> np.ndarray:
        """Greedy (``num_beams=1``) or beam-search decoding with a KV cache in one compiled loop;
        ``[B, max_new_tokens]`` NumPy ids (after EOS: pad id). ``eos_id`` (default the config's),
        ``min_new_tokens`` (EOS banned before), ``routing_mode`` (default "dropless" for a "t5x" config when
        available), ``bucket`` (pad shapes to power-of-two buckets; default on except under "t5x"
        capacity), ``max_cache_len`` (bound on ``max_new_tokens``). See ``moqe_jax.model.decode``."""
        from moqe_jax.model import decode

        return decode.generate(self.config, self.params, input_ids, max_new_tokens, num_beams, attention_mask,
                               length_penalty, eos_id=eos_id, min_new_tokens=min_new_tokens,
                               routing_mode=routing_mode, bucket=bucket, max_cache_len=max_cache_len,
                               kernels=self.kernels)

    # ---- reports / persistence --------------------------------------------------------------------
    def size_report(self) -> Any:
        from moqe_jax.quant.report import size_report

        return size_report(self)

    def save(self, directory: str | os.PathLike, format: str = "orbax", overwrite: bool = False) -> str:
        return save_model(self, directory, format=format, overwrite=overwrite)

    def to_hf(self, directory: str | os.PathLike, dtype: str = "float32") -> str:
        """Export for Hugging Face transformers: ``config.json`` + ``model.safetensors`` in HF's names, packed
        weights dequantized (``moqe_jax.checkpoint.hf_export``); returns the directory."""
        from moqe_jax.checkpoint.hf_export import export_hf

        return export_hf(self, directory, dtype=dtype)

    def to_qmoe(self, directory: str | os.PathLike, dtype: str = "float32", format: str = "safetensors") -> str:
        """Export a sub-1-bit model in QMoE's checkpoint layout (docs/QMOE.md §1.8): compressed experts as
        ``expNN`` files, the rest as ``noexp`` in HF's names, ``sizes``, ``config.json``; ``format``
        ``"safetensors"`` or ``"pt"`` (torch, what QMoE's own loader reads). Read back with ``qmoe:DIR``."""
        from moqe_jax.checkpoint.qmoe import export_qmoe

        return export_qmoe(self, directory, dtype=dtype, format=format)

    def param_counts(self) -> dict[str, int]:
        return param_counts(self.config)

    def __repr__(self) -> str:
        return f"Model({self.config.name}, {sum(param_counts(self.config).values()) / 1e9:.3f}B params)"


#: ``load_model(weight_layout=...)`` values: None keeps the layout the checkpoint stores.
WEIGHT_LAYOUTS = (None, "bytes", "words")


def load_model(source: str | os.PathLike, config: SwitchConfig | str | None = None, *,
               sharding: Any = None, allow_outside: bool = False, allow_missing_chunks: bool = False,
               nonfinite: str = "warn", weight_layout: str | None = None) -> Model:
    """``hf:DIR`` (HF Switch), ``t5x:DIR`` (T5X checkpoint; ``config``, preset name or JSON file, else the
    ``config.json`` that ``moqe convert --to-t5x`` writes next to it), ``qmoe:DIR`` (QMoE checkpoint, e.g.
    from :meth:`Model.to_qmoe`) or a
    directory written by :func:`save_model`. ``sharding`` (saved directories only): a
    ``jax.sharding.Sharding`` for every tensor or ``fn(name, shape) -> Sharding`` (Orbax sharded restore).

    ``allow_outside`` / ``allow_missing_chunks`` (``t5x:`` only, both off by default; docs/RELIABILITY.md):
    trust array paths that leave the checkpoint directory (absolute paths, ``gs://`` layouts), and read
    missing zarr chunks as the array's declared fill value instead of failing. ``nonfinite``: ``"warn"``
    (default: a ``NonFiniteWeightsWarning`` naming tensors with NaN/inf), ``"error"`` (refuse to load) or
    ``"ignore"``. ``weight_layout``: None (default: packed weights as the checkpoint stores them), ``"bytes"``
    or ``"words"`` (the kernels' uint32 words): one exact repack after the load, :meth:`Model.with_weight_layout`
    (docs/KERNELS.md §2)."""
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ConfigError(f"weight_layout must be None, 'bytes' or 'words', got {weight_layout!r}")
    model = _load_model(os.fspath(source), config, sharding, allow_outside, allow_missing_chunks, nonfinite)
    return model if weight_layout is None else model.with_weight_layout(weight_layout)


def _load_model(src: str, config: SwitchConfig | str | None, sharding: Any, allow_outside: bool,
                allow_missing_chunks: bool, nonfinite: str) -> Model:
    if (allow_outside or allow_missing_chunks) and not src.startswith("t5x:"):
        raise ConfigError(f"{src}: allow_outside/allow_missing_chunks apply to t5x: checkpoints only")
    cfg: SwitchConfig | None
    if isinstance(config, str):
        cfg = read_config_file(config) if os.path.isfile(config) else SwitchConfig.preset(config)
    else:
        cfg = config
    if sharding is not None and src.startswith(("hf:", "t5x:", "qmoe:")):
        raise ConfigError(f"{src}: sharding= applies to saved model directories only")
    if src.startswith("hf:"):
        from moqe_jax.checkpoint.hf import load_hf
        from moqe_jax.checkpoint.hf_export import export_config

        cfg = cfg or export_config(src[3:])  # our own export: the full config it embedded
        hf_cfg, hf_params = load_hf(src[3:], config=cfg)
        store.warn_nonfinite(hf_params, src, nonfinite)
        return Model(hf_cfg, hf_params)
    if src.startswith("qmoe:"):
        from moqe_jax.checkpoint.qmoe import load_qmoe

        q_cfg, q_params = load_qmoe(src[5:], config=cfg)
        store.warn_nonfinite(q_params, src, nonfinite)
        return Model(q_cfg, q_params)
    if src.startswith("t5x:"):
        from moqe_jax.checkpoint.t5x import load_t5x

        cfg = cfg or t5x_config(src[4:])
        if cfg is None:
            raise ConfigError(f"{src}: T5X checkpoints carry no config and no {CONFIG_FILE} was found next to it; "
                              "pass config= (a SwitchConfig, preset name or config JSON file)")
        t5x_cfg, t5x_params = load_t5x(src[4:], cfg, allow_outside=allow_outside,
                                       allow_missing_chunks=allow_missing_chunks)
        store.warn_nonfinite(t5x_params, src, nonfinite)
        return Model(t5x_cfg, t5x_params)
    try:
        return Model(*store.load(src, sharding, nonfinite))
    except CheckpointError as e:
        if os.path.exists(src):
            raise
        raise CheckpointError(f"{e} (use hf:DIR, t5x:DIR, qmoe:DIR or a saved model dir)") from None


#: The config written next to an exported T5X checkpoint (``moqe convert --to-t5x``), read back by ``t5x:DIR``.
CONFIG_FILE = "config.json"


def read_config_file(path: str | os.PathLike) -> SwitchConfig:
    """A ``SwitchConfig`` from a JSON file: ``SwitchConfig.to_json()`` output, a Hugging Face ``config.json``
    (``model_type`` key) or a saved model's manifest (``config`` key)."""
    import json

    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: a config file holds a JSON object")
    if "model_type" in d:
        return SwitchConfig.from_hf(d)
    if isinstance(d.get("config"), dict) and "leaves" in d:
        d = d["config"]
    try:
        return SwitchConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{p}: bad config ({e})") from None


def t5x_config(path: str | os.PathLike) -> SwitchConfig | None:
    """The config written next to a T5X checkpoint, or None: ``config.json`` in ``path`` or, when ``path`` is a
    step directory (``checkpoint_N``, ``N``) or its ``checkpoint`` file, in the directories above it."""
    import re

    p = os.path.abspath(os.fspath(path))
    while True:
        if os.path.isfile(os.path.join(p, CONFIG_FILE)):
            return read_config_file(os.path.join(p, CONFIG_FILE))
        base = os.path.basename(p)
        if base != "checkpoint" and not re.fullmatch(r"(checkpoint_)?\d+", base):
            return None
        p = os.path.dirname(p)


def save_model(model: Model, directory: str | os.PathLike, format: str = "orbax", overwrite: bool = False) -> str:
    """Config + (quantized) params, atomically, as ``format`` ``"orbax"`` or ``"safetensors"``; returns the
    directory (layout: ``moqe_jax.checkpoint.store``). Files the store did not write are kept; a non-empty
    directory that is not a saved model is refused unless ``overwrite=True``."""
    return store.save_params(model.params, directory, config=model.config.to_dict(), format=format,
                             overwrite=overwrite)
