"""QMoE's own checkpoint files (docs/QMOE.md §1.6): ``Sub1Linear`` buffers ``w_comp`` / ``row_off`` /
``ter_minmax`` per expert matrix, in torch ``expNN.pt`` state dicts, read into and written from
:class:`~moqe_jax.packed.sub1.Sub1Tensor` (the stream bytes are the same; only the layout differs).

Whole models (docs/QMOE.md §1.8): :func:`export_qmoe` writes a sub-1-bit model as QMoE's checkpoint directory
(``config.json``, ``noexp``, ``expNN`` per sparse layer, ``sizes``) in safetensors (default, read back without
unpickling) or torch ``.pt`` (what QMoE's ``load_sub1`` reads); :func:`load_qmoe` reads either back
(``.pt`` only through ``torch.load(weights_only=True)``). torch is needed only for ``.pt`` files.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moqe_jax.errors import CheckpointError
from moqe_jax.packed import is_packed
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.packed.sub1 import Sub1Tensor
from moqe_jax.packed.sub1_dict import get_dictionary

__all__ = ["from_qmoe", "to_qmoe", "qmoe_layers_from_state_dict", "qmoe_t5x_path", "load_qmoe_experts",
           "QMOE_FORMATS", "qmoe_state_dicts", "export_qmoe", "load_qmoe", "is_qmoe_dir"]

_BF16 = np.dtype(ml_dtypes.bfloat16)
_TERNARY = QuantSpec(bits="ternary", granularity="channel")


def _np(x: Any) -> np.ndarray:
    """numpy view of a numpy/jax/torch array (torch bf16 via an int16 view)."""
    torch = sys.modules.get("torch")  # a torch tensor implies torch is imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(_BF16)
        return x.numpy()
    return np.asarray(x)


def from_qmoe(experts: Sequence[Mapping[str, Any]], k: int | None = None, *, name: str = "qmoe",
              dtype: Any = jnp.bfloat16) -> Sub1Tensor:
    """QMoE ``Sub1Linear`` buffers of E experts -> one :class:`Sub1Tensor` ``[E, K, N]``.

    Each expert: ``w_comp`` int16 ``[T_e]``, ``row_off`` int32 ``[rows+1]`` (row = output channel = our
    column n), ``ter_minmax`` bf16 ``[2·rows]`` interleaved ``(min, max)``. ``k`` (in-features) is
    inferred from the first row's pair count when omitted. Scales/zeros are kept in bf16.
    """
    if not experts:
        raise CheckpointError(f"{name}: no experts given")
    streams, offs, mins, maxs = [], [], [], []
    n = None
    for e, ex in enumerate(experts):
        try:
            w, ro, mm = _np(ex["w_comp"]), _np(ex["row_off"]), _np(ex["ter_minmax"])
        except KeyError as err:
            raise CheckpointError(f"{name}: expert {e} lacks buffer {err}") from None
        if w.dtype not in (np.int16, np.uint16) or w.ndim != 1:
            raise CheckpointError(f"{name}: expert {e} w_comp must be 1-D int16, got {w.dtype}{list(w.shape)}")
        if ro.dtype != np.int32 or ro.ndim != 1 or ro.size < 2:
            raise CheckpointError(f"{name}: expert {e} row_off must be 1-D int32, got {ro.dtype}{list(ro.shape)}")
        rows = ro.size - 1
        if n is None:
            n = rows
        if rows != n:
            raise CheckpointError(f"{name}: expert {e} has {rows} rows, expert 0 has {n}")
        if mm.dtype not in (_BF16, np.int16, np.uint16) or mm.shape != (2 * rows,):
            raise CheckpointError(f"{name}: expert {e} ter_minmax must be bf16 [{2 * rows}], got {mm.dtype}"
                                  f"{list(mm.shape)}")
        mm = mm.view(_BF16)
        if ro[0] != 0 or ro[-1] != w.size or np.any(np.diff(ro) < 1):
            raise CheckpointError(f"{name}: expert {e} row_off is not a valid offset table for {w.size} codewords")
        streams.append(w.view(np.uint16))
        offs.append(ro)
        mins.append(mm[0::2])
        maxs.append(mm[1::2])
    if sum(w.size for w in streams) >= 2**31:
        raise CheckpointError(f"{name}: {sum(w.size for w in streams)} codewords exceed int32 offsets")
    codewords = np.zeros((len(streams), max(w.size for w in streams)), np.uint16)
    for e, w in enumerate(streams):
        codewords[e, :w.size] = w
    if k is None:
        k = 2 * int(get_dictionary().length[streams[0][offs[0][0]:offs[0][1]]].astype(np.int64).sum())
    st = Sub1Tensor(codewords, np.stack(offs), np.stack(maxs), np.stack(mins), _TERNARY, k, dtype)
    st.validate(name)
    return st


def to_qmoe(st: Sub1Tensor) -> list[dict[str, np.ndarray]]:
    """Inverse of :func:`from_qmoe`: one dict of QMoE buffers per expert (scales rounded to bf16)."""
    n = st.n
    e = math.prod(st.batch_shape)
    codewords = np.asarray(st.codewords).reshape(e, -1)
    offsets = np.asarray(st.offsets).reshape(e, n + 1)
    mins = np.asarray(st.zeros).reshape(e, n).astype(_BF16)
    maxs = np.asarray(st.scales).reshape(e, n).astype(_BF16)
    out = []
    for i in range(e):
        mm = np.empty(2 * n, _BF16)
        mm[0::2], mm[1::2] = mins[i], maxs[i]
        out.append({"w_comp": codewords[i, :offsets[i, -1]].view(np.int16).copy(),
                    "row_off": offsets[i].astype(np.int32), "ter_minmax": mm, "weight": np.zeros(0, _BF16)})
    return out


def qmoe_layers_from_state_dict(sd: Mapping[str, Any], k_of: Mapping[str, int] | None = None,
                                dtype: Any = jnp.bfloat16) -> dict[str, Sub1Tensor]:
    """Group a QMoE ``expNN.pt`` state dict into ``{"<block prefix>.wi|wo": Sub1Tensor [E, K, N]}``.

    Keys follow ``{encoder|decoder}.block.{i}.layer.{j}.mlp.experts.expert_{e}.{wi|wo}.{w_comp|row_off|
    ter_minmax}`` (docs/QMOE.md §1.6); ``k_of`` optionally gives K per group (else inferred); ``dtype``: the
    tensors' float dtype (QMoE's models run in bf16).
    """
    pat = re.compile(r"^(.*)\.experts\.expert_(\d+)\.(wi|wo)\.(w_comp|row_off|ter_minmax)$")
    groups: dict[str, dict[int, dict[str, Any]]] = {}
    for key, val in sd.items():
        m = pat.match(key)
        if m:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}", {}).setdefault(int(m.group(2)), {})[m.group(4)] = val
    out = {}
    for g, ex in sorted(groups.items()):
        idx = sorted(ex)
        if idx != list(range(len(idx))):
            raise CheckpointError(f"QMoE state dict {g}: experts {idx[:3]}… are not 0..{len(idx) - 1}")
        out[g] = from_qmoe([ex[i] for i in idx], (k_of or {}).get(g), name=g, dtype=dtype)
    return out


def qmoe_t5x_path(hf_prefix: str) -> str:
    """``encoder.block.1.layer.1.mlp.wi`` (QMoE/HF) -> ``encoder/layers_1/mlp/expert/wi/kernel`` (our tree)."""
    m = re.match(r"^(?:.*\.)?(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.mlp\.(wi|wo)$", hf_prefix)
    if not m:
        raise CheckpointError(f"QMoE expert group {hf_prefix!r} is not "
                              "'<encoder|decoder>.block.<i>.layer.<j>.mlp.wi|wo'")
    return f"{m.group(1)}/layers_{m.group(2)}/mlp/expert/{m.group(3)}/kernel"


def load_qmoe_experts(files: Sequence[Any]) -> dict[str, Sub1Tensor]:
    """Read QMoE ``expNN.pt`` files (torch state dicts, docs/QMOE.md §1.6) -> ``{t5x path: Sub1Tensor}``.

    The result can be merged into a model's ``params`` (whose non-expert weights come from ``noexp.pt``
    through the HF importer) in place of the expert kernels.
    """
    import torch

    out: dict[str, Sub1Tensor] = {}
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise CheckpointError(f"{f}: cannot read QMoE expert file ({type(e).__name__}: {e})".splitlines()[0]) \
                from None
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{f}: expected a state dict, got {type(sd).__name__}")
        for prefix, st in qmoe_layers_from_state_dict(sd).items():
            out[qmoe_t5x_path(prefix)] = st
    return out


# ---------------------------------------------------------------------------------------------
# Whole models: QMoE's checkpoint directory (docs/QMOE.md §1.6, §1.8).
# ---------------------------------------------------------------------------------------------
#: File formats of :func:`export_qmoe`: safetensors (read back without unpickling) or torch ``.pt`` (QMoE's own).
QMOE_FORMATS = ("safetensors", "pt")
NOEXP = "noexp"
SIZES = "sizes"
#: Key of ``config.json`` with what QMoE's files do not record: the experts' float dtype and the file format.
QMOE_KEY = "moqe_jax_qmoe"
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
_EXP_FILE = re.compile(r"exp\d+\.(safetensors|pt)")


def _sparse_mlps(cfg: Any) -> list[tuple[str, str]]:
    """``(our expert subtree, QMoE/HF mlp prefix)`` per sparse layer, in QMoE's file order (encoder, decoder)."""
    return [(f"{stack}/layers_{i}/mlp/expert", f"{stack}.block.{i}.layer.{1 if stack == 'encoder' else 2}.mlp")
            for stack in ("encoder", "decoder") for i in cfg.sparse_layers(stack)]


