"""GPTQ of one FFN from its calibration tokens (QMoE §3, docs/QMOE.md §3.1–3.4): every kernel of a sparse
layer's experts (or of a dense MLP, as one "expert"), one expert group at a time.

``wi`` (and ``wi_1``) are solved from the expert inputs' Hessians; ``wo`` from the hidden activations of
the float ``wi`` (QMoE default ``order=[['wi','wo']]``) or of the quantized ``wi``
(``true_sequential=True``); experts without tokens get ``H = I`` (= RTN).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from moqe_jax.errors import QuantizationError
from moqe_jax.packed import is_packed
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.calibration_report import LayerReport
from moqe_jax.quant.gptq import DEAD_INPUTS, gptq_quantize, layer_error, rtn_codes
from moqe_jax.quant.hessians import cap_and_sort, expert_hessians, gram, hidden_activations, pad_pow2
from moqe_jax.quant.layer_runner import ffn_kernels

__all__ = ["GPTQOptions", "compress_ffn"]


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    """Solver settings of a calibration run (QMoE defaults).

    ``dead_inputs`` defaults to ``"keep"`` (QMoE ``batch_gptq``: inputs no calibration token activates are
    quantized like the others) — this is the QMoE compression path; ``"zero"`` is gptq ``fasterquant``'s
    dead-input step, the default of the single-matrix solvers in :mod:`moqe_jax.quant.gptq`
    (docs/QMOE.md §3.9)."""

    max_tokens_factor: float = 4.0   # per-expert token cap, × the mean load
    percdamp: float = 0.1            # relative Hessian damping
    actorder: bool = False
    group_experts: int = 16          # experts per batched solve (0 = all)
    blocksize: int = 128
    true_sequential: bool = False    # wo's Hessian from the quantized wi's output
    dead_inputs: str = "keep"        # inputs no token activates: "keep" (QMoE batch_gptq) or "zero" (gptq)
    static_groups: bool = True       # group-wise grids: static (True) or recomputed in the column loop (gptq)

    def __post_init__(self) -> None:
        def pos_float(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise QuantizationError(f"GPTQ option {name} (--{name.replace('_', '-')}) must be a finite "
                                        f"number > 0, got {v!r}")

        pos_float("max_tokens_factor")
        pos_float("percdamp")
        if not isinstance(self.group_experts, int) or isinstance(self.group_experts, bool) or self.group_experts < 0:
            raise QuantizationError(f"GPTQ option group_experts (--group-experts) must be an integer >= 0 "
                                    f"(0 = all), got {self.group_experts!r}")
        if not isinstance(self.blocksize, int) or isinstance(self.blocksize, bool) or self.blocksize < 1:
            raise QuantizationError(f"GPTQ option blocksize must be an integer >= 1, got {self.blocksize!r}")
        if self.dead_inputs not in DEAD_INPUTS:
            raise QuantizationError(f"GPTQ option dead_inputs (--dead-inputs) must be 'zero' or 'keep', "
                                    f"got {self.dead_inputs!r}")


def compress_ffn(mlp: dict, sparse: bool, x_tok: np.ndarray, e_tok: np.ndarray, spec: QuantSpec,
                 opts: GPTQOptions, name: str, mesh: Any) -> tuple[dict[str, QuantizedTensor], LayerReport]:
    """GPTQ every kernel of one FFN from its tokens ``x_tok [T, D]`` routed to experts ``e_tok [T]``.

    Returns ``{kernel name: QuantizedTensor}`` (``[E, K, N]`` for experts, ``[K, N]`` for a dense MLP)
    and the layer's report."""
    t0 = time.time()
    sub = mlp["expert"] if sparse else mlp
    names = ffn_kernels(mlp, sparse)
    first = sub[names[0]]["kernel"]
    if is_packed(first):
        raise QuantizationError(f"{name}: already quantized; calibrate the float model")
    e = first.shape[0] if sparse else 1
    rep = LayerReport(name=name, kind="experts" if sparse else "dense", experts=e)
    keep, counts, cap = cap_and_sort(e_tok, e, opts.max_tokens_factor)
    rep.tokens = int(len(e_tok))
    full_counts = np.bincount(e_tok, minlength=e) if len(e_tok) else np.zeros(e, int)
    rep.capped = int(np.sum(full_counts > cap)) if len(e_tok) else 0
    rep.zero_token = int(np.sum(counts == 0))
    x_sorted = x_tok[keep]
    wts = {n: np.asarray(sub[n]["kernel"], np.float32) for n in names}
    dtypes = {n: jnp.dtype(sub[n]["kernel"].dtype) for n in names}
    if not sparse:
        wts = {n: w[None] for n, w in wts.items()}
    for n, w in wts.items():
        if not np.isfinite(w).all():
            raise QuantizationError(f"{name}/{n}/kernel: NaN/inf weights; cannot quantize")
    group = max(1, int(opts.group_experts or e))
    solve = dict(percdamp=opts.percdamp, actorder=opts.actorder, blocksize=opts.blocksize, group=None, mesh=mesh,
                 dead_inputs=opts.dead_inputs, static_groups=opts.static_groups)
    parts: dict[str, list[QuantizedTensor]] = {n: [] for n in names}
    errs: dict[str, list[np.ndarray]] = {"gptq": [], "rtn": []}
    fallback = np.zeros(e, bool)
    offs = np.concatenate([[0], np.cumsum(counts)])
    for s in range(0, e, group):
        idx = list(range(s, min(e, s + group)))
        h_in = expert_hessians(x_sorted, counts, idx)
        wi_names = [n for n in names if n != "wo"]
        for n in wi_names:
            qt, st = gptq_quantize(wts[n][idx], h_in, spec, name=f"{name}/{n}", dtype=dtypes[n], **solve)
            parts[n].append(qt)
            fallback[idx] |= st.fallback | st.nan_hessian
            _acc_err(errs, wts[n][idx], qt, h_in, counts[idx], spec)
        if "wo" in names:  # Hessian of wo from the hidden activations of each expert's own tokens
            f = wts["wo"].shape[1]
            h_out = np.empty((len(idx), f, f), np.float32)
            for j, ex in enumerate(idx):
                seg = x_sorted[offs[ex]:offs[ex + 1]]
                if not len(seg):
                    h_out[j] = np.eye(f, dtype=np.float32)
                    continue
                src = parts if opts.true_sequential else None
                wi = src[wi_names[0]][-1][j] if src else wts[wi_names[0]][ex]
                wi1 = None
                if len(wi_names) > 1:
                    wi1 = src[wi_names[1]][-1][j] if src else wts[wi_names[1]][ex]
                h_out[j] = np.asarray(gram(hidden_activations(pad_pow2(seg), wi, wi1)))
            qt, st = gptq_quantize(wts["wo"][idx], h_out, spec, name=f"{name}/wo", dtype=dtypes["wo"], **solve)
            parts["wo"].append(qt)
            fallback[idx] |= st.fallback | st.nan_hessian
            _acc_err(errs, wts["wo"][idx], qt, h_out, counts[idx], spec)
    out = {}
    for n in names:
        qts = parts[n]
        qt = qts[0] if len(qts) == 1 else _concat(qts)
        out[n] = qt[0] if not sparse else qt
    rep.fallbacks = int(np.sum(fallback & (counts > 0)))
    rep.solved = int(np.sum(~fallback & (counts > 0)))
    if errs["gptq"]:
        rep.rel_err_gptq = float(np.mean(np.concatenate(errs["gptq"])))
        rep.rel_err_rtn = float(np.mean(np.concatenate(errs["rtn"])))
    if rep.fallbacks:
        rep.notes.append(f"{rep.fallbacks} expert(s) with a non-invertible or non-finite Hessian fell back to RTN")
    if rep.zero_token:
        rep.notes.append(f"{rep.zero_token} expert(s) received no calibration token: RTN")
    rep.seconds = time.time() - t0
    return out, rep


def _acc_err(errs: dict, w: np.ndarray, qt: QuantizedTensor, h: np.ndarray, counts: np.ndarray,
             spec: QuantSpec) -> None:
    live = counts > 0
    if not live.any():
        return
    errs["gptq"].append(layer_error(w[live], np.asarray(qt.dequantize())[live], h[live]))
    errs["rtn"].append(layer_error(w[live], np.asarray(rtn_codes(w[live], spec).dequantize()), h[live]))


def _concat(qts: list[QuantizedTensor]) -> QuantizedTensor:
    z = None if qts[0].zeros is None else jnp.concatenate([q.zeros for q in qts])
    return QuantizedTensor(jnp.concatenate([q.packed for q in qts]), jnp.concatenate([q.scales for q in qts]), z,
                           qts[0].spec, qts[0].k, qts[0].dtype)
