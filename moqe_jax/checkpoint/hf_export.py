"""Hugging Face Switch export (docs/FORMATS.md §4): ``config.json`` + ``model.safetensors``.

The reverse of :mod:`moqe_jax.checkpoint.hf`, through the same name map (``hf_name_map``: T5X path ->
HF tensor names + the transform to the Flax layout); each transform is undone here, never re-listed.
Packed leaves (``QuantizedTensor``, ``Sub1Tensor``) are dequantized, so the result is a plain float model
that ``transformers.SwitchTransformersForConditionalGeneration.from_pretrained`` loads. Its logits equal
ours in ``routing_mode="hf"`` (HF routes per sequence with a fixed ``expert_capacity``, docs/T5X_SWITCH.md
§4.11); the T5X routing of the source model is not representable in HF's config.

Not every Switch config has an HF twin: HF has no gated MLP, and its sparse-layer rule (``i % step == 1``
with ``step = num_layers // num_sparse``) differs from Flaxformer's for steps > 2 and for all-dense stacks;
such configs are refused with one line naming the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from moqe_jax.checkpoint.hf import _id, _stack_t, _t, hf_name_map
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError
from moqe_jax.packed import is_packed
from moqe_jax.tree import flatten_params

__all__ = ["HF_DTYPES", "hf_sparse_layers", "check_hf_exportable", "hf_state_dict", "export_hf", "export_config"]

HF_DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: Key of ``config.json`` holding the full ``SwitchConfig`` (fields HF lacks: routing, capacity factors, group size).
CONFIG_KEY = "moqe_jax_config"


class _ModelLike(Protocol):
    @property
    def config(self) -> SwitchConfig: ...
    @property
    def params(self) -> dict: ...


def hf_sparse_layers(num_layers: int, num_sparse: int) -> tuple[int, ...]:
    """The sparse layers transformers builds from ``num_layers``/``num_sparse_*_layers`` (its config derives
    ``step = num_layers // num_sparse``, or ``num_layers`` when 0; a layer is sparse iff ``i % step == 1`` or
    ``step == 1``)."""
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    return tuple(i for i in range(num_layers) if step > 0 and (i % step == 1 or step == 1))


def check_hf_exportable(cfg: SwitchConfig) -> None:
    """Raise ``CheckpointError`` if transformers' Switch cannot express ``cfg``."""
    if cfg.gated:
        raise CheckpointError(f"config {cfg.name}: activation {cfg.activation} has no Hugging Face Switch "
                              "equivalent (SwitchTransformers has only the relu wi/wo MLP); export to T5X instead")
    for stack in ("encoder", "decoder"):
        ours = cfg.sparse_layers(stack)
        theirs = hf_sparse_layers(cfg.num_stack_layers(stack), len(ours))
        if ours != theirs:
            raise CheckpointError(f"config {cfg.name}: {stack} sparse layers {list(ours)} cannot be expressed in "
                                  f"a Hugging Face config (its rule gives {list(theirs)}); export to T5X instead")


def _float(leaf: Any) -> np.ndarray:
    if is_packed(leaf):
        import jax.numpy as jnp

        return np.asarray(leaf.dequantize(jnp.float32), np.float32)
    return np.asarray(leaf, np.float32)


def _undo(fn: Any, a: np.ndarray, n: int) -> list[np.ndarray]:
    """The HF tensors that ``fn`` (a forward transform of ``hf_name_map``) turns into ``a``."""
    if fn is _id:
        return [a]
    if fn is _t:
        return [a.T]
    if fn is _stack_t:
        if a.shape[0] != n:
            raise CheckpointError(f"stacked expert weight has {a.shape[0]} experts, the config says {n}")
        return [x.T for x in a]
    raise CheckpointError(f"no inverse for HF transform {getattr(fn, '__name__', fn)!r}")  # map and writer disagree


