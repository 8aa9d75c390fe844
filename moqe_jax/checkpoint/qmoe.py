"""QMoE's own checkpoint files (docs/QMOE.md §1.6): ``Sub1Linear`` buffers ``w_comp`` / ``row_off`` /
``ter_minmax`` per expert matrix, in torch ``expNN.pt`` state dicts, read into and written from
:class:`~moqe_jax.packed.sub1.Sub1Tensor` (the stream bytes are the same; only the layout differs).
torch is needed only by :func:`load_qmoe_experts`.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moqe_jax.errors import CheckpointError
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.packed.sub1 import Sub1Tensor
from moqe_jax.packed.sub1_dict import get_dictionary

__all__ = ["from_qmoe", "to_qmoe", "qmoe_layers_from_state_dict", "qmoe_t5x_path", "load_qmoe_experts"]

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


def qmoe_layers_from_state_dict(sd: Mapping[str, Any], k_of: Mapping[str, int] | None = None
                                ) -> dict[str, Sub1Tensor]:
    """Group a QMoE ``expNN.pt`` state dict into ``{"<block prefix>.wi|wo": Sub1Tensor [E, K, N]}``.

    Keys follow ``{encoder|decoder}.block.{i}.layer.{j}.mlp.experts.expert_{e}.{wi|wo}.{w_comp|row_off|
    ter_minmax}`` (docs/QMOE.md §1.6); ``k_of`` optionally gives K per group (else inferred).
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
        out[g] = from_qmoe([ex[i] for i in idx], (k_of or {}).get(g), name=g)
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
