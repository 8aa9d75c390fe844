"""Routing-aware, layer-by-layer GPTQ calibration of a Switch model (QMoE §3, docs/QMOE.md §3.1–3.3).

Encoder layers first, then decoder layers, in model order. For each layer:

1. run every calibration batch through the layer with the (already compressed) earlier layers'
   outputs as input; a sparse layer exposes its post-norm MoE input, chosen expert and kept mask
   (``moqe_jax.model.layerwise``); a dense FFN's input is captured with ``flax.linen.intercept_methods``;
2. keep the tokens that count: valid (not padding), kept by the router's capacity rule, and not
   special (encoder: id ≥ ``special_token_min_id``; decoder: the position *before* a sentinel and the
   last position, QMoE §3.3 "special-token premasking");
3. sort tokens by expert, cap each expert at ``max_tokens_factor``× the mean load (first tokens win),
   and build per-expert Hessians ``H = 2·XᵀX`` one expert group at a time (``[G, D, D]``, never an
   ``[E, T, D]`` blow-up): ``wi`` from the expert inputs, ``wo`` from the hidden activations of the
   float ``wi`` (QMoE default ``order=[['wi','wo']]``) or of the quantized ``wi``
   (``true_sequential=True``); experts without tokens get ``H = I`` (= RTN);
4. solve the group with the batched, jitted GPTQ of :mod:`moqe_jax.quant.gptq` and write the
   ``QuantizedTensor`` into the params;
5. re-run the layer with its compressed params to produce the next layer's input, checkpoint the
   progress (``checkpoint_dir``), go on.

Only the current layer's activations are held (one ``[B, L, D]`` buffer per calibration batch).
Components other than experts and dense FFNs (attention, embeddings, ...) are RTN-quantized up front
(:mod:`moqe_jax.quant.policy`), so calibration activations flow through them as deployed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax.errors import CheckpointError, DataError, QuantizationError
from moqe_jax.packed.qtensor import QuantizedTensor, is_quantized
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.quant.gptq import gptq_quantize, layer_error, rtn_codes

__all__ = ["gptq_quantize_model", "CalibrationReport", "LayerReport", "expert_hessians", "token_mask"]

GPTQ_COMPONENTS = ("experts", "dense")
_HI = jax.lax.Precision.HIGHEST


# ---- reports ------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One compressed FFN (a sparse layer's experts or a dense layer's MLP)."""

    name: str
    kind: str
    tokens: int = 0
    experts: int = 0
    solved: int = 0
    fallbacks: int = 0
    zero_token: int = 0
    capped: int = 0
    rel_err_gptq: float = float("nan")
    rel_err_rtn: float = float("nan")
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class CalibrationReport:
    layers: list[LayerReport] = field(default_factory=list)
    total_s: float = 0.0
    peak_rss_mb: float = 0.0
    resumed_layers: int = 0
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        """Plain-text table: per layer experts solved / fallbacks / zero-token and rel. error GPTQ vs RTN."""
        head = f"{'layer':34s} {'kind':7s} {'tokens':>8s} {'solved':>7s} {'RTN-fb':>7s} {'0-tok':>6s} " \
               f"{'relerr GPTQ':>11s} {'relerr RTN':>10s} {'time s':>7s}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(f"{r.name:34s} {r.kind:7s} {r.tokens:8d} {r.solved:4d}/{r.experts:<2d} {r.fallbacks:7d} "
                        f"{r.zero_token:6d} {r.rel_err_gptq:11.4f} {r.rel_err_rtn:10.4f} {r.seconds:7.1f}")
            rows.extend(f"    ! {n}" for n in r.notes)
        rows.append(f"total {self.total_s:.1f} s, peak RSS {self.peak_rss_mb:.0f} MB"
                    + (f", resumed after {self.resumed_layers} layer(s)" if self.resumed_layers else ""))
        rows.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


