"""Routing-aware, layer-by-layer GPTQ calibration of a Switch model (QMoE §3, docs/QMOE.md §3.1–3.3).

Encoder layers first, then decoder layers, in model order. For each layer:

1. run every calibration batch through the layer with the (already compressed) earlier layers'
   outputs as input (:func:`moqe_jax.quant.layer_runner.run_layer`);
2. keep the tokens that count (:func:`moqe_jax.quant.hessians.token_mask`) and, for a sparse layer,
   those kept by the router's capacity rule;
3. GPTQ the layer's FFN from them (:func:`moqe_jax.quant.gptq_ffn.compress_ffn`: per-expert Hessians,
   batched solves) and write the ``QuantizedTensor`` into the params;
4. re-run the layer with its compressed params to produce the next layer's input, save the progress
   (``checkpoint_dir``), go on.

Only the current layer's activations are held (one ``[B, L, D]`` buffer per calibration batch).
Components other than experts and dense FFNs (attention, embeddings, ...) are RTN-quantized up front
(:mod:`moqe_jax.quant.policy`), so calibration activations flow through them as deployed.

Resume state goes through the project's checkpoint store (``moqe_jax.checkpoint.store``): one saved
directory per finished layer (``layer_<name>/``, its QuantizedTensors) and ``state/`` (the activations
after the last finished step; its manifest's ``progress`` entry, written last and renamed into place, is
the commit point). A killed run restarted on the same directory resumes to the identical result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax.calibration.batches import validate_batches
from moqe_jax.checkpoint import store
from moqe_jax.errors import CheckpointError, QuantizationError
from moqe_jax.model import layerwise
from moqe_jax.packed import is_packed
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.progress import progress
from moqe_jax.quant.calibration_report import CalibrationReport, LayerReport, peak_rss_mb
from moqe_jax.quant.gptq_ffn import GPTQOptions, compress_ffn
from moqe_jax.quant.hessians import default_special_min_id, token_mask
from moqe_jax.quant.layer_runner import run_layer, set_kernel
from moqe_jax.quant.policy import parse_components, quantize_params
from moqe_jax.quant.protocols import M
from moqe_jax.quant.rtn import as_spec
from moqe_jax.tree import flatten_params, unflatten_params

__all__ = ["gptq_quantize_model", "GPTQ_COMPONENTS"]

GPTQ_COMPONENTS = ("experts", "dense")


def _fingerprint(model: Any, spec: QuantSpec, batches: list[dict], opts: dict) -> str:
    """What a resumed run must share with the killed one: spec, options, config, calibration data and every
    byte of every weight (packed leaves: their stored arrays and metadata)."""
    h = hashlib.sha256()
    h.update(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(opts, sort_keys=True, default=str).encode())
    cfg = model.config
    h.update((cfg.to_json() if hasattr(cfg, "to_json") else repr(cfg)).encode())

    def arr(a: Any) -> None:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.name}{list(a.shape)}".encode())
        h.update(a.reshape(-1).view(np.uint8).data)

    for b in batches:
        for key in sorted(b):
            h.update(key.encode())
            arr(b[key])
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params, is_leaf=is_packed)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        if is_packed(leaf):
            arrays, meta = leaf.to_arrays()
            h.update(json.dumps(meta, sort_keys=True, default=str).encode())
            for name in sorted(arrays):
                if arrays[name] is not None:
                    h.update(name.encode())
                    arr(arrays[name])
        else:
            arr(leaf)
    return h.hexdigest()[:24]


def _mismatch_message(directory: str, st: Any, alternatives: Sequence[tuple[str, Callable[[], str]]],
                      hint: str) -> str:
    stored = st.get("fingerprint") if isinstance(st, dict) else None
    for fix, fn in alternatives if stored is not None else ():
        if fn() == stored:
            return (f"{directory}: holds a run of the same model/spec/calibration data with another option "
                    f"(fingerprint mismatch); to resume it, {fix}; or use a fresh --out/checkpoint dir or drop "
                    "--resume")
    return (f"{directory}: holds a run with another model/spec/calibration data (fingerprint mismatch); use a fresh "
            f"--out/checkpoint dir or drop --resume" + (f" ({hint})" if hint else ""))


class _Progress:
    """Per-layer progress under ``directory``, saved with the checkpoint store (see module docstring)."""

    def __init__(self, directory: str, fingerprint: str, resume: bool,
                 alternatives: Sequence[tuple[str, Callable[[], str]]] = (), hint: str = ""):
        """``alternatives``: ``(fix, fingerprint_fn)`` pairs tried only on a mismatch, so the error can name the one
        option that differs; ``hint``: appended when none matches."""
        self.dir = directory
        self.fp = fingerprint
        self.state_dir = os.path.join(directory, "state")
        self.state: dict | None = None
        if os.path.isdir(directory) and os.listdir(directory):
            try:
                man = store.read_manifest(self.state_dir)
            except CheckpointError:
                if os.path.isdir(self.state_dir):
                    raise
                man = None  # killed before the first step finished: nothing to resume
            if man is not None and resume:
                st = man.get("progress")
                if not isinstance(st, dict) or st.get("fingerprint") != fingerprint:
                    raise CheckpointError(_mismatch_message(directory, st, alternatives, hint))
                self.state = st
            elif not resume:
                shutil.rmtree(directory)
        os.makedirs(directory, exist_ok=True)

    def _layer_dir(self, name: str) -> str:
        return os.path.join(self.dir, "layer_" + name.replace("/", "_"))

    def save_layer(self, name: str, leaves: dict[str, Any]) -> None:
        store.save_params(unflatten_params(leaves), self._layer_dir(name), format="safetensors")

    def load_layer(self, name: str) -> dict[str, Any]:
        params, _ = store.load_params(self._layer_dir(name))
        return flatten_params(params)

    def save_step(self, step: int, stage: str, done_layers: list[str], reports: list[LayerReport],
                  hidden: list[Any], encoded: list[Any] | None) -> None:
        tree = {"hidden": {str(j): np.asarray(x) for j, x in enumerate(hidden)},
                "encoded": {str(j): np.asarray(x) for j, x in enumerate(encoded or [])}}
        prog = {"fingerprint": self.fp, "step": step, "stage": stage, "done_layers": done_layers,
                "reports": [dataclasses.asdict(r) for r in reports]}
        store.save_params(tree, self.state_dir, format="safetensors", extra={"progress": prog})

    def load_step(self) -> tuple[list[Any], list[Any] | None]:
        tree, _ = store.load_params(self.state_dir)

        def seq(d: dict | None) -> list[Any]:
            d = d or {}
            return [d[k] for k in sorted(d, key=int)]

        return seq(tree.get("hidden")), seq(tree.get("encoded")) or None


def gptq_quantize_model(model: M, spec: QuantSpec, calib: Iterable[dict], components: Sequence[str] = ("experts",),
                        checkpoint_dir: str | os.PathLike | None = None, max_tokens_factor: float = 4,
                        percdamp: float = 0.1, actorder: bool = False, group_experts: int = 16, mesh: Any = None, *,
                        blocksize: int = 128, true_sequential: bool = False, dead_inputs: str = "keep",
                        static_groups: bool = True,
                        special_token_min_id: int | None | Literal["auto"] = "auto", resume: bool = True,
                        on_layer_done: Callable[[str], None] | None = None) -> tuple[M, CalibrationReport]:
    """QMoE: compress ``model`` layer by layer with routing-aware GPTQ -> ``(new model, CalibrationReport)``.

    ``calib``: iterable of dicts of int arrays ``{"input_ids", "decoder_input_ids"}`` (+ optional
    ``attention_mask``/``decoder_attention_mask``), e.g. from :func:`moqe_jax.calibration_batches`.
    ``components``: ``experts`` and ``dense`` are solved with GPTQ; any other component named is
    RTN-quantized up front. ``checkpoint_dir``: progress is saved after every layer and a restarted call
    resumes where it stopped (same result; ``resume=False`` starts over). ``on_layer_done(name)`` is
    called after each layer's checkpoint. ``dead_inputs``: ``"keep"`` (QMoE ``batch_gptq``, default:
    inputs no calibration token activates are quantized like the others) or ``"zero"`` (gptq ``fasterquant``:
    their weights are zeroed; docs/QMOE.md §3.9); ``static_groups=False``
    recomputes group-wise grids during the solve (gptq's default with a group size).
    """
    t_start = time.time()
    spec = as_spec(spec)
    cfg = model.config
    comps = parse_components(components)
    rtn_comps = tuple(c for c in comps if c not in GPTQ_COMPONENTS)
    gptq_comps = tuple(c for c in comps if c in GPTQ_COMPONENTS)
    batches = validate_batches(calib, cfg.vocab_size)
    special = default_special_min_id(cfg.vocab_size) if isinstance(special_token_min_id, str) else special_token_min_id
    opts = GPTQOptions(max_tokens_factor=float(max_tokens_factor), percdamp=float(percdamp), actorder=bool(actorder),
                       group_experts=int(group_experts or 0), blocksize=int(blocksize),
                       true_sequential=bool(true_sequential), dead_inputs=str(dead_inputs),
                       static_groups=bool(static_groups))
    rep = CalibrationReport()
    params = model.params
    if rtn_comps:
        params = quantize_params(params, spec, rtn_comps)
    ckpt = None
    if checkpoint_dir is not None:
        def fp_for(o: GPTQOptions) -> str:
            fp_opts = {**dataclasses.asdict(o), "special": special, "components": list(comps)}
            # progress written before these options existed (dead inputs zeroed, static groups) stays resumable
            for key, default in (("dead_inputs", "zero"), ("static_groups", True)):
                if fp_opts[key] == default:
                    del fp_opts[key]
            return _fingerprint(model, spec, batches, fp_opts)

        # a mismatch that only the dead-input option explains is named (progress written before dead inputs were
        # kept by default was made with dead_inputs="zero")
        other = "zero" if opts.dead_inputs == "keep" else "keep"
        fix = f"pass --dead-inputs {other} (dead_inputs={other!r})"
        hint = ("progress written before dead inputs were kept by default resumes with --dead-inputs zero"
                if opts.dead_inputs == "keep" else "")
        ckpt = _Progress(os.fspath(checkpoint_dir), fp_for(opts), resume,
                         alternatives=[(fix, lambda: fp_for(dataclasses.replace(opts, dead_inputs=other)))], hint=hint)

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
                params = set_kernel(params, (*name.split("/"), *kname.split("/"), "kernel"), qt)
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
        assert encoded is not None
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

    for step in progress(range(start, len(steps)), total=len(steps) - start, desc="gptq layers"):
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
                _, info, dense_in = run_layer(cfg, stack, i, lp, jnp.asarray(hidden[j]), ctxs[j])
                if stack == "encoder":
                    m = masks_enc[j]
                else:
                    if len(masks_dec) <= j:
                        masks_dec.append(token_mask(b["decoder_input_ids"], np.asarray(ctxs[j]["valid"]), special,
                                                    decoder=True))
                    m = masks_dec[j]
                if sparse:
                    inp = np.asarray(info["inputs"], np.float32)
                    nonfinite = m & ~np.isfinite(inp).all(axis=-1)
                    if nonfinite.any():  # NaN router logits drop every token: name the cause, not "no token"
                        raise QuantizationError(
                            f"{lname}/mlp: NaN/inf activations in {int(nonfinite.sum())} of {int(m.sum())} "
                            "calibration tokens (the model's earlier layers produce non-finite values; check "
                            "its weights)")
                    # every (token, expert) pair the router dispatched (top-k, experts-choose; top-1: the kept
                    # tokens with their expert, in token order)
                    disp = np.asarray(info["dispatch"]) & m[..., None]
                    tok, ex = np.nonzero(disp.reshape(-1, disp.shape[-1]))
                    xs.append(np.asarray(info["inputs"], np.float32).reshape(-1, inp.shape[-1])[tok])
                    es.append(ex.astype(np.int64))
                else:
                    xs.append(np.asarray(dense_in, np.float32)[m])
                    es.append(np.zeros(int(m.sum()), np.int64))
            x_tok = np.concatenate(xs) if xs else np.zeros((0, cfg.d_model), np.float32)
            bad = ~np.isfinite(x_tok).all(axis=1)
            if bad.any():
                raise QuantizationError(
                    f"{lname}/mlp: NaN/inf activations in {int(bad.sum())} of {len(bad)} calibration tokens (the "
                    "model's earlier layers produce non-finite values; check its weights with `moqe info`)")
            e_tok = np.concatenate(es) if es else np.zeros((0,), np.int64)
            del xs, es
            name = f"{lname}/mlp"
            new, lrep = compress_ffn(lp["mlp"], sparse, x_tok, e_tok, spec, opts, name, mesh)
            del x_tok, e_tok
            for kname, qt in new.items():
                path = (stack, f"layers_{i}", "mlp", "expert", kname, "kernel") if sparse else \
                    (stack, f"layers_{i}", "mlp", kname, "kernel")
                params = set_kernel(params, path, qt)
            if ckpt is not None:
                ckpt.save_layer(name, {("expert/" + k if sparse else k): v for k, v in new.items()})
            done_layers.append(name)
            reports.append(lrep)
            lp = params[stack][f"layers_{i}"]
        # propagate through the (compressed) layer
        hidden = [run_layer(cfg, stack, i, lp, jnp.asarray(hidden[j]), ctxs[j])[0] for j in range(len(batches))]
        if ckpt is not None:
            ckpt.save_step(step, stack, done_layers, reports, hidden, encoded if stack == "decoder" else None)
        if on_layer_done is not None:
            on_layer_done(lname)

    rep.layers = reports
    rep.total_s = time.time() - t_start
    rep.peak_rss_mb = peak_rss_mb()
    return model.replace(params=params), rep
