"""Matmuls with (possibly packed) weights: the one kernel dispatch point (docs/ARCHITECTURE.md, "ops").

``y = x @ W`` where ``W`` is a float array or a packed weight (:class:`~moqe_jax.packed.PackedWeight`);
``ragged_qmatmul`` is the dropless MoE form (rows sorted by expert, one group of rows per expert).
``mode`` is a static argument (part of the trace, never a process global):

* ``"xla"``: reference — decode/dequantize with XLA, then ``jnp.dot`` (a float W is cast to ``x.dtype``
  exactly like Flaxformer's ``DenseGeneral``);
* ``"pallas"``: the Pallas kernels of ``pallas_kernels`` (Triton on NVIDIA GPUs);
* ``"interpret"``: the same kernels in Pallas interpret mode (CPU tests);
* ``"auto"`` (default): Pallas on an NVIDIA GPU when a kernel handles the case, XLA otherwise.

The kernels take raw arrays and static layout values; the adapters from each packed type to them live
here, in a registry keyed by the packed class (:func:`register_kernels`). When no kernel handles a case
(rank, K mismatch, too many tokens, tiny groups) the XLA reference runs instead; :func:`explain` says why.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp

from moqe_jax.errors import MoqeError
from moqe_jax.packed.base import MaybePacked, PackedWeight, is_packed
from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.sub1 import Sub1Tensor
from moqe_jax.packed.sub1_dict import NZ_SLOTS, sparse_dec_table
from pallas_kernels import backend
from pallas_kernels import dequant_matmul as dq
from pallas_kernels import sub1_matmul as s1

__all__ = ["KERNEL_MODES", "KernelMode", "KernelError", "check_mode", "resolve_mode", "qmatmul", "grouped_qmatmul",
           "indexed_qmatmul", "ragged_qmatmul", "ragged_plan", "dequantize_weight", "explain", "kernel_operands",
           "qt_kernel_operands", "register_kernels"]

KernelMode = Literal["auto", "xla", "pallas", "interpret"]
KERNEL_MODES: tuple[str, ...] = ("auto", "xla", "pallas", "interpret")
Kind = Literal["matmul", "grouped", "indexed"]


class KernelError(MoqeError, RuntimeError):
    """A Pallas kernel was asked for where none can run (e.g. mode ``"pallas"`` without an NVIDIA GPU)."""


def check_mode(mode: str) -> str:
    """``mode`` itself, or ValueError naming the valid kernel modes."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


def resolve_mode(mode: str) -> str:
    """``"auto"`` -> ``"pallas"`` on an NVIDIA GPU with the Triton lowering, else ``"xla"``; others unchanged."""
    if check_mode(mode) == "auto":
        return "pallas" if backend.gpu_kernels_available() else "xla"
    return mode


# ---------------------------------------------------------------------------------------------
# Adapters: packed type -> raw kernel operands
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelAdapter:
    """How one packed type runs on the kernels.

    ``operands(w)`` -> (raw arrays, static layout kwargs) of the kernel; ``explain(x, w, kind)`` -> why no
    kernel handles the case (None = one does); ``run(x, w, kind, expert_ids, interpret)`` -> the result.
    """

    operands: Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]]
    explain: Callable[[jax.Array, Any, Kind], str | None]
    run: Callable[[jax.Array, Any, Kind, jax.Array | None, bool], jax.Array]


_KERNELS: dict[type, KernelAdapter] = {}


def register_kernels(cls: type, adapter: KernelAdapter) -> None:
    """Make the kernels handle packed type ``cls`` (one adapter per type)."""
    _KERNELS[cls] = adapter


def _batched_x_reason(x: jax.Array, w: Any, kind: Kind) -> str | None:
    """Shape rules shared by both packed types (``w`` is ``[K, N]`` or ``[E, K, N]``)."""
    if x.shape[-1] != w.shape[-2]:
        return f"x has K={x.shape[-1]}, weight has K={w.shape[-2]}"
    if kind == "matmul":
        if w.ndim == 3 and (x.ndim < 2 or x.shape[0] != w.shape[0]):
            return f"stacked weight {list(w.shape)} needs x [E, ..., K], got {list(x.shape)}"
        return None if w.ndim in (2, 3) else f"weight rank {w.ndim} (kernel needs 2-D or [E, K, N])"
    if w.ndim != 3 or x.ndim != 3:
        return f"{kind} matmul needs x [A, C, K] and W [E, K, N], got {list(x.shape)} and {list(w.shape)}"
    if kind == "grouped" and x.shape[0] != w.shape[0]:
        return f"grouped matmul needs one x slot per expert, got {x.shape[0]} for {w.shape[0]} experts"
    return None


