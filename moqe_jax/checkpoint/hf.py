"""Hugging Face Switch import (docs/T5X_SWITCH.md §5): ``config.json`` + safetensors / ``.bin``.

Inverse of the T5X→HF mapping of spec §5.3: ``nn.Linear`` weights ``[out, in]`` are transposed to
Flax kernels ``[in, out]``; per-expert ``experts.expert_{j}.{wi,wo}`` are stacked to ``[E, ...]``;
``relative_attention_bias.weight [32, H]`` → ``rel_embedding [H, 32]``; ``router.classifier.weight
[E, D]`` → ``[D, E]``; the separate output layer may be ``lm_head.weight`` or (converted XXL/C files)
``decoder.lm_head.weight``. Tied copies (``encoder/decoder.embed_tokens``, tied ``lm_head``) may be
present or missing. Tensors of any float dtype (bf16/f16/f32) are accepted and stored as float32.

Safetensors files are read with the safetensors library (a truncated/corrupt file gives one clear line);
``.bin`` files are read only with ``torch.load(weights_only=True)``. Weight files named by the shard index
must be regular files inside the model directory (no absolute or ``..`` paths, no symlink leaving it, no FIFO).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from moqe_jax.checkpoint import store
from moqe_jax.checkpoint.zarr import check_confined
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError, MoqeError
from moqe_jax.tree import unflatten_params

__all__ = ["load_hf", "load_hf_params", "read_hf_tensors", "read_safetensors", "hf_name_map"]

def _bf16() -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file (the store's reader: ``safe_open``, FIFOs refused, one-line errors)."""
    return store.read_safetensors(path)[0]


def _read_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading .bin checkpoints needs PyTorch (pip install torch)") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt zips/pickles
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load PyTorch checkpoint ({msg})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: not a state dict")
    out = {}
    for k, t in sd.items():
        if not hasattr(t, "dtype"):
            continue
        t = t.detach()
        out[k] = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return out