# ---- calibration data ---------------------------------------------------------------------------------
def _materialize(calib: Iterable[dict], vocab: int) -> list[dict[str, np.ndarray]]:
    out = []
    for bi, batch in enumerate(calib):
        if not isinstance(batch, dict) or "input_ids" not in batch or "decoder_input_ids" not in batch:
            raise DataError(f"calibration batch {bi}: expected a dict with 'input_ids' and 'decoder_input_ids'")
        b: dict[str, np.ndarray] = {}
        for key in ("input_ids", "decoder_input_ids", "attention_mask", "decoder_attention_mask"):
            if batch.get(key) is None:
                continue
            a = np.asarray(batch[key])
            if a.ndim == 1:
                a = a[None]
            if a.ndim != 2 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
                raise DataError(f"calibration batch {bi}: {key} must be an integer [batch, length] array, "
                                f"got {a.dtype}{list(a.shape)}")
            if key.endswith("ids") and a.size and (a.min() < 0 or a.max() >= vocab):
                raise DataError(f"calibration batch {bi}: {key} has ids outside [0, {vocab})")
            b[key] = a.astype(np.int32)
        if b["input_ids"].shape[0] != b["decoder_input_ids"].shape[0]:
            raise DataError(f"calibration batch {bi}: input_ids and decoder_input_ids batch sizes differ")
        out.append(b)
    if not out:
        raise DataError("calibration data is empty")
    return out


def _default_special(vocab: int) -> int | None:
    """T5 sentinels: ids ≥ 32000 for the 32k SentencePiece vocab (QMoE), else the top 100 ids of a vocab
    ≥ 1000 (``moqe_jax.data.span_corruption``); tiny vocabularies have none."""
    if vocab >= 32100:
        return 32000
    if vocab >= 1000:
        return vocab - 100
    return None


def token_mask(ids: np.ndarray, valid: np.ndarray, special_min_id: int | None, decoder: bool) -> np.ndarray:
    """Tokens that enter the Hessians (QMoE §3.3): valid and not special (see module docstring)."""
    m = np.asarray(valid, bool).copy()
    if special_min_id is None:
        return m
    special = ids >= special_min_id
    if decoder:  # the position predicting a sentinel, and the last position
        nxt = np.zeros_like(special)
        nxt[:, :-1] = special[:, 1:]
        m &= ~nxt
        m[:, -1] = False
    else:
        m &= ~special
    return m