def bf16_rounded_scales(params: Any) -> int:
    """How many sub-1-bit expert scales/zeros of ``params`` change when rounded to bf16 (``ter_minmax``'s dtype):
    0 when the export is exact (e.g. bf16 experts, or a QMoE import)."""
    n = 0
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, Sub1Tensor)):
        if isinstance(leaf, Sub1Tensor):
            for a in (leaf.scales, leaf.zeros):
                x = np.asarray(a, np.float32)
                n += int(np.count_nonzero(x.astype(_BF16).astype(np.float32) != x))
    return n


def qmoe_state_dicts(cfg: Any, params: Mapping[str, Any], dtype: str = "float32"
                     ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], dict[str, int]]:
    """``(noexp, [expNN], sizes)``: QMoE's state dicts of a model whose experts are :class:`Sub1Tensor`.

    ``noexp``: every other weight in HF's names (``hf_state_dict``) in ``dtype``; ``expNN``: one dict per
    sparse layer with ``<mlp>.experts.expert_<j>.<wi|wo>.<w_comp|row_off|ter_minmax|weight>``; ``sizes``:
    ``<mlp>.experts.expert_<j>.<wi|wo>`` -> codeword count. ``ter_minmax`` is bf16 by the format, so the
    scales are rounded to bf16 (exact when they already are, e.g. after a QMoE import).
    """
    from moqe_jax.checkpoint.hf_export import check_hf_exportable, hf_state_dict
    from moqe_jax.tree import flatten_params

    check_hf_exportable(cfg)
    flat = flatten_params(params)
    layers = _sparse_mlps(cfg)
    skip = frozenset(f"{base}/{w}/kernel" for base, _ in layers for w in ("wi", "wo"))
    for path in (f"{base}/{w}/kernel" for base, _ in layers for w in ("wi", "wo")):
        leaf = flat.get(path)
        if not isinstance(leaf, Sub1Tensor):
            what = "missing" if leaf is None else f"a {type(leaf).__name__}" if is_packed(leaf) else "float"
            raise CheckpointError(f"expert weight {path} is {what}, not sub-1-bit: QMoE's format holds compressed "
                                  "ternary experts only; run `moqe compress MODEL --bits ternary --format sub1 "
                                  "--out DIR` first (or export dequantized weights with --to-hf)")
    noexp = hf_state_dict(cfg, dict(params), dtype, skip=skip)
    for k in _TIED_COPIES[:2]:  # HF's encoder/decoder embed_tokens are the shared module: shared.weight loads them
        noexp.pop(k, None)
    exps: list[dict[str, np.ndarray]] = []
    sizes: dict[str, int] = {}
    for base, prefix in layers:
        sd: dict[str, np.ndarray] = {}
        for w in ("wi", "wo"):
            for j, bufs in enumerate(to_qmoe(flat[f"{base}/{w}/kernel"])):
                name = f"{prefix}.experts.expert_{j}.{w}"
                sd.update({f"{name}.{key}": v for key, v in bufs.items()})
                sizes[name] = int(bufs["w_comp"].size)
        exps.append(sd)
    return noexp, exps, sizes