def _weight_files(d: str) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(d, index)
        if os.path.exists(p):
            try:
                with open(p) as f:
                    wm = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{p}: corrupt shard index (needs a 'weight_map')") from None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(f"{p}: corrupt shard index ('weight_map' must map names to file names)")
            files = sorted(set(wm.values()))
            for fn in files:
                if os.path.isabs(fn) or os.path.normpath(fn).split(os.sep)[0] == "..":
                    raise CheckpointError(f"{p}: shard {fn!r} is a path leaving the model directory {d}; shards "
                                          "must be files inside it")
                if not os.path.lexists(os.path.join(d, fn)):
                    raise CheckpointError(f"{p}: shard {fn} is missing")
                check_confined(os.path.join(d, fn), d, what="shard", recursive=False, hint=_HINT)
            return [os.path.join(d, fn) for fn in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(d, single)
        if os.path.lexists(p):
            check_confined(p, d, what="weight file", recursive=False, hint=_HINT)
            return [p]
    raise CheckpointError(f"{d}: no model.safetensors / pytorch_model.bin (or shard index) found")


def read_hf_tensors(d: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({name: array}, {name: file})`` over all weight files of a HF directory."""
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for p in _weight_files(d):
        part = read_safetensors(p) if p.endswith(".safetensors") else _read_bin(p)
        for k, v in part.items():
            tensors[k] = v
            where[k] = p
    return tensors, where


_HINT = "copy the weight files into the model directory"

Transform = Callable[[list[np.ndarray]], np.ndarray]


def _t(a: list[np.ndarray]) -> np.ndarray:
    return a[0].T


def _id(a: list[np.ndarray]) -> np.ndarray:
    return a[0]


def _stack_t(a: list[np.ndarray]) -> np.ndarray:
    return np.stack([x.T for x in a])


def hf_name_map(cfg: SwitchConfig) -> dict[str, tuple[list[str], Transform]]:
    """T5X param path -> (HF tensor names, transform to the Flax layout), spec §5.2–5.3."""
    m: dict[str, tuple[list[str], Transform]] = {"token_embedder/embedding": (["shared.weight"], _id)}
    mlp_names = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
    for stack, n_layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        m[f"{stack}/relpos_bias/rel_embedding"] = (
            [f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], _t)
        m[f"{stack}/{stack}_norm/scale"] = ([f"{stack}.final_layer_norm.weight"], _id)
        sparse = cfg.sparse_layers(stack)
        for i in range(n_layers):
            p, h = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            attn = [("attention" if stack == "encoder" else "self_attention", "0.SelfAttention")]
            if stack == "decoder":
                attn.append(("encoder_decoder_attention", "1.EncDecAttention"))
            for ours, theirs in attn:
                for a, b in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
                    m[f"{p}/{ours}/{a}/kernel"] = ([f"{h}.{theirs}.{b}.weight"], _t)
            ml = 1 if stack == "encoder" else 2
            if stack == "encoder":
                m[f"{p}/pre_attention_layer_norm/scale"] = ([f"{h}.0.layer_norm.weight"], _id)
            else:
                m[f"{p}/pre_self_attention_layer_norm/scale"] = ([f"{h}.0.layer_norm.weight"], _id)
                m[f"{p}/pre_cross_attention_layer_norm/scale"] = ([f"{h}.1.layer_norm.weight"], _id)
            m[f"{p}/pre_mlp_layer_norm/scale"] = ([f"{h}.{ml}.layer_norm.weight"], _id)
            if i in sparse:
                m[f"{p}/mlp/router/router_weights/w/kernel"] = ([f"{h}.{ml}.mlp.router.classifier.weight"], _t)
                if cfg.router_bias:  # transformers' nn.Linear(bias=config.router_bias)
                    m[f"{p}/mlp/router/router_weights/w/bias"] = ([f"{h}.{ml}.mlp.router.classifier.bias"], _id)
                for w in mlp_names:
                    m[f"{p}/mlp/expert/{w}/kernel"] = (
                        [f"{h}.{ml}.mlp.experts.expert_{j}.{w}.weight" for j in range(cfg.num_experts)], _stack_t)
            else:
                for w in mlp_names:
                    m[f"{p}/mlp/{w}/kernel"] = ([f"{h}.{ml}.mlp.{w}.weight"], _t)
    if not cfg.tie_word_embeddings:
        m["decoder/logits_dense/kernel"] = (["lm_head.weight"], _t)
    return m


_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def load_hf_params(d: str, cfg: SwitchConfig) -> dict:
    """Nested T5X param dict (float32 NumPy) from the HF weights in directory ``d``."""
    from moqe_jax.model.api import param_shapes

    tensors, where = read_hf_tensors(d)
    shapes = param_shapes(cfg)
    nmap = hf_name_map(cfg)
    if not cfg.tie_word_embeddings and "lm_head.weight" not in tensors and "decoder.lm_head.weight" in tensors:
        tensors["lm_head.weight"] = tensors.pop("decoder.lm_head.weight")
        where["lm_head.weight"] = where["decoder.lm_head.weight"]
    if "shared.weight" not in tensors:
        for alt in (*_TIED_COPIES, "lm_head.weight" if cfg.tie_word_embeddings else ""):
            if alt in tensors:
                tensors["shared.weight"] = tensors[alt]
                where["shared.weight"] = where[alt]
                break
    for alt in _TIED_COPIES:  # T5X Switch has ONE shared embedder: copies must be identical
        if alt in tensors and "shared.weight" in tensors and tensors[alt] is not tensors["shared.weight"]:
            a, b = tensors[alt], tensors["shared.weight"]
            if a.shape != b.shape or not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)):
                raise CheckpointError(f"{where[alt]}: tensor {alt} differs from shared.weight (separate encoder/"
                                      "decoder embeddings are not part of the Switch architecture)")
    used: set[str] = set()
    flat: dict[str, np.ndarray] = {}
    for path, (names, fn) in nmap.items():
        arrs = []
        for n in names:
            if n not in tensors:
                raise CheckpointError(f"{d}: missing tensor {n} (needed for {path})")
            a = tensors[n]
            if not np.issubdtype(np.dtype(a.dtype), np.floating) and a.dtype != np.dtype(_bf16()):
                raise CheckpointError(f"{where[n]}: tensor {n} has non-float dtype {a.dtype}")
            arrs.append(np.asarray(a, np.float32))
            used.add(n)
        want = tuple(shapes[path])
        per = want if fn is _id else (want[::-1] if fn is _t else want[1:][::-1])
        for n, a in zip(names, arrs, strict=True):
            if tuple(a.shape) != tuple(per):
                raise CheckpointError(f"{where[n]}: tensor {n} has shape {list(a.shape)}, expected {list(per)}")
        flat[path] = fn(arrs)
    tolerated = set(_TIED_COPIES)
    if cfg.tie_word_embeddings:
        tolerated.add("lm_head.weight")
    extra = sorted(k for k in tensors if k not in used and k not in tolerated)
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where.get(extra[0], d)}: unexpected tensor {extra[0]}{more} for this config")
    missing = sorted(set(shapes) - set(flat))
    if missing:  # cannot happen unless the map and the model disagree
        raise CheckpointError(f"{d}: no HF tensor maps to {missing[0]}")
    return unflatten_params({path: np.ascontiguousarray(a) for path, a in flat.items()})


def load_hf(path: str | os.PathLike, config: SwitchConfig | None = None) -> tuple[SwitchConfig, dict]:
    """``(config, params)`` from a HF Switch directory (``config.json`` + weights); ``config`` overrides the
    file's. Params are jax arrays."""
    import jax
    import jax.numpy as jnp

    d = os.fspath(path)
    if not os.path.isdir(d):
        raise CheckpointError(f"{d}: not a directory (expected a HF model dir with config.json)")
    try:
        cfg = config or SwitchConfig.from_hf(d, name=os.path.basename(os.path.normpath(d)))
    except MoqeError as e:
        raise CheckpointError(str(e)) from None
    return cfg, jax.tree_util.tree_map(jnp.asarray, load_hf_params(d, cfg))