def _as_slots(x: jax.Array, w: Any) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """``x`` as ``[A, C, K]`` slots for a 2-D (A = 1) or stacked (A = E) weight, and the inverse reshape."""
    if w.ndim == 2:
        lead = x.shape[:-1]
        m = math.prod(lead)
        return x.reshape(1, m, x.shape[-1]), lambda y: y.reshape(*lead, y.shape[-1])
    lead = x.shape[1:-1]
    c = math.prod(lead)
    return x.reshape(x.shape[0], c, x.shape[-1]), lambda y: y.reshape(x.shape[0], *lead, y.shape[-1])


# ---- QuantizedTensor -> pallas_kernels.dequant_matmul ------------------------------------------
# The kernels read the word layout (docs/FORMATS.md §1: 4 packed bytes of a column as one uint32 along K).
# A QuantizedTensor held in layout "words" (QuantizedTensor.with_layout, Model.with_weight_layout) hands its
# words over as they are, traced or not: that is how the model's compiled decode loop reaches the word kernels.
# A byte-layout weight is repacked once per concrete weight and cached while that weight lives (eager calls,
# benchmarks); a traced byte weight (inside a caller's jit) runs the byte kernels: a repack there would re-read
# and re-write every expert on every call.
_WORDS: dict[int, jax.Array] = {}


def _words_of(packed: Any) -> jax.Array:
    key = id(packed)
    hit = _WORDS.get(key)
    if hit is None:
        hit = dq.pack_words(jnp.asarray(packed))
        try:
            weakref.finalize(packed, _WORDS.pop, key, None)
        except TypeError:  # not weak-referenceable: no cache
            return hit
        _WORDS[key] = hit
    return hit