def _torch_tensors(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16) if v.dtype == _BF16
            else torch.from_numpy(np.array(v)) for k, v in sd.items()}


def _write(d: str, stem: str, sd: Mapping[str, Any], fmt: str) -> None:
    if fmt == "pt":
        import torch

        torch.save(_torch_tensors(sd) if stem != SIZES else dict(sd), os.path.join(d, f"{stem}.pt"))
    elif stem == SIZES:
        with open(os.path.join(d, f"{SIZES}.json"), "w", encoding="utf-8") as f:
            json.dump(dict(sd), f, indent=1)
    else:
        from moqe_jax.checkpoint.store import write_safetensors

        write_safetensors(os.path.join(d, f"{stem}.safetensors"), dict(sd), metadata={"format": "pt"})


def export_qmoe(model: Any, directory: str | os.PathLike, dtype: str = "float32", format: str = "safetensors") -> str:
    """Write a sub-1-bit ``model`` as QMoE's checkpoint directory, atomically; return the directory.

    ``config.json`` (HF fields, ``torch_dtype`` bfloat16 as QMoE writes it, our full config and the experts'
    float dtype), ``noexp`` (non-expert weights, HF names, ``dtype``), ``expNN`` (one file per sparse layer,
    encoder then decoder) and ``sizes`` — as ``.safetensors`` + ``sizes.json`` (``format="safetensors"``) or as
    torch ``.pt`` files (``format="pt"``, needs torch; the only layout QMoE's ``load_sub1`` reads).
    Replaces an earlier export, never another non-empty directory.
    """
    from moqe_jax.checkpoint.hf_export import CONFIG_KEY, write_export

    if format not in QMOE_FORMATS:
        raise CheckpointError(f"QMoE export format {format!r}: choose one of {', '.join(QMOE_FORMATS)}")
    if format == "pt":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise CheckpointError("QMoE export as .pt needs PyTorch (pip install torch); the default safetensors "
                                  "export needs none") from None
    cfg = model.config
    noexp, exps, sizes = qmoe_state_dicts(cfg, model.params, dtype)
    expert = next(x for x in jax.tree_util.tree_leaves(model.params, is_leaf=lambda x: isinstance(x, Sub1Tensor))
                  if isinstance(x, Sub1Tensor))
    conf = {**cfg.to_hf(), "torch_dtype": "bfloat16", "_name_or_path": cfg.name, CONFIG_KEY: cfg.to_dict(),
            QMOE_KEY: {"expert_dtype": np.dtype(expert.dtype).name, "format": format, "noexp_dtype": dtype}}

    def write(tmp: str) -> None:
        _write(tmp, NOEXP, noexp, format)
        for i, sd in enumerate(exps):
            _write(tmp, f"exp{i:02d}", sd, format)
        _write(tmp, SIZES, sizes, format)

    return write_export(directory, "QMoE", conf, write)