# ---- Hessians -----------------------------------------------------------------------------------------
def _cap_and_sort(expert: np.ndarray, num_experts: int, factor: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Stable sort of token indices by expert, keeping each expert's first ``cap`` tokens.

    Returns ``(order, counts [E], cap)``: ``order`` lists token indices expert by expert."""
    n = len(expert)
    cap = max(1, int(factor * n / num_experts)) if n else 0
    order = np.argsort(expert, kind="stable")
    counts = np.bincount(expert, minlength=num_experts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n) - starts[expert[order]]
    keep = order[rank < cap]
    return keep, np.minimum(counts, cap), cap


@partial(jax.jit, static_argnames=())
def _gram(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return 2.0 * jnp.matmul(x.T, x, precision=_HI)


def _pad_pow2(x: np.ndarray) -> np.ndarray:
    """Zero rows up to a power of two (≥ 16): zero tokens add nothing to XᵀX (nor to the FFN hidden state,
    act(0) = 0), and the jitted Gram sees O(log T) distinct shapes instead of one per expert."""
    n = len(x)
    m = max(16, 1 << max(0, (n - 1).bit_length()))
    return x if m == n else np.concatenate([x, np.zeros((m - n, x.shape[1]), x.dtype)])


def expert_hessians(x_sorted: np.ndarray, counts: np.ndarray, experts: Sequence[int]) -> np.ndarray:
    """``H[e] = 2·X_eᵀX_e`` for the given experts from tokens sorted by expert (segments ``counts``).

    Zero-token experts get the identity (QMoE: ``hessian()`` = I, i.e. RTN). ``[len(experts), D, D]``."""
    d = x_sorted.shape[-1]
    offs = np.concatenate([[0], np.cumsum(counts)])
    out = np.empty((len(experts), d, d), np.float32)
    for j, e in enumerate(experts):
        seg = x_sorted[offs[e]:offs[e + 1]]
        out[j] = np.asarray(_gram(_pad_pow2(seg))) if len(seg) else np.eye(d, dtype=np.float32)
    return out


def _hidden(cfg: Any, x: np.ndarray, wi: Any, wi_1: Any | None) -> jax.Array:
    """FFN hidden activations of tokens ``x [T, D]`` (ReLU, or gated GELU × linear), f32."""
    def f32(w: Any) -> jax.Array:
        return w.dequantize(jnp.float32) if is_quantized(w) else jnp.asarray(w, jnp.float32)

    return _hidden_jit(jnp.asarray(x, jnp.float32), f32(wi), None if wi_1 is None else f32(wi_1))


@jax.jit
def _hidden_jit(x: jax.Array, wi: jax.Array, wi_1: jax.Array | None) -> jax.Array:
    h = jnp.matmul(x, wi, precision=_HI)
    if wi_1 is None:
        return jax.nn.relu(h)
    return jax.nn.gelu(h, approximate=True) * jnp.matmul(x, wi_1, precision=_HI)


# ---- layer execution ----------------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(0, 1, 2))
def _run_layer(cfg: Any, stack: str, i: int, layer_params: dict, x: jax.Array, ctx: dict):
    """One layer on its own params; returns ``(x_out, moe_info_or_{}, dense_ffn_input_or_None)``."""
    from moqe_jax.model import layerwise
    from moqe_jax.model.layers import MlpBlock

    captured: dict[str, Any] = {}

    def grab(next_fun, args, kwargs, context):
        if isinstance(context.module, MlpBlock) and context.method_name == "__call__":
            captured["dense_in"] = args[0]
        return next_fun(*args, **kwargs)

    p = {stack: {f"layers_{i}": layer_params}}
    with nn.intercept_methods(grab):
        if stack == "encoder":
            y, info = layerwise.encoder_layer(cfg, p, i, x, ctx)
        else:
            y, info = layerwise.decoder_layer(cfg, p, i, x, ctx)
    info = {k: info[k] for k in ("inputs", "expert", "kept") if k in info}
    return y, info, captured.get("dense_in")


def _ffn_kernels(mlp: dict, sparse: bool) -> list[str]:
    """Names of the FFN kernels in order of computation (``wi``/``wi_0``, ``wi_1``, ``wo``)."""
    sub = mlp["expert"] if sparse else mlp
    return [n for n in ("wi", "wi_0", "wi_1", "wo") if n in sub]


def _set_kernel(params: dict, path: Sequence[str], value: Any) -> dict:
    """Functional update of ``params[path...]`` (copies the dicts along the path only)."""
    if not path:
        return value
    new = dict(params)
    new[path[0]] = _set_kernel(params[path[0]], path[1:], value)
    return new


# ---- checkpointing ------------------------------------------------------------------------------------
def _save_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_np(a: Any) -> tuple[np.ndarray, str]:
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return a.view(np.uint16), "bfloat16"
    return a, a.dtype.name


def _from_np(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return a.view(jnp.bfloat16)
    return a


def _fingerprint(model: Any, spec: QuantSpec, batches: list[dict], opts: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(opts, sort_keys=True, default=str).encode())
    cfg = model.config
    h.update((cfg.to_json() if hasattr(cfg, "to_json") else repr(cfg)).encode())
    for b in batches:
        for key in sorted(b):
            h.update(key.encode())
            h.update(np.ascontiguousarray(b[key]).tobytes())
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params, is_leaf=is_quantized)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        if not is_quantized(leaf):
            flat = np.asarray(leaf).reshape(-1)
            h.update(_to_np(flat[:4096])[0].tobytes())
    return h.hexdigest()[:24]


class _Checkpoint:
    """Per-layer progress under ``directory`` (written atomically; ``progress.json`` is the commit point)."""

    def __init__(self, directory: str, fingerprint: str, resume: bool):
        self.dir = directory
        self.fp = fingerprint
        os.makedirs(directory, exist_ok=True)
        self.progress_path = os.path.join(directory, "progress.json")
        self.state: dict | None = None
        if os.path.exists(self.progress_path):
            try:
                with open(self.progress_path) as f:
                    st = json.load(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self.progress_path}: unreadable progress file ({e})") from None
            if resume:
                if st.get("fingerprint") != fingerprint:
                    raise CheckpointError(f"{directory}: holds a run with another model/spec/calibration data "
                                          "(fingerprint mismatch); use a fresh --out/checkpoint dir or drop --resume")
                self.state = st
            else:
                shutil.rmtree(directory)
                os.makedirs(directory)

    def layer_file(self, name: str) -> str:
        return os.path.join(self.dir, "layer_" + name.replace("/", "_") + ".npz")

    def save_layer(self, name: str, leaves: dict[str, Any]) -> None:
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {}
        for key, qt in leaves.items():
            arrs, m = qt.to_arrays()
            meta[key] = m
            for an, a in arrs.items():
                arrays[f"{key}::{an}"] = np.asarray(a)
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        _save_npz_atomic(self.layer_file(name), arrays)

    def load_layer(self, name: str) -> dict[str, QuantizedTensor]:
        path = self.layer_file(name)
        try:
            with np.load(path) as z:
                meta = json.loads(bytes(z["__meta__"]).decode())
                out = {}
                for key, m in meta.items():
                    arrs = {k.split("::", 1)[1]: z[k] for k in z.files if k.startswith(key + "::")}
                    out[key] = QuantizedTensor.from_arrays(arrs, m)
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: missing or corrupt layer checkpoint ({e})") from None
        return out

    def save_step(self, step: int, stage: str, done_layers: list[str], reports: list[LayerReport],
                  hidden: list[Any], encoded: list[Any] | None) -> None:
        arrays: dict[str, np.ndarray] = {}
        dtypes = {}
        for j, x in enumerate(hidden):
            arrays[f"x{j}"], dtypes[f"x{j}"] = _to_np(x)
        for j, x in enumerate(encoded or []):
            arrays[f"enc{j}"], dtypes[f"enc{j}"] = _to_np(x)
        state_file = f"state_{step:04d}.npz"
        _save_npz_atomic(os.path.join(self.dir, state_file), arrays)
        _save_json_atomic(self.progress_path, {
            "fingerprint": self.fp, "step": step, "stage": stage, "state_file": state_file, "dtypes": dtypes,
            "done_layers": done_layers, "reports": [dataclasses.asdict(r) for r in reports]})
        for f in os.listdir(self.dir):  # older states are no longer referenced
            if f.startswith("state_") and f != state_file and f.endswith(".npz"):
                os.remove(os.path.join(self.dir, f))

    def load_step(self) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        st = self.state
        path = os.path.join(self.dir, st["state_file"])
        try:
            with np.load(path) as z:
                hidden = [_from_np(z[f"x{j}"], st["dtypes"][f"x{j}"]) for j in range(sum(
                    1 for k in z.files if k.startswith("x")))]
                n_enc = sum(1 for k in z.files if k.startswith("enc"))
                encoded = [_from_np(z[f"enc{j}"], st["dtypes"][f"enc{j}"]) for j in range(n_enc)] or None
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: missing or corrupt calibration state ({e})") from None
        return hidden, encoded


# ---- the driver ---------------------------------------------------------------------------------------
def _progress(it: Iterable, total: int, desc: str) -> Iterable:
    if os.environ.get("MOQE_NO_PROGRESS") == "1" or not sys.stderr.isatty():
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)


def _compress_ffn(cfg: Any, mlp: dict, sparse: bool, x_tok: np.ndarray, e_tok: np.ndarray, spec: QuantSpec,
                  opts: dict, name: str, mesh: Any) -> tuple[dict[str, QuantizedTensor], LayerReport]:
    """GPTQ every kernel of one FFN (all experts of a sparse layer, or the dense MLP as one 'expert')."""
    t0 = time.time()
    sub = mlp["expert"] if sparse else mlp
    names = _ffn_kernels(mlp, sparse)
    first = sub[names[0]]["kernel"]
    if is_quantized(first):
        raise QuantizationError(f"{name}: already quantized; calibrate the float model")
    e = first.shape[0] if sparse else 1
    rep = LayerReport(name=name, kind="experts" if sparse else "dense", experts=e)
    keep, counts, cap = _cap_and_sort(e_tok, e, opts["max_tokens_factor"])
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
    group = max(1, int(opts["group_experts"] or e))
    parts: dict[str, list[QuantizedTensor]] = {n: [] for n in names}
    errs: dict[str, list[np.ndarray]] = {"gptq": [], "rtn": []}
    fallback = np.zeros(e, bool)
    offs = np.concatenate([[0], np.cumsum(counts)])
    for s in range(0, e, group):
        idx = list(range(s, min(e, s + group)))
        h_in = expert_hessians(x_sorted, counts, idx)
        wi_names = [n for n in names if n != "wo"]
        for n in wi_names:
            qt, st = gptq_quantize(wts[n][idx], h_in, spec, percdamp=opts["percdamp"], actorder=opts["actorder"],
                                   blocksize=opts["blocksize"], group=None, mesh=mesh, name=f"{name}/{n}",
                                   dtype=dtypes[n])
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
                src = parts if opts["true_sequential"] else None
                wi = src[wi_names[0]][-1][j] if src else wts[wi_names[0]][ex]
                wi1 = None
                if len(wi_names) > 1:
                    wi1 = src[wi_names[1]][-1][j] if src else wts[wi_names[1]][ex]
                h_out[j] = np.asarray(_gram(_hidden(cfg, _pad_pow2(seg), wi, wi1)))
            qt, st = gptq_quantize(wts["wo"][idx], h_out, spec, percdamp=opts["percdamp"],
                                   actorder=opts["actorder"], blocksize=opts["blocksize"], group=None, mesh=mesh,
                                   name=f"{name}/wo", dtype=dtypes["wo"])
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


def gptq_quantize_model(model: Any, spec: QuantSpec, calib: Iterable[dict], components: Sequence[str] = ("experts",),
                        checkpoint_dir: str | os.PathLike | None = None, max_tokens_factor: float = 4,
                        percdamp: float = 0.1, actorder: bool = False, group_experts: int = 16, mesh: Any = None, *,
                        blocksize: int = 128, true_sequential: bool = False,
                        special_token_min_id: int | None | str = "auto", resume: bool = True,
                        on_layer_done: Callable[[str], None] | None = None,
                        report: CalibrationReport | None = None) -> Any:
    """QMoE: compress ``model`` layer by layer with routing-aware GPTQ -> new ``Model``.

    ``calib``: iterable of dicts of int arrays ``{"input_ids", "decoder_input_ids"}`` (+ optional
    ``attention_mask``/``decoder_attention_mask``). ``components``: ``experts`` and ``dense`` are solved
    with GPTQ; any other component named is RTN-quantized up front. ``checkpoint_dir``: progress is saved
    after every layer and a restarted call resumes where it stopped (same result; ``resume=False`` starts
    over). ``on_layer_done(name)`` is called after each layer's checkpoint. Pass a ``CalibrationReport``
    as ``report`` to receive the per-layer statistics (also attached as ``model.calibration_report``).
    """
    from moqe_jax.model import layerwise
    from moqe_jax.quant.policy import parse_components, quantize_params
    from moqe_jax.quant.rtn import as_spec

    t_start = time.time()
    spec = as_spec(spec)
    cfg = model.config
    comps = parse_components(components)
    rtn_comps = tuple(c for c in comps if c not in GPTQ_COMPONENTS)
    gptq_comps = tuple(c for c in comps if c in GPTQ_COMPONENTS)
    batches = _materialize(calib, cfg.vocab_size)
    special = _default_special(cfg.vocab_size) if special_token_min_id == "auto" else special_token_min_id
    opts = {"max_tokens_factor": float(max_tokens_factor), "percdamp": float(percdamp), "actorder": bool(actorder),
            "group_experts": int(group_experts or 0), "blocksize": int(blocksize),
            "true_sequential": bool(true_sequential),
            "special": special, "components": list(comps)}
    rep = report if report is not None else CalibrationReport()
    params = model.params
    if rtn_comps:
        params = quantize_params(params, spec, rtn_comps)
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = _Checkpoint(os.fspath(checkpoint_dir), _fingerprint(model, spec, batches, opts), resume)

    # the layer sequence
    steps = [("encoder", i) for i in range(cfg.num_layers)] + [("decoder", i) for i in range(cfg.num_decoder_layers)]
    done_layers: list[str] = []
    reports: list[LayerReport] = []
    start = 0
    hidden: list[Any] = []
    encoded: list[Any] | None = None
    if ckpt is not None and ckpt.state is not None:
        st = ckpt.state
        start = int(st["step"]) + 1
        done_layers = list(st["done_layers"])
        reports = [LayerReport(**r) for r in st["reports"]]
        for name in done_layers:
            for kname, qt in ckpt.load_layer(name).items():
                params = _set_kernel(params, (*name.split("/"), *kname.split("/"), "kernel"), qt)
        hidden, encoded = ckpt.load_step()
        rep.resumed_layers = start
    masks_enc: list[np.ndarray] = []
    masks_dec: list[np.ndarray] = []
    for b in batches:
        _, ctx = layerwise.encode_embed(cfg, params, b["input_ids"], b.get("attention_mask"))
        masks_enc.append(token_mask(b["input_ids"], np.asarray(ctx["valid"]), special, decoder=False))
    if start == 0:
        hidden = [layerwise.encode_embed(cfg, params, b["input_ids"], b.get("attention_mask"))[0] for b in batches]

    def enc_ctx(b: dict) -> dict:
        return layerwise.encode_embed(cfg, params, b["input_ids"], b.get("attention_mask"))[1]

    def dec_ctx(j: int, b: dict) -> dict:
        ectx = enc_ctx(b)
        return layerwise.decode_embed(cfg, params, b["decoder_input_ids"], jnp.asarray(encoded[j]), ectx,
                                      b.get("decoder_attention_mask"))[1]

    def start_decoder() -> None:
        nonlocal hidden, encoded
        encoded = [layerwise.encoder_final(cfg, params, jnp.asarray(x), enc_ctx(b))
                   for x, b in zip(hidden, batches, strict=True)]
        hidden = [layerwise.decode_embed(cfg, params, b["decoder_input_ids"], encoded[j], enc_ctx(b),
                                         b.get("decoder_attention_mask"))[0] for j, b in enumerate(batches)]

    total_tokens = sum(int(m.sum()) for m in masks_enc)
    if total_tokens == 0:
        rep.warnings.append("calibration data has no usable encoder token (only padding/special tokens): "
                            "every expert falls back to RTN")

    for step in _progress(range(start, len(steps)), total=len(steps) - start, desc="gptq layers"):
        stack, i = steps[step]
        if stack == "decoder" and encoded is None:  # first decoder layer (fresh, or resumed right there)
            start_decoder()
        lname = f"{stack}/layers_{i}"
        lp = params[stack][f"layers_{i}"]
        sparse = cfg.is_sparse(stack, i)
        want = ("experts" in gptq_comps) if sparse else ("dense" in gptq_comps)
        ctxs = [enc_ctx(b) if stack == "encoder" else dec_ctx(j, b) for j, b in enumerate(batches)]
        if want:
            xs, es = [], []
            for j, b in enumerate(batches):
                _, info, dense_in = _run_layer(cfg, stack, i, lp, jnp.asarray(hidden[j]), ctxs[j])
                if stack == "encoder":
                    m = masks_enc[j]
                else:
                    if len(masks_dec) <= j:
                        masks_dec.append(token_mask(b["decoder_input_ids"], np.asarray(ctxs[j]["valid"]), special,
                                                    decoder=True))
                    m = masks_dec[j]
                if sparse:
                    m = m & np.asarray(info["kept"])
                    xs.append(np.asarray(info["inputs"], np.float32)[m])
                    es.append(np.asarray(info["expert"])[m].astype(np.int64))
                else:
                    xs.append(np.asarray(dense_in, np.float32)[m])
                    es.append(np.zeros(int(m.sum()), np.int64))
            x_tok = np.concatenate(xs) if xs else np.zeros((0, cfg.d_model), np.float32)
            e_tok = np.concatenate(es) if es else np.zeros((0,), np.int64)
            del xs, es
            name = f"{lname}/mlp"
            new, lrep = _compress_ffn(cfg, lp["mlp"], sparse, x_tok, e_tok, spec, opts, name, mesh)
            del x_tok, e_tok
            for kname, qt in new.items():
                path = (stack, f"layers_{i}", "mlp", "expert", kname, "kernel") if sparse else \
                    (stack, f"layers_{i}", "mlp", kname, "kernel")
                params = _set_kernel(params, path, qt)
            if ckpt is not None:
                ckpt.save_layer(name, {("expert/" + k if sparse else k): v for k, v in new.items()})
            done_layers.append(name)
            reports.append(lrep)
            lp = params[stack][f"layers_{i}"]
        # propagate through the (compressed) layer
        hidden = [_run_layer(cfg, stack, i, lp, jnp.asarray(hidden[j]), ctxs[j])[0] for j in range(len(batches))]
        if ckpt is not None:
            ckpt.save_step(step, stack, done_layers, reports, hidden, encoded if stack == "decoder" else None)
        if on_layer_done is not None:
            on_layer_done(lname)

    rep.layers = reports
    rep.total_s = time.time() - t_start
    rep.peak_rss_mb = peak_rss_mb()
    out = model.replace(params=params) if hasattr(model, "replace") else type(model)(cfg, params)
    out.calibration_report = rep
    return out