def qt_kernel_operands(w: QuantizedTensor, word_bits: int | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Raw operands of :func:`pallas_kernels.dequant_matmul.qmm` for ``w``: ``((packed, scales, zeros), layout)``.

    ``word_bits`` 8 = uint8 codes; 32 = the uint32 word layout (2/4/8-bit codes with groups of ≥ 16 words);
    None = the words ``w`` holds when ``w.layout == "words"`` (traced or not); for a byte-layout ``w``, 32 when
    supported and ``w`` is concrete (repacked once, cached), else 8. ``word_bits=8`` on a words ``w`` unpacks
    it on every call (uncached: only tests and benchmarks ask for the byte kernels of a words tensor).
    """
    spec = w.spec
    layout: dict[str, Any] = {"k": w.k, "code_bits": spec.code_bits, "scheme": spec.code_scheme,
              "group_size": None if spec.granularity == "channel" else spec.group_size(w.k)}
    if w.layout == "words":
        if word_bits == 8:
            return (w.to_bytes().packed, w.scales, w.zeros), layout
        return (w.packed, w.scales, w.zeros), layout
    if word_bits is None:
        concrete = not isinstance(w.packed, jax.core.Tracer)
        word_bits = 32 if concrete and dq.words_supported(layout["code_bits"], layout["group_size"]) else 8
    packed = _words_of(w.packed) if word_bits == 32 else w.packed
    return (packed, w.scales, w.zeros), layout


def _qt_operands(w: QuantizedTensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return qt_kernel_operands(w)


def _qt_explain(x: jax.Array, w: QuantizedTensor, kind: Kind) -> str | None:
    reason = _batched_x_reason(x, w, kind)
    if reason is not None:
        return reason
    return dq.unsupported_reason(w.spec.code_bits, None if w.spec.granularity == "channel" else
                                 w.spec.group_size(w.k), x.dtype, 32 if w.layout == "words" else 8)


def _qt_run(x: jax.Array, w: QuantizedTensor, kind: Kind, expert_ids: jax.Array | None,
            interpret: bool) -> jax.Array:
    (packed, scales, zeros), layout = _qt_operands(w)
    if kind == "indexed":
        return dq.qmm(x, packed, scales, zeros, **layout, expert_ids=expert_ids, interpret=interpret)
    x3, back = _as_slots(x, w)
    if w.ndim == 2:
        packed, scales = packed[None], scales[None]
        zeros = None if zeros is None else zeros[None]
    return back(dq.qmm(x3, packed, scales, zeros, **layout, interpret=interpret))


register_kernels(QuantizedTensor, KernelAdapter(_qt_operands, _qt_explain, _qt_run))


# ---- Sub1Tensor -> pallas_kernels.sub1_matmul ---------------------------------------------------
def _sub1_operands(w: Sub1Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    stream, row_off, scales, zeros = w.flat_arrays()
    return (stream, row_off, scales, zeros, jnp.asarray(sparse_dec_table())), {"n": w.n, "nz_slots": NZ_SLOTS}


def _sub1_explain(x: jax.Array, w: Sub1Tensor, kind: Kind) -> str | None:
    reason = _batched_x_reason(x, w, kind)
    if reason is not None:
        return reason
    c = math.prod(x.shape[:-1]) if w.ndim == 2 else math.prod(x.shape[1:-1])
    if c == 0 or c > s1.MAX_TOKENS:
        return f"{c} tokens per expert (the sub-1-bit kernel takes 1 … {s1.MAX_TOKENS})"
    if kind == "indexed" and x.shape[0] == 0:
        return "no active experts"
    return None


def _sub1_run(x: jax.Array, w: Sub1Tensor, kind: Kind, expert_ids: jax.Array | None,
              interpret: bool) -> jax.Array:
    arrays, layout = _sub1_operands(w)
    x3, back = (x, lambda y: y) if kind == "indexed" else _as_slots(x, w)
    a, c, _ = x3.shape
    y = s1.sub1_matmul_rows(jnp.swapaxes(x3, 1, 2), *arrays, **layout, expert_ids=expert_ids,
                            interpret=interpret)                                  # [A·N, C]
    return back(jnp.swapaxes(y.reshape(a, w.n, c), 1, 2).astype(x.dtype))


register_kernels(Sub1Tensor, KernelAdapter(_sub1_operands, _sub1_explain, _sub1_run))


def kernel_operands(w: MaybePacked) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Raw kernel operands of a packed weight: ``(arrays, static layout kwargs)`` (benchmarks, kernel tests)."""
    return _adapter(w).operands(w)


def _adapter(w: Any) -> KernelAdapter:
    try:
        return _KERNELS[type(w)]
    except KeyError:
        raise TypeError(f"no kernels registered for weight type {type(w).__name__}") from None


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def explain(x: jax.Array, w: MaybePacked, kind: Kind = "matmul") -> str | None:
    """Why no kernel handles ``x @ w`` for ``kind`` (None when one does). Useful in logs and tests."""
    if not is_packed(w):
        return "float weight (XLA dot)"
    if type(w) not in _KERNELS:
        return f"no kernels registered for {type(w).__name__}"
    return _adapter(w).explain(x, w, kind)


def _kernel(kind: Kind, x: jax.Array, w: MaybePacked, mode: str, preferred_element_type: Any,
            expert_ids: jax.Array | None = None) -> jax.Array | None:
    """The kernel result when the mode asks for one and it handles the case, else None (caller runs XLA)."""
    m = resolve_mode(mode)
    if expert_ids is not None and tuple(jnp.shape(expert_ids)) != (x.shape[0],):
        raise ValueError(f"expert_ids {list(jnp.shape(expert_ids))} must be [A] for x {list(x.shape)}")
    if m == "xla" or explain(x, w, kind) is not None:
        return None
    try:
        y = _adapter(w).run(x, w, kind, expert_ids, m == "interpret")
    except backend.KernelBackendError as err:
        raise KernelError(str(err)) from err
    return y if preferred_element_type is None else y.astype(preferred_element_type)


def dequantize_weight(w: MaybePacked, dtype: Any) -> jax.Array:
    """Float view of any weight (XLA reference path)."""
    if is_packed(w):
        return cast(PackedWeight, w).dequantize(dtype)
    return jnp.asarray(w).astype(dtype)


def qmatmul(x: jax.Array, w: MaybePacked, *, mode: str = "auto", preferred_element_type: Any = None) -> jax.Array:
    """``x [..., K] @ W [K, N] -> [..., N]``; a stacked ``W [E, K, N]`` with ``x [E, ..., K]`` runs per expert."""
    y = _kernel("matmul", x, w, mode, preferred_element_type)
    if y is not None:
        return y
    wf = dequantize_weight(w, x.dtype)
    if wf.ndim == 3:
        return jnp.einsum("e...k,ekn->e...n", x, wf, preferred_element_type=preferred_element_type)
    return jnp.dot(x, wf, preferred_element_type=preferred_element_type)


def grouped_qmatmul(x: jax.Array, w: MaybePacked, *, mode: str = "auto",
                    preferred_element_type: Any = None) -> jax.Array:
    """Per-expert matmul ``x [E, C, K] @ W [E, K, N] -> [E, C, N]`` (capacity-dispatched layout)."""
    y = _kernel("grouped", x, w, mode, preferred_element_type)
    if y is not None:
        return y
    return jnp.einsum("eck,ekn->ecn", x, dequantize_weight(w, x.dtype), preferred_element_type=preferred_element_type)


def indexed_qmatmul(x: jax.Array, w: MaybePacked, expert_ids: jax.Array, *, mode: str = "auto",
                    preferred_element_type: Any = None) -> jax.Array:
    """Active experts only: ``x [A, C, K]``, slot ``a`` times ``W[expert_ids[a]]`` -> ``[A, C, N]``.

    Decode step of a top-1 MoE layer; the kernels read only the listed experts (ids in ``[0, E)``, not checked
    under jit).
    """
    y = _kernel("indexed", x, w, mode, preferred_element_type, expert_ids)
    if y is not None:
        return y
    wf = dequantize_weight(w, x.dtype)[expert_ids]
    return jnp.einsum("ack,akn->acn", x, wf, preferred_element_type=preferred_element_type)


# ---------------------------------------------------------------------------------------------
# Ragged (dropless) grouped matmul: rows sorted by expert
# ---------------------------------------------------------------------------------------------
RaggedPlan = Literal["slots", "chunks", "indexed", "indexed_tiles", "tiles"]
_CHUNK_MIN_BYTES = 1 << 20  # "chunks" only when one expert matrix (as f32) exceeds this (CPU L2-sized)
_CHUNK_BYTES = 640 << 10  # at most this many bytes per K-chunk block (about half a 1 MiB L2; measured best)
_CHUNK_BYTES_ONE_ROW = 256 << 10  # the same for a lone row (no row loop around the blocks; measured best)
_CHUNK_STREAMS = 2  # independent chunk loops per row (XLA:CPU runs them concurrently); measured on 2 cores


def _ragged_tile(m: int, e: int) -> int:
    """Rows per tile of the tiled path: about ``m / e`` rows (so padding work stays ≤ ~2× the rows), 8 … 128."""
    t = 8
    while t < 128 and t * e < m:
        t *= 2
    return t


def _dslice(w: jax.Array, starts: tuple[Any, ...], sizes: tuple[int, ...]) -> jax.Array:
    """``lax.dynamic_slice`` of a float array; on CPU, sub-f32 floats are sliced through an unsigned-int view.

    XLA:CPU's bf16 float normalization treats a bf16 dynamic-slice as unsupported and converts the *whole*
    operand to f32 first (a 4-byte copy of every expert, which loop-invariant code motion then hoists out of
    the decode loop); slicing the same bits as uint16 leaves only the chosen block to be converted.
    """
    dt = jnp.dtype(w.dtype)
    if jnp.issubdtype(dt, jnp.floating) and dt.itemsize < 4 and jax.default_backend() == "cpu":  # GPU: bf16 native
        return _dslice_bits(w, tuple(jnp.asarray(s, jnp.int32) for s in starts), tuple(sizes))
    return jax.lax.dynamic_slice(w, starts, sizes)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _dslice_bits(w: jax.Array, starts: tuple[jax.Array, ...], sizes: tuple[int, ...]) -> jax.Array:
    """The uint-view slice of :func:`_dslice`; its derivative is the plain slice of the tangent (a bitcast
    to an integer type alone would make the gradient silently zero).

    XLA:CPU emits a bitcast-convert of the whole stack as a copy kernel, and loop-invariant code motion would
    hoist it out of the loops as one (a full copy per call); the optimization barrier ties ``w`` to the
    (loop-variant) slice start, so the view, slice and convert stay one fusion that reads only the block.
    """
    u = jnp.dtype(f"uint{8 * jnp.dtype(w.dtype).itemsize}")
    w, starts = jax.lax.optimization_barrier((w, starts))
    bits = jax.lax.dynamic_slice(jax.lax.bitcast_convert_type(w, u), starts, sizes)
    return jax.lax.bitcast_convert_type(bits, w.dtype)


@_dslice_bits.defjvp
def _dslice_bits_jvp(sizes: tuple[int, ...], primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    w, starts = primals
    return _dslice_bits(w, starts, sizes), jax.lax.dynamic_slice(tangents[0], starts, sizes)


def _expert(w: MaybePacked, i: jax.Array) -> MaybePacked:
    """``W[i]`` of a stacked weight (traced ``i``: a dynamic slice; packed leaves are expert-aligned)."""
    if is_packed(w):
        return cast(Any, w)[i]
    a = cast(jax.Array, w)
    return _dslice(a, (i,) + (0,) * (a.ndim - 1), (1, *a.shape[1:]))[0]


def _chunk_rows(k: int, n: int, itemsize: int, limit: int = _CHUNK_BYTES) -> int:
    """K rows per block of the "chunks" plan: the largest divisor of each stream's share of K whose ``[kc, N]``
    block fits ``limit`` bytes; 0 when the expert matrix is small (it stays in cache), K does not split, or
    the weight is a sub-f32 float (bf16: the slice is fused with the convert the CPU dot needs anyway; measured
    faster whole than in blocks). Block size (benchmarks/results/moe_decode_notes.md, 1 MiB-L2 cores, the
    MoE layer A/B with cold caches): 16 rows: 640 KiB 1.24× the floor vs 256 KiB 1.61×; one row (no row loop):
    256 KiB 1.34–1.49× vs 640 KiB 1.52–1.62×."""
    if itemsize < 4 or k * n * itemsize <= _CHUNK_MIN_BYTES or k % _CHUNK_STREAMS:
        return 0
    share = k // _CHUNK_STREAMS
    return max((d for d in range(1, share + 1) if share % d == 0 and d * n * itemsize <= limit), default=0)


def _chunked_matmul(x: jax.Array, w: jax.Array, e: jax.Array, preferred_element_type: Any,
                    limit: int = _CHUNK_BYTES) -> jax.Array:
    """``x [1, K] @ W[e]`` for a float stacked ``W [E, K, N]``, reading ``W[e]`` in ``[kc, N]`` blocks.

    XLA:CPU copies a dynamic slice of a whole expert out of the stack before a dot (a 9.4 MB write + re-read
    per switch-base matrix); blocks of ``kc`` rows stay in cache. ``_CHUNK_STREAMS`` independent loops over
    disjoint K ranges run concurrently; partial products are summed in (at least) f32, then cast once, so the
    result is the row times ``W[e]`` as :func:`qmatmul` computes it up to the order of the f32 sums.
    """
    k, n = w.shape[1], w.shape[2]
    b = jnp.dtype(w.dtype).itemsize
    kc = _chunk_rows(k, n, b, limit) or _chunk_rows(k, n, b)
    share = k // _CHUNK_STREAMS
    out_dt = x.dtype if preferred_element_type is None else preferred_element_type
    acc_dt = jnp.promote_types(out_dt, jnp.float32)

    def stream(k0: int) -> jax.Array:
        def step(c: jax.Array, acc: jax.Array) -> jax.Array:
            r = k0 + c * kc
            blk = jax.lax.dynamic_slice(w, (e, r, 0), (1, kc, n))[0].astype(x.dtype)  # f32 only: no uint view
            return acc + jnp.dot(jax.lax.dynamic_slice_in_dim(x, r, kc, 1), blk, preferred_element_type=acc_dt)
        return jax.lax.fori_loop(0, share // kc, step, jnp.zeros((x.shape[0], n), acc_dt))

    parts = [stream(s * share) for s in range(_CHUNK_STREAMS)]
    return sum(parts[1:], parts[0]).astype(out_dt)


def ragged_plan(x: jax.Array, w: MaybePacked, *, mode: str = "auto") -> RaggedPlan:
    """Static choice of :func:`ragged_qmatmul` for these shapes (shapes and mode only, never values).

    * ``"indexed"``: fewer rows than experts and a Pallas kernel handles ``w``: one launch of the indexed
      kernel, row ``i`` times ``W[expert(i)]`` (the kernel reads only the listed experts);
    * ``"slots"``: fewer rows than experts otherwise: a loop over rows, each reading (and, for packed
      weights, decoding) only its own expert ``W[e]`` (a dynamic slice: no gather of all E experts);
    * ``"chunks"``: "slots" for an f32 ``w`` on CPU whose expert matrices exceed ``_CHUNK_MIN_BYTES``: each
      row reads its expert in ``[kc, N]`` blocks (XLA:CPU would copy the whole ``W[e]`` slice out first);
    * ``"indexed_tiles"``: at least as many rows as experts and a Pallas kernel handles ``w`` with ``tm``-row
      slots (megablox-style, one launch): work items = (tile of ``tm`` sorted rows, one expert whose rows
      overlap it); the items' tiles go to the indexed kernel as slots, item ``i`` reading only its expert;
    * ``"tiles"``: otherwise (XLA): the same work items in a loop; each reads one expert and multiplies one
      tile, rows of other experts masked out.
    """
    m, e = x.shape[0], w.shape[0]
    if m >= e and is_packed(w) and resolve_mode(mode) != "xla":
        slots = jax.ShapeDtypeStruct((1, _ragged_tile(m, e), x.shape[1]), x.dtype)
        if explain(cast(jax.Array, slots), w, "indexed") is None:
            return "indexed_tiles"
    if m < e:
        if is_packed(w) and resolve_mode(mode) != "xla" and explain(x[:, None, :], w, "indexed") is None:
            return "indexed"
        if (not is_packed(w) and jax.default_backend() == "cpu"
                and _chunk_rows(w.shape[1], w.shape[2], jnp.dtype(cast(jax.Array, w).dtype).itemsize)):
            return "chunks"
        return "slots"
    return "tiles"


def _indexed_tiles(xt: jax.Array, w: MaybePacked, ends: jax.Array, first: jax.Array, n_items_g: jax.Array,
                   item_end: jax.Array, static_items: int, *, mode: str, preferred_element_type: Any) -> jax.Array:
    """The "indexed_tiles" plan: ``xt [T, tm, K]`` (sorted rows, padded) -> ``[T·tm, N]`` in one kernel launch.

    Item ``i`` (of ``static_items``, a static bound; items past the real count repeat the last expert and
    are discarded) is slot ``i`` of :func:`indexed_qmatmul`: its tile's rows times ``W[group(i)]``. Row ``r``
    of group ``g`` is then read back from the item covering its tile for ``g`` (a gather of activations only).
    """
    t, tm, _ = xt.shape
    e = w.shape[0]
    items = jnp.arange(static_items, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(item_end, items, side="right"), e - 1).astype(jnp.int32)
    tile = jnp.clip(first[g] + items - (item_end[g] - n_items_g[g]), 0, t - 1)
    y = indexed_qmatmul(xt[tile], w, g, mode=mode, preferred_element_type=preferred_element_type)
    r = jnp.arange(t * tm, dtype=jnp.int32)
    gr = jnp.minimum(jnp.searchsorted(ends, r, side="right"), e - 1).astype(jnp.int32)
    item = jnp.clip(item_end[gr] - n_items_g[gr] + r // tm - first[gr], 0, static_items - 1)
    out = y[item, r % tm]
    live = r < ends[-1]
    return jnp.where(live[:, None], out, jnp.zeros((), out.dtype))


def ragged_qmatmul(x: jax.Array, w: MaybePacked, group_sizes: jax.Array, *, mode: str = "auto",
                   preferred_element_type: Any = None) -> jax.Array:
    """Grouped matmul over rows sorted by expert: ``x [M, K]``, ``W [E, K, N]``, ``group_sizes [E]`` -> ``[M, N]``.

    Rows ``offset[e] … offset[e] + group_sizes[e] - 1`` (``offset`` = exclusive cumsum) multiply ``W[e]``
    (the semantics of ``jax.lax.ragged_dot``); rows past ``sum(group_sizes)`` give 0. Only the experts with
    rows are read; no path dequantizes all E experts. ``jax.lax.ragged_dot`` itself is not used: on CPU (and,
    per docs/JAX_NOTES.md §5, on GPU) it lowers to a dense masked dot over all E groups (O(E) the work).
    Per row, the result is that row times its expert's (dequantized) weight, exactly as ``qmatmul`` computes
    it for one expert. The path is chosen statically by :func:`ragged_plan`.
    """
    check_mode(mode)
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"ragged_qmatmul needs x [M, K] and W [E, K, N], got {list(x.shape)} and {list(w.shape)}")
    if tuple(jnp.shape(group_sizes)) != (w.shape[0],):
        raise ValueError(f"group_sizes {list(jnp.shape(group_sizes))} must be [E] = [{w.shape[0]}]")
    m, e, n = x.shape[0], w.shape[0], w.shape[2]
    out_dt = x.dtype if preferred_element_type is None else preferred_element_type
    if m == 0:
        return jnp.zeros((0, n), out_dt)
    gs = jnp.asarray(group_sizes, jnp.int32)
    ends = jnp.cumsum(gs)
    plan = ragged_plan(x, w, mode=mode)
    if plan in ("indexed", "slots", "chunks"):
        row_expert = jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)
        live = row_expert < e
        ids = jnp.minimum(row_expert, e - 1)
        if plan == "indexed":
            y = indexed_qmatmul(x[:, None, :], w, ids, mode=mode, preferred_element_type=preferred_element_type)[:, 0]
        else:  # a fori_loop writing rows in place (measured faster on CPU than lax.map or an unrolled loop)
            def row(xi: jax.Array, ei: jax.Array) -> jax.Array:
                if plan == "chunks":
                    return _chunked_matmul(xi, cast(jax.Array, w), ei, preferred_element_type,
                                           _CHUNK_BYTES_ONE_ROW if m == 1 else _CHUNK_BYTES)
                return qmatmul(xi, _expert(w, ei), mode=mode, preferred_element_type=preferred_element_type)

            def one(i: jax.Array, out: jax.Array) -> jax.Array:
                yi = row(jax.lax.dynamic_slice_in_dim(x, i, 1), ids[i])
                return jax.lax.dynamic_update_slice_in_dim(out, yi.astype(out.dtype), i, 0)
            y = row(x, ids[0]).astype(out_dt) if m == 1 else jax.lax.fori_loop(0, m, one, jnp.zeros((m, n), out_dt))
        return jnp.where(live[:, None], y, jnp.zeros((), y.dtype))
    # work item = (tile of tm sorted rows, one expert whose rows overlap the tile); megablox's schedule
    tm = _ragged_tile(m, e)
    n_tiles = -(-m // tm)
    xp = jnp.pad(x, ((0, n_tiles * tm - m), (0, 0)))
    starts = ends - gs
    first = starts // tm
    n_items_g = jnp.where(gs > 0, (ends - 1) // tm - first + 1, 0)
    item_end = jnp.cumsum(n_items_g)
    n_items = item_end[-1]
    static_items = n_tiles + min(e, m) - 1  # ≥ the real count: tiles + one extra per group boundary
    if plan == "indexed_tiles":
        return _indexed_tiles(xp.reshape(n_tiles, tm, -1), w, ends, first, n_items_g, item_end, static_items,
                              mode=mode, preferred_element_type=preferred_element_type)[:m]
    rows = jnp.arange(tm, dtype=jnp.int32)

    def body(out: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        g = jnp.minimum(jnp.searchsorted(item_end, i, side="right"), e - 1).astype(jnp.int32)
        tile = first[g] + i - (item_end[g] - n_items_g[g])

        def work(out: jax.Array) -> jax.Array:
            r0 = tile * tm
            xt = jax.lax.dynamic_slice_in_dim(xp, r0, tm)
            yt = qmatmul(xt, _expert(w, g), mode=mode, preferred_element_type=preferred_element_type).astype(out.dtype)
            mine = ((r0 + rows) >= starts[g]) & ((r0 + rows) < ends[g])
            cur = jax.lax.dynamic_slice_in_dim(out, r0, tm)
            return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine[:, None], yt, cur), r0, 0)

        return jax.lax.cond(i < n_items, work, lambda o: o, out), None

    out0 = jnp.zeros((n_tiles * tm, n), out_dt)
    out, _ = jax.lax.scan(body, out0, jnp.arange(static_items, dtype=jnp.int32))
    return out[:m]