def hf_state_dict(cfg: SwitchConfig, params: dict, dtype: str = "float32",
                  skip: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """``{HF tensor name: array}`` for ``params`` (packed leaves dequantized), in ``dtype``; parameter paths in
    ``skip`` are left out (the QMoE export writes its experts itself)."""
    if dtype not in HF_DTYPES:
        raise CheckpointError(f"export dtype {dtype!r}: choose one of {', '.join(HF_DTYPES)}")
    check_hf_exportable(cfg)
    if dtype == "bfloat16":
        import ml_dtypes

        npdt: Any = ml_dtypes.bfloat16
    else:
        npdt = np.dtype(dtype)
    flat = flatten_params(params)
    nmap = hf_name_map(cfg)
    extra = sorted(set(flat) - set(nmap))
    if extra:
        raise CheckpointError(f"parameter {extra[0]} has no Hugging Face name (config {cfg.name})")
    out: dict[str, np.ndarray] = {}
    for path, (names, fn) in nmap.items():
        if path in skip:
            continue
        if path not in flat:
            raise CheckpointError(f"parameter {path} of config {cfg.name} is missing from the model")
        for name, arr in zip(names, _undo(fn, _float(flat[path]), len(names)), strict=True):
            out[name] = np.ascontiguousarray(arr.astype(npdt))
    # transformers ties these to shared.weight when tie_word_embeddings; when untied (XXL/C) it keeps three
    # separate embeddings, which Switch shares: write the copies so every one is loaded, none initialised.
    if not cfg.tie_word_embeddings:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
        out["decoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def export_config(directory: str | os.PathLike) -> SwitchConfig | None:
    """The full ``SwitchConfig`` an export of ours wrote into ``config.json`` — only while the file's HF fields
    still agree with it (an edited or foreign ``config.json`` is read by ``SwitchConfig.from_hf`` instead)."""
    p = os.path.join(os.fspath(directory), CONFIG_FILE)
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
        cfg = SwitchConfig.from_dict(d[CONFIG_KEY])
    except Exception:  # noqa: BLE001 - no (usable) embedded config: the caller falls back to from_hf
        return None
    hf = cfg.to_hf()
    if any(d.get(k) != v for k, v in hf.items() if k not in ("encoder_sparse_step", "decoder_sparse_step")):
        return None
    return cfg


def _commit(tmp: str, directory: str) -> None:
    old = None
    if os.path.exists(directory):
        old = f"{directory}.old-{uuid.uuid4().hex[:8]}"
        os.rename(directory, old)
    os.rename(tmp, directory)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_export(directory: str | os.PathLike, kind: str, config: dict, write: Callable[[str], None]) -> str:
    """Write an export directory atomically: ``write(tmp)`` fills a temporary sibling, ``config`` goes to its
    ``config.json``, then it is renamed into place; return the directory. Replaces an earlier export (a
    directory with ``config.json``), never a file or another non-empty directory (``kind`` names the export)."""
    d = os.path.abspath(os.fspath(directory))
    if os.path.exists(d) and not os.path.isdir(d):
        raise CheckpointError(f"{d} exists and is not a directory")
    if os.path.isdir(d) and os.listdir(d) and not os.path.exists(os.path.join(d, CONFIG_FILE)):
        raise CheckpointError(f"{d} is a non-empty directory that is not a {kind} export; refusing to "
                              "replace it (choose a new directory)")
    parent = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(d)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        write(tmp)
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        _commit(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return d


def export_hf(model: _ModelLike, directory: str | os.PathLike, dtype: str = "float32") -> str:
    """Write ``model`` as a Hugging Face Switch directory (``config.json`` + ``model.safetensors``), atomically;
    return the directory. Replaces an earlier export, never another non-empty directory."""
    from safetensors.numpy import save_file

    cfg = model.config
    tensors = hf_state_dict(cfg, model.params, dtype)

    def write(tmp: str) -> None:
        # safetensors refuses tensors that share memory: the embedding copies are written as copies
        seen: set[int] = set()
        for k, v in tensors.items():
            if id(v) in seen:
                tensors[k] = v.copy()
            seen.add(id(tensors[k]))
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})

    hf_cfg = {**cfg.to_hf(), "dtype": dtype, "_name_or_path": cfg.name, CONFIG_KEY: cfg.to_dict()}
    return write_export(directory, "Hugging Face", hf_cfg, write)