def is_qmoe_dir(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a QMoE checkpoint (``noexp.safetensors`` or ``noexp.pt``)."""
    return any(os.path.isfile(os.path.join(os.fspath(directory), f"{NOEXP}.{ext}")) for ext in ("safetensors", "pt"))


def _read(path: str) -> dict[str, Any]:
    if path.endswith(".safetensors"):
        from moqe_jax.checkpoint.store import read_safetensors

        return read_safetensors(path)[0]
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading QMoE .pt files needs PyTorch (pip install torch); re-export "
                              "with the default safetensors format to read it without") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{path}: cannot read QMoE file ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return dict(sd)


def load_qmoe(directory: str | os.PathLike, config: Any = None) -> tuple[Any, dict]:
    """``(config, params)`` of a QMoE checkpoint directory (ours from :func:`export_qmoe`, or QMoE's own ``.pt``
    files): experts as :class:`Sub1Tensor` (float dtype from ``config.json``'s ``moqe_jax_qmoe``, else bf16 as
    QMoE runs), the other weights float32 from ``noexp`` through the HF name map. ``config`` overrides the
    file's. ``.safetensors`` files are preferred when both kinds are present."""
    from moqe_jax.checkpoint.hf import hf_name_map
    from moqe_jax.checkpoint.hf_export import CONFIG_FILE, export_config
    from moqe_jax.checkpoint.store import check_params
    from moqe_jax.config import SwitchConfig
    from moqe_jax.errors import MoqeError
    from moqe_jax.tree import unflatten_params

    d = os.fspath(directory)
    if not os.path.isdir(d) or not is_qmoe_dir(d):
        raise CheckpointError(f"{d}: not a QMoE checkpoint directory (expected config.json, noexp.safetensors or "
                              "noexp.pt and exp00..; write one with `moqe convert --to-qmoe`)")
    try:
        cfg = config or export_config(d) or SwitchConfig.from_hf(d, name=os.path.basename(os.path.normpath(d)))
        with open(os.path.join(d, CONFIG_FILE), encoding="utf-8") as f:
            extra = json.load(f).get(QMOE_KEY) or {}
        expert_dtype = jnp.dtype(extra.get("expert_dtype", "bfloat16"))
    except MoqeError as e:
        raise CheckpointError(str(e)) from None
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{os.path.join(d, CONFIG_FILE)}: bad config ({e})".splitlines()[0]) from None
    ext = "safetensors" if os.path.isfile(os.path.join(d, f"{NOEXP}.safetensors")) else "pt"
    noexp_path = os.path.join(d, f"{NOEXP}.{ext}")
    noexp = _read(noexp_path)
    layers = _sparse_mlps(cfg)
    k_of = {f"{prefix}.{w}": cfg.d_model if w == "wi" else cfg.d_ff for _, prefix in layers for w in ("wi", "wo")}
    flat: dict[str, Any] = {}
    for fn in sorted(f for f in os.listdir(d) if _EXP_FILE.fullmatch(f) and f.endswith(f".{ext}")):
        for prefix, st in qmoe_layers_from_state_dict(_read(os.path.join(d, fn)), k_of, expert_dtype).items():
            path = qmoe_t5x_path(prefix)
            if path in flat:
                raise CheckpointError(f"{os.path.join(d, fn)}: experts of {prefix} appear in two files")
            flat[path] = st
    lost = [f"{base}/{w}/kernel" for base, _ in layers for w in ("wi", "wo") if f"{base}/{w}/kernel" not in flat]
    if lost:
        raise CheckpointError(f"{d}: no exp*.{ext} file holds the experts of {lost[0]} (config {cfg.name}); "
                              "the checkpoint is incomplete or the config does not match it")
    used: set[str] = set()
    for path, (names, transform) in hf_name_map(cfg).items():
        if path in flat:
            continue
        arrs = []
        for n in names:
            if n not in noexp:
                raise CheckpointError(f"{noexp_path}: missing tensor {n} (needed for {path})")
            a = _np(noexp[n])
            if not (np.issubdtype(a.dtype, np.floating) or a.dtype == _BF16):
                raise CheckpointError(f"{noexp_path}: tensor {n} has non-float dtype {a.dtype}")
            arrs.append(np.asarray(a, np.float32))
            used.add(n)
        flat[path] = np.ascontiguousarray(transform(arrs))
    left = sorted(k for k in noexp if k not in used and k not in _TIED_COPIES and ".experts." not in k)
    if left:
        raise CheckpointError(f"{noexp_path}: unexpected tensor {left[0]} for config {cfg.name}")
    params = jax.tree_util.tree_map(jnp.asarray, unflatten_params(flat))
    check_params(cfg, params, d)
    return cfg, params
