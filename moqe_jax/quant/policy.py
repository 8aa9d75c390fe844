"""Which parameters get quantized (MoQE §4: experts only by default; ablations add dense/attention).

A *plan* maps parameter paths (T5X target tree, docs/T5X_SWITCH.md §2) to the ``QuantSpec`` used for
each. Selection:

1. ``overrides`` (regex → spec or ``None``), searched on the ``/``-joined path in order; the first
   match wins, ``None`` keeps the parameter in float (e.g. ``{"decoder/": None}`` or
   ``{r"layers_1/mlp/expert": QuantSpec(8)}`` for a per-layer bit width);
2. otherwise a parameter is quantized with ``spec`` iff its component
   (:func:`moqe_jax.model.components.component_of`) is in ``components``.

``components`` ⊂ {experts, dense, self_attn, cross_attn, embeddings, logits, router, relpos};
the default is ``("experts",)``. The router and the relative-position table are quantized only
when named explicitly; norm scales (1-D) never. A requested component or an override that matches
no parameter raises :class:`QuantizationError` — the classic MoE-quantization bug is asking for
experts on a model that has none (or whose paths were renamed) and silently quantizing nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from moqe_jax.errors import QuantizationError
from moqe_jax.model.components import component_of
from moqe_jax.packed import is_packed
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.progress import progress
from moqe_jax.quant.rtn import LOG_MSE_STEPS, as_spec, quantize_tensor
from moqe_jax.tree import flatten_params, unflatten_params

__all__ = [
    "DEFAULT_COMPONENTS",
    "QUANTIZABLE_COMPONENTS",
    "parse_components",
    "plan_quantization",
    "quantize_params",
    "quantize_model_rtn",
]

DEFAULT_COMPONENTS: tuple[str, ...] = ("experts",)
QUANTIZABLE_COMPONENTS: tuple[str, ...] = ("experts", "dense", "self_attn", "cross_attn", "embeddings", "logits",
                                           "router", "relpos")
_ALIASES = {"attention": ("self_attn", "cross_attn"), "attn": ("self_attn", "cross_attn"),
            "expert": ("experts",), "ffn": ("dense",), "embedding": ("embeddings",)}


def parse_components(components: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise ``"experts,dense"`` / a list / aliases (``attention``) to component names."""
    if components is None:
        return DEFAULT_COMPONENTS
    if isinstance(components, str):
        components = [c for c in components.replace(" ", "").split(",") if c]
    out: list[str] = []
    for c in components:
        for name in _ALIASES.get(c, (c,)):
            if name == "norms":
                raise QuantizationError("norm scales are 1-D vectors and are never quantized; drop 'norms'")
            if name not in QUANTIZABLE_COMPONENTS:
                raise QuantizationError(f"unknown component {c!r}; choose from {', '.join(QUANTIZABLE_COMPONENTS)}")
            if name not in out:
                out.append(name)
    if not out:
        raise QuantizationError("no component to quantize (components is empty)")
    return tuple(out)


def _component(path: str) -> str | None:
    try:
        return component_of(path)
    except KeyError:
        return None


def plan_quantization(params: Any, spec: QuantSpec | None, components: str | Sequence[str] | None = DEFAULT_COMPONENTS,
                      overrides: Mapping[str, Any] | None = None) -> dict[str, QuantSpec]:
    """``{path: QuantSpec}`` of the parameters to quantize (see module docstring). Fails loudly."""
    comps = parse_components(components) if spec is not None else ()
    spec = None if spec is None else as_spec(spec)
    rules = []
    for pat, ospec in (overrides or {}).items():
        try:
            rules.append((pat, re.compile(pat), None if ospec is None else as_spec(ospec)))
        except re.error as e:
            raise QuantizationError(f"bad override regex {pat!r}: {e}") from None
    flat = flatten_params(params)
    hits = dict.fromkeys(comps, 0)
    rule_hits = {pat: 0 for pat, _, _ in rules}
    present: set[str] = set()
    plan: dict[str, QuantSpec] = {}
    for path, leaf in flat.items():
        if leaf is None:
            continue
        comp = _component(path)
        if comp:
            present.add(comp)
        if comp in hits:
            hits[comp] += 1
        chosen: QuantSpec | None = None
        matched = False
        for pat, rx, ospec in rules:
            if rx.search(path):
                rule_hits[pat] += 1
                chosen, matched = ospec, True
                break
        if not matched and comp in hits:
            chosen = spec
        if chosen is None:
            continue
        if comp == "norms" or len(getattr(leaf, "shape", ())) < 2:
            raise QuantizationError(f"{path}: a {len(getattr(leaf, 'shape', ()))}-D parameter cannot be quantized")
        if is_packed(leaf):
            raise QuantizationError(f"{path}: already quantized ({leaf!r}); quantize the float model instead")
        plan[path] = chosen
    for comp, n in hits.items():
        if n == 0:
            have = ", ".join(sorted(present)) or "none"
            raise QuantizationError(f"component {comp!r} matches no parameter of this model (components present: "
                                    f"{have}); e.g. quantizing experts of a dense model quantizes nothing")
    for pat, n in rule_hits.items():
        if n == 0:
            raise QuantizationError(f"override {pat!r} matches no parameter path")
    if not plan:
        raise QuantizationError("the quantization policy selects no parameter")
    return plan


def quantize_params(params: Any, spec: QuantSpec, components: str | Sequence[str] | None = DEFAULT_COMPONENTS, *,
                    overrides: Mapping[str, Any] | None = None, log_steps: int = LOG_MSE_STEPS,
                    plan: Mapping[str, QuantSpec] | None = None) -> Any:
    """RTN-quantize the selected leaves of a params tree -> new tree with ``QuantizedTensor`` leaves."""
    plan = dict(plan) if plan is not None else plan_quantization(params, spec, components, overrides)
    flat = flatten_params(params)
    for path in progress(list(plan), total=len(plan), desc="quantize"):
        flat[path] = quantize_tensor(flat[path], plan[path], name=path, log_steps=log_steps)
    return unflatten_params(flat)


def quantize_model_rtn(model: Any, spec: QuantSpec, components: str | Sequence[str] | None = DEFAULT_COMPONENTS,
                       **kw: Any) -> Any:
    """MoQE RTN: new ``Model`` (or params tree, if given one) with the selected weights quantized.

    Keyword args: ``overrides`` (regex → spec/None), ``log_steps`` (Marian refinement steps for
    ``scheme="log", mse=True``).
    """
    params = getattr(model, "params", model)
    new = quantize_params(params, spec, components, **kw)
    if params is model:
        return new
    if hasattr(model, "replace"):
        return model.replace(params=new)
    return type(model)(model.config, new)
