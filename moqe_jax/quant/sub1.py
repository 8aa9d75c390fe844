"""`Sub1Tensor`: QMoE's sub-1-bit dictionary code for ternary experts (Frantar & Alistarh 2023, §4).

A ternary :class:`~moqe_jax.packed.qtensor.QuantizedTensor` ``[*batch, K, N]`` (channel-wise; codes
0 → 0, 1 → ``w_min`` = ``zeros``, 2 → ``w_max`` = ``scales``) already holds QMoE's symbols. QMoE's
"row" is our output channel ``n``: its weights run along K and are grouped in pairs
``r = t0 + 3·t1`` (k = 2i, 2i+1). Each row is encoded independently by greedy longest-match against
the fixed 2^16-entry dictionary (:mod:`moqe_jax.packed.sub1_dict`); the codewords of all rows
(row-major over ``(*batch, N)``) form one uint16 stream with int32 row offsets. Byte layout:
docs/FORMATS.md §2; QMoE's own per-expert layout (``w_comp`` / ``row_off`` / ``ter_minmax``,
docs/QMOE.md §1.6) is read and written by :func:`from_qmoe` / :func:`to_qmoe`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moqe_jax.errors import CheckpointError, QuantizationError
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.packed.sub1 import Sub1Tensor
from moqe_jax.packed.sub1_dict import TRIE_ROOT, get_dictionary

__all__ = ["encode", "encode_pairs", "pair_symbols", "from_qmoe",
           "to_qmoe", "qmoe_layers_from_state_dict", "qmoe_t5x_path", "load_qmoe_experts", "ternary_entropy_bits",
           "compress_model", "compress_params"]

_BF16 = np.dtype(ml_dtypes.bfloat16)
_TERNARY = QuantSpec(bits="ternary", granularity="channel")


# ---------------------------------------------------------------------------------------------
# Encoder (docs/QMOE.md §1.5): greedy longest match through the trie, all rows in lockstep.
# ---------------------------------------------------------------------------------------------
def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    disable = os.environ.get("MOQE_NO_PROGRESS") == "1" or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="row", disable=disable, leave=False)


def encode_pairs(pairs: np.ndarray, *, chunk_elems: int = 1 << 24, desc: str | None = None,
                 dictionary: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode pair symbols ``[R, P]`` (uint8, values < 9) -> ``(stream uint16 [T], row_off int32 [R+1])``.

    Per row: descend the trie while the node has a child for the next pair; otherwise emit the node's
    codeword and restart from the root with that pair; emit the last node at the row end (QMoE
    ``Sub1PreparePack``). Rows advance in lockstep (one vectorised trie gather per pair position).
    ``dictionary`` (default QMoE's fixed one) is only for experiments with fitted dictionaries.
    """
    pairs = np.asarray(pairs)
    if pairs.ndim != 2:
        raise QuantizationError(f"sub1 encode: expected pair symbols [rows, pairs], got shape {pairs.shape}")
    r_total, p = pairs.shape
    if p == 0:
        raise QuantizationError("sub1 encode: rows have no weights")
    if pairs.size and int(pairs.max()) > 8:
        raise QuantizationError("sub1 encode: pair symbols must be < 9 (ternary codes 0/1/2)")
    d = dictionary or get_dictionary()
    trie = d.trie.reshape(-1)
    root_child = d.trie[TRIE_ROOT].astype(np.int32)
    chunk = max(1, chunk_elems // p)
    streams: list[np.ndarray] = []
    counts = np.zeros(r_total, np.int64)
    bar = _progress(r_total, desc or "sub1 encode") if r_total > chunk else None
    for r0 in range(0, r_total, chunk):
        sym = np.ascontiguousarray(pairs[r0:r0 + chunk].T).astype(np.int32)  # [P, rows]
        rows = sym.shape[1]
        emit = np.empty((p + 1, rows), np.int32)  # emit[i] = codeword emitted before pair i (or -1)
        node = root_child[sym[0]]
        emit[0] = -1
        for i in range(1, p):
            s = sym[i]
            child = trie[node * 9 + s]
            fail = child < 0
            emit[i] = np.where(fail, node, -1)
            node = np.where(fail, root_child[s], child)
        emit[p] = node
        et = emit.T  # [rows, P+1], row-major codeword order
        mask = et >= 0
        counts[r0:r0 + rows] = mask.sum(axis=1)
        streams.append(et[mask].astype(np.uint16))
        if bar is not None:
            bar.update(rows)
    if bar is not None:
        bar.close()
    row_off = np.zeros(r_total + 1, np.int64)
    np.cumsum(counts, out=row_off[1:])
    if row_off[-1] >= 2**31:
        raise QuantizationError(f"sub1 encode: {row_off[-1]} codewords exceed int32 row offsets; split the tensor")
    stream = np.concatenate(streams) if streams else np.zeros(0, np.uint16)
    return stream, row_off.astype(np.int32)


def pair_symbols(qt: QuantizedTensor) -> np.ndarray:
    """Ternary QT ``[*batch, K, N]`` -> pair symbols uint8 ``[prod(batch)·N, ceil(K/2)]`` (rows = channels).

    Read straight from the packed bytes (2-bit codes, 4 per byte along K, LSB first: a nibble is one
    pair ``t0 + 3·t1``); an odd K ends with an implicit zero weight, as in QMoE.
    """
    packed = np.asarray(qt.packed)
    lut = np.array([(v & 3) + 3 * (v >> 2) for v in range(16)], np.uint8)
    *batch, rb, n = packed.shape
    lo, hi = lut[packed & 15], lut[packed >> 4]
    pairs = np.stack([lo, hi], axis=-2).reshape(*batch, 2 * rb, n)[..., :(qt.k + 1) // 2, :]
    return np.ascontiguousarray(np.swapaxes(pairs, -1, -2)).reshape(-1, (qt.k + 1) // 2)


def _check_ternary(qt: Any, name: str) -> None:
    if not isinstance(qt, QuantizedTensor) or not qt.spec.is_ternary:
        raise QuantizationError(f"sub1 encode {name}: expected a ternary QuantizedTensor, got {qt!r}")
    if qt.scales.shape[-2] != 1:
        raise QuantizationError(f"sub1 encode {name}: QMoE's code stores one (w_min, w_max) per output channel; "
                                f"group-wise ternary ({qt.spec.describe()}) is not supported")
    packed = np.asarray(qt.packed)
    if np.any(packed & (packed >> 1) & 0x55):  # some 2-bit field == 3
        raise QuantizationError(f"sub1 encode {name}: ternary codes must be 0/1/2 (found code 3)")


def encode(qt: QuantizedTensor, *, name: str = "tensor", scale_dtype: Any = np.float32) -> Sub1Tensor:
    """Ternary channel-wise :class:`QuantizedTensor` -> :class:`Sub1Tensor` (bit-exact, see ``decode``)."""
    _check_ternary(qt, name)
    stream, row_off = encode_pairs(pair_symbols(qt), desc=f"sub1 {name}")
    batch = tuple(qt.packed.shape[:-2])
    n = qt.packed.shape[-1]
    scales = np.asarray(qt.scales, np.float32).reshape(*batch, n).astype(scale_dtype)
    zeros = np.asarray(qt.zeros, np.float32).reshape(*batch, n).astype(scale_dtype)
    return Sub1Tensor.from_flat(stream, row_off, scales, zeros, qt.spec, qt.k, qt.dtype)


# ---------------------------------------------------------------------------------------------
# Entropy (docs/QMOE.md §1.7)
# ---------------------------------------------------------------------------------------------
def ternary_entropy_bits(x: QuantizedTensor | Sub1Tensor | float) -> float:
    """Ideal (order-0) entropy in bits/weight: of a symbol histogram, or of i.i.d. P(0)=x (x float)."""
    if isinstance(x, float):
        p = np.array([x, (1 - x) / 2, (1 - x) / 2])
    else:
        qt = x.decode() if isinstance(x, Sub1Tensor) else x
        counts = np.bincount(np.asarray(qt.codes()).reshape(-1), minlength=3)[:3].astype(np.float64)
        p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


# ---------------------------------------------------------------------------------------------
# QMoE checkpoint layout (docs/QMOE.md §1.6): per expert matrix w_comp / row_off / ter_minmax.
# ---------------------------------------------------------------------------------------------
def _np(x: Any) -> np.ndarray:
    """numpy view of a numpy/jax/torch array (torch bf16 via an int16 view)."""
    if hasattr(x, "detach"):  # torch tensor
        import torch

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
    base = 0
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
        offs.append(ro[:-1].astype(np.int64) + base)
        base += w.size
        mins.append(mm[0::2])
        maxs.append(mm[1::2])
    stream = np.concatenate(streams)
    if base >= 2**31:
        raise CheckpointError(f"{name}: {base} codewords exceed int32 offsets")
    row_off = np.concatenate(offs + [np.array([base])]).astype(np.int32)
    if k is None:
        length = get_dictionary().length
        k = 2 * int(length[stream[row_off[0]:row_off[1]]].astype(np.int64).sum())
    st = Sub1Tensor.from_flat(stream, row_off, np.stack(maxs), np.stack(mins), _TERNARY, k, dtype)
    st.validate(name)
    return st


def to_qmoe(st: Sub1Tensor) -> list[dict[str, np.ndarray]]:
    """Inverse of :func:`from_qmoe`: one dict of QMoE buffers per expert (scales rounded to bf16)."""
    stream, row_off = np.asarray(st.stream), np.asarray(st.row_off)
    n = st.n
    e = math.prod(st.batch_shape)
    mins = np.asarray(st.zeros).reshape(e, n).astype(_BF16)
    maxs = np.asarray(st.scales).reshape(e, n).astype(_BF16)
    out = []
    for i in range(e):
        ro = row_off[i * n:(i + 1) * n + 1]
        mm = np.empty(2 * n, _BF16)
        mm[0::2], mm[1::2] = mins[i], maxs[i]
        out.append({"w_comp": stream[ro[0]:ro[-1]].view(np.int16).copy(), "row_off": (ro - ro[0]).astype(np.int32),
                    "ter_minmax": mm, "weight": np.zeros(0, _BF16)})
    return out


def qmoe_layers_from_state_dict(sd: Mapping[str, Any], k_of: Mapping[str, int] | None = None
                                ) -> dict[str, Sub1Tensor]:
    """Group a QMoE ``expNN.pt`` state dict into ``{"<block prefix>.wi|wo": Sub1Tensor [E, K, N]}``.

    Keys follow ``{encoder|decoder}.block.{i}.layer.{j}.mlp.experts.expert_{e}.{wi|wo}.{w_comp|row_off|
    ter_minmax}`` (docs/QMOE.md §1.6); ``k_of`` optionally gives K per group (else inferred).
    """
    import re

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
        out[g] = from_qmoe([ex[i] for i in idx], (k_of or {}).get(g), name=g)
    return out


def qmoe_t5x_path(hf_prefix: str) -> str:
    """``encoder.block.1.layer.1.mlp.wi`` (QMoE/HF) -> ``encoder/layers_1/mlp/expert/wi/kernel`` (our tree)."""
    import re

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
# Whole-model compression (pipeline.compress_sub1)
# ---------------------------------------------------------------------------------------------
def _bf16_bits(x: Any) -> float:
    return 16.0 * math.prod(x.shape)


def compress_params(params: Any, *, verbose: bool = False) -> tuple[Any, dict]:
    """Replace every ternary channel-wise QuantizedTensor leaf by its :class:`Sub1Tensor`.

    Returns the new tree and a report: ``params`` (weights encoded), ``bits`` (their stored bits),
    ``bits_per_param``, ``ratio_vs_bf16``, ``entropy_bits`` (order-0 entropy of their symbols),
    ``skipped`` (ternary leaves that cannot be encoded, e.g. group-wise).
    """
    report = {"params": 0, "bits": 0.0, "skipped": [], "tensors": 0, "symbol_counts": np.zeros(3, np.int64)}

    def is_leaf(x: Any) -> bool:
        return isinstance(x, (QuantizedTensor, Sub1Tensor))

    def conv(path: Any, x: Any) -> Any:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if isinstance(x, Sub1Tensor):
            report["params"] += x.size
            report["bits"] += 8.0 * x.nbytes
            report["tensors"] += 1
            return x
        if not (isinstance(x, QuantizedTensor) and x.spec.is_ternary):
            return x
        if x.scales.shape[-2] != 1:
            report["skipped"].append(name)
            return x
        st = encode(x, name=name)
        report["params"] += st.size
        report["bits"] += 8.0 * st.nbytes
        report["tensors"] += 1
        pairs = pair_symbols(x)
        report["symbol_counts"] += np.bincount(np.concatenate([pairs.reshape(-1) % 3, pairs.reshape(-1) // 3]),
                                               minlength=3)[:3]
        if verbose:
            print(f"sub1 {name}: {st.shape} {st.bits_per_param:.3f} bits/param "
                  f"({16 / st.bits_per_param:.2f}x vs bf16)")
        return st

    new = jax.tree_util.tree_map_with_path(conv, params, is_leaf=is_leaf)
    n = max(1, report["params"])
    report["bits_per_param"] = report["bits"] / n
    report["ratio_vs_bf16"] = 16.0 * n / max(1.0, report["bits"])
    c = report.pop("symbol_counts").astype(np.float64)
    if c.sum():
        p = c[c > 0] / c.sum()
        report["entropy_bits"] = float(-(p * np.log2(p)).sum())
        report["zero_fraction"] = float(c[0] / c.sum())
    return new, report


def compress_model(model: Any, *, verbose: bool = True, **_: Any) -> Any:
    """QMoE sub-1-bit code for every ternary expert of ``model`` (an object with ``.params``, or a tree).

    Returns a new model (``model.replace(params=…)``, ``dataclasses.replace`` or a shallow copy) with
    the report stored in ``sub1_report`` when the object allows it.
    """
    if not hasattr(model, "params"):
        new, report = compress_params(model, verbose=verbose)
        return new
    new_params, report = compress_params(model.params, verbose=verbose)
    if report["tensors"] == 0:
        raise QuantizationError("compress_sub1: the model has no ternary channel-wise QuantizedTensor "
                                "(quantize the experts with bits='ternary' first)")
    if verbose:
        extra = f", entropy {report['entropy_bits']:.3f} bits" if "entropy_bits" in report else ""
        print(f"sub1: {report['tensors']} tensors, {report['params']:,} params, "
              f"{report['bits_per_param']:.3f} bits/param = {report['ratio_vs_bf16']:.2f}x vs bf16{extra}")
    if hasattr(model, "replace") and callable(model.replace):
        out = model.replace(params=new_params)
    elif dataclasses.is_dataclass(model):
        out = dataclasses.replace(model, params=new_params)
    else:
        out = copy.copy(model)
        out.params = new_params
    try:
        out.sub1_report = report
    except (AttributeError, dataclasses.FrozenInstanceError):
        pass
    return out
