"""Logical-axis sharding rules: the ONE place that maps parameter axes onto a device mesh (docs/ARCHITECTURE.md).

Parameters carry logical axis names derived from their T5X path (docs/T5X_SWITCH.md §2):
``embed`` (D), ``mlp`` (F), ``heads`` (the joined H·K axis of q/k/v/o and the H axis of the relative
bias), ``kv``, ``vocab`` (V) and ``expert`` (E). ``LOGICAL_RULES`` maps them onto the mesh axes
``data``, ``expert``, ``model`` (T5X / Flaxformer MoE partitioning):

* ``expert`` → ``expert``: expert ``i`` lives on one slice of the expert axis (expert parallelism);
* ``mlp``, ``heads``, ``vocab`` → ``model`` (tensor parallelism, only if the mesh has a ``model`` axis);
* ``embed``, ``kv`` → replicated;
* the batch → ``("data", "expert")``: as in T5X's MoE partitioner the expert axis is also a data axis
  for everything that is not an expert, so no device computes a replica of another's tokens.

Mesh axes missing from the mesh are dropped from the rules (replication). `check_fits` raises a
one-line `ConfigError` *before any compute* when a config cannot be laid out on a mesh.

Packed weights (``QuantizedTensor``, ``Sub1Tensor``) get a spec per array leaf: every leaf whose leading
axis is the logical expert axis is split over ``expert``, everything else inside a packed weight is
replicated (packed rows and groups never split across devices).

Activations. ``ACTIVATION_RULES`` is the logical-axis table of T5X's MoE partitioner (docs/PARTITIONING.md):
``batch`` → ``("data", "expert")``, ``expert`` → ``expert``, ``expert_replicas`` → ``data``, ``expert_mlp``
→ ``model``, ``unmodeled`` / ``length`` / ``embed`` → replicated. `constrain` applies
``jax.lax.with_sharding_constraint`` with these rules on the mesh that is *active*: the one set by
`activation_mesh` (a trace-time context, used by the train step) or by ``jax.set_mesh`` (outside ``jit``:
generation). Without an active mesh, or on a one-device mesh, `constrain` returns its input unchanged, so
single-device programs are bit-identical. `dispatch_to_experts` / `combine_from_experts` are the constraints
of the T5X capacity dispatch (Flaxformer ``MoeLayer._call_experts``): the token→expert exchange lowers to an
all-to-all over the ``expert`` mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moqe_jax.errors import ConfigError
from moqe_jax.packed import is_packed

__all__ = ["MESH_AXES", "LOGICAL_RULES", "BATCH_AXES", "parse_mesh", "make_mesh", "logical_axes", "param_axes",
           "logical_to_spec", "param_specs", "param_shardings", "batch_sharding", "replicated", "check_fits",
           "shard_batch", "ACTIVATION_RULES", "activation_mesh", "active_mesh", "activation_spec", "constrain",
           "dispatch_to_experts", "combine_from_experts", "batch_partitions", "expert_replicas_for",
           "expert_parallel_sorted"]

MESH_AXES: tuple[str, ...] = ("data", "expert", "model")
LOGICAL_RULES: dict[str, str | None] = {
    "expert": "expert", "mlp": "model", "heads": "model", "vocab": "model", "embed": None, "kv": None,
}
BATCH_AXES: tuple[str, ...] = ("data", "expert")

# (regex on the "/"-joined param path, logical axes per dim) — first match wins.
_PATH_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"token_embedder/embedding$", ("vocab", "embed")),
    (r"logits_dense/kernel$", ("embed", "vocab")),
    (r"relpos_bias/rel_embedding$", ("heads", None)),
    (r"mlp/expert/(wi|wi_0|wi_1)/kernel$", ("expert", "embed", "mlp")),
    (r"mlp/expert/wo/kernel$", ("expert", "mlp", "embed")),
    (r"mlp/router/router_weights/w/kernel$", ("embed", None)),
    (r"mlp/(wi|wi_0|wi_1)/kernel$", ("embed", "mlp")),
    (r"mlp/wo/kernel$", ("mlp", "embed")),
    (r"(query|key|value)/kernel$", ("embed", "heads")),
    (r"out/kernel$", ("heads", "embed")),
    (r"(scale)$", ("embed",)),
)


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=2,expert=2"`` (or a dict) → ordered ``{axis: size}`` over ``MESH_AXES``; default all 1."""
    if spec is None or spec == "":
        d: dict[str, int] = {}
    elif isinstance(spec, str):
        d = {}
        for part in spec.split(","):
            name, _, val = part.partition("=")
            name = name.strip()
            if name not in MESH_AXES or not val.strip().isdigit() or int(val) < 1:
                raise ConfigError(f"bad mesh spec {spec!r}: use e.g. 'data=2,expert=2' (axes {', '.join(MESH_AXES)})")
            d[name] = int(val)
    else:
        d = dict(spec)
        bad = [k for k in d if k not in MESH_AXES]
        if bad:
            raise ConfigError(f"unknown mesh axes {bad}; known: {', '.join(MESH_AXES)}")
    return {a: int(d.get(a, 1)) for a in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes ``data, expert, model`` (sizes from ``spec``) over the first devices."""
    sizes = parse_mesh(spec)
    devs = list(jax.devices() if devices is None else devices)
    n = math.prod(sizes.values())
    if n > len(devs):
        raise ConfigError(f"mesh {sizes} needs {n} devices but only {len(devs)} are available "
                          "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    arr = np.asarray(devs[:n], dtype=object).reshape(tuple(sizes.values()))
    return Mesh(arr, MESH_AXES)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a parameter from its T5X path (replicated if no rule matches)."""
    for pat, axes in _PATH_RULES:
        if re.search(pat, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def _path_str(kp: Sequence[Any]) -> str:
    parts = []
    for k in kp:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    return "/".join(parts)


def param_axes(params: Any) -> Any:
    """Tree of logical-axis tuples matching ``params`` (arrays or ShapeDtypeStructs); a packed weight gets
    the axes of its logical ``[*batch, K, N]`` shape."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: logical_axes(_path_str(kp), len(x.shape)), params,
                                            is_leaf=is_packed)


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                    where: str = "") -> P:
    """Partition spec for logical ``axes`` on ``mesh``; a mesh axis is used at most once."""
    used: set[str] = set()
    out: list[str | None] = []
    for i, a in enumerate(axes):
        m = LOGICAL_RULES.get(a) if a is not None else None
        if m is None or m not in mesh.shape or mesh.shape[m] == 1 or m in used:
            out.append(None)
            continue
        if shape is not None and shape[i] % mesh.shape[m]:
            raise ConfigError(f"{where or 'param'}: dim {i} ({a}={shape[i]}) is not divisible by mesh axis "
                              f"{m}={mesh.shape[m]}")
        used.add(m)
        out.append(m)
    return P(*out)


def _packed_specs(w: Any, axes: Sequence[str | None], mesh: Mesh, where: str) -> Any:
    """``w``'s pytree with a `PartitionSpec` per array leaf (see the module docstring)."""
    experts = w.shape[0] if axes and axes[0] == "expert" else None

    def one(a: Any) -> P:
        lead = ("expert",) if experts is not None and a.ndim and a.shape[0] == experts else (None,)
        return logical_to_spec(lead + (None,) * (a.ndim - 1), mesh, a.shape, where) if a.ndim else P()

    return jax.tree_util.tree_map(one, w)


def param_specs(params: Any, mesh: Mesh) -> Any:
    """Tree of `PartitionSpec` for a param tree (packed weights: a spec per array leaf)."""
    def spec(kp: Any, x: Any) -> Any:
        path = _path_str(kp)
        axes = logical_axes(path, len(x.shape))
        return _packed_specs(x, axes, mesh, path) if is_packed(x) else logical_to_spec(axes, mesh, x.shape, path)

    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=is_packed)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """Tree of `NamedSharding` for a param tree (experts over ``expert``, mlp/heads/vocab over ``model``)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of ``[B, L]`` batch arrays: B over ``("data", "expert")``."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, P(axes if axes else None, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh | Mapping[str, int]) -> int:
    shape = mesh.shape if isinstance(mesh, Mesh) else mesh
    return math.prod(int(shape.get(a, 1)) for a in BATCH_AXES)


def check_fits(cfg: Any, mesh: Mesh | Mapping[str, int], batch_rows: Sequence[int] = ()) -> None:
    """Raise `ConfigError` (one line) if ``cfg`` or the batch cannot be laid out on ``mesh``. No compute."""
    shape = dict(mesh.shape) if isinstance(mesh, Mesh) else parse_mesh(mesh)
    ex, mo = shape.get("expert", 1), shape.get("model", 1)
    has_experts = bool(cfg.sparse_layers("encoder") or cfg.sparse_layers("decoder"))
    if has_experts and cfg.num_experts % ex:
        raise ConfigError(f"num_experts={cfg.num_experts} is not divisible by the mesh expert axis ({ex})")
    if mo > 1:
        for name, val in (("d_ff", cfg.d_ff), ("num_heads*d_kv", cfg.num_heads * cfg.d_kv),
                          ("num_heads", cfg.num_heads), ("vocab_size", cfg.vocab_size)):
            if val % mo:
                raise ConfigError(f"{name}={val} is not divisible by the mesh model axis ({mo})")
    div = batch_divisor(shape)
    for rows in batch_rows:
        if rows % div:
            raise ConfigError(f"batch size {rows} is not divisible by the data-parallel size {div} "
                              f"(mesh data×expert = {shape.get('data', 1)}×{ex})")


def _index(v: np.ndarray, idx: Any) -> np.ndarray:
    return v[idx]


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a (globally identical on every process) NumPy batch on the mesh, rows over the data axes."""
    sh = batch_sharding(mesh)
    out: dict[str, jax.Array] = {}
    for k, v in batch.items():
        v = np.asarray(v)
        s = sh if v.ndim >= 1 else replicated(mesh)
        if v.ndim >= 1 and v.ndim != 2:
            s = NamedSharding(mesh, P(sh.spec[0], *([None] * (v.ndim - 1))))
        out[k] = jax.make_array_from_callback(v.shape, s, functools.partial(_index, v))
    return out


# ---- activations: the T5X MoE logical-axis rules ------------------------------------------------------------
# logical activation axis -> mesh axis (or axes, major first); t5x/contrib/moe/partitioning.py
# `standard_logical_axis_rules` with our batch order (docs/PARTITIONING.md)
ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,          # data parallel over data AND expert (T5X MoE partitioner)
    "expert": "expert",           # experts over the expert axis
    "expert_replicas": "data",    # the groups an expert receives: over the pure data axis
    "expert_mlp": "model",        # expert hidden (d_ff) over the model axis
    "mlp": "model", "heads": "model", "vocab": "model",
    "unmodeled": None, "length": None, "embed": None, "kv": None,
}

_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("moqe_activation_mesh", default=None)


def _trivial(mesh: Mesh | AbstractMesh | None) -> bool:
    return mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Make ``mesh`` the mesh `constrain` uses while tracing (may be entered inside ``jax.jit``; the caller
    keeps the jitted function per mesh). ``None`` or a one-device mesh: no constraints."""
    tok = _ACTIVE.set(None if _trivial(mesh) else mesh)
    try:
        yield
    finally:
        _ACTIVE.reset(tok)


def active_mesh() -> Mesh | AbstractMesh | None:
    """The mesh activation constraints apply to: `activation_mesh`'s, else ``jax.set_mesh``'s, else None."""
    m = _ACTIVE.get()
    if m is not None:
        return m
    am = jax.sharding.get_abstract_mesh()
    return None if _trivial(am) else am


def _mesh_axes(a: str | None, mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
    m = ACTIVATION_RULES.get(a) if a is not None else None
    if m is None:
        return ()
    names = (m,) if isinstance(m, str) else m
    return tuple(n for n in names if mesh.shape.get(n, 1) > 1)


def activation_spec(axes: Sequence[str | None], mesh: Mesh | AbstractMesh, shape: Sequence[int]) -> P:
    """`PartitionSpec` of an activation with logical ``axes`` on ``mesh``. A mesh axis is used at most once,
    and a dim keeps only the leading mesh axes whose product divides it (the rest: replicated)."""
    used: set[str] = set()
    out: list[Any] = []
    for a, n in zip(axes, shape, strict=True):
        keep: list[str] = []
        size = 1
        for m in _mesh_axes(a, mesh):
            if m in used or n % (size * mesh.shape[m]):
                break
            keep.append(m)
            size *= mesh.shape[m]
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` by logical ``axes`` on the active mesh; identity without one."""
    mesh = active_mesh()
    if mesh is None:
        return x
    spec = activation_spec(axes, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)


def batch_partitions(mesh: Mesh | AbstractMesh | Mapping[str, int] | None = None) -> int:
    """Number of data-parallel shards of the batch (``data × expert``) of ``mesh`` (default: the active one)."""
    if mesh is None:
        mesh = active_mesh()
        if mesh is None:
            return 1
    shape = mesh if isinstance(mesh, Mapping) else mesh.shape
    return math.prod(int(shape.get(a, 1)) for a in BATCH_AXES)


def expert_replicas_for(num_experts: int, mesh: Mesh | Mapping[str, int]) -> int:
    """The smallest ``num_expert_replicas`` R with ``E·R`` divisible by ``data × expert``: the T5X group count
    (a multiple of ``E·R``) then splits evenly over the batch shards, which the all-to-all dispatch needs
    (Flaxformer sets R = devices / (expert · model) from the device count; our config keeps R explicit)."""
    n = batch_partitions(mesh)
    return math.lcm(num_experts, n) // num_experts


def dispatch_to_experts(buf: jax.Array) -> jax.Array:
    """``[G, E, C, D]`` dispatched tokens (groups over the batch axes) -> ``[E, G·C, D]`` expert inputs
    (experts over ``expert``, groups over ``data``): the all-to-all of Flaxformer's ``_call_experts``.
    Without an active mesh this is exactly ``transpose(1, 0, 2, 3).reshape(E, G·C, D)``."""
    g, e, c, d = buf.shape
    buf = constrain(buf, ("batch", "unmodeled", "length", "embed"))
    out = buf.transpose(1, 0, 2, 3)
    out = constrain(out, ("expert", "expert_replicas", "length", "embed"))
    return constrain(out.reshape(e, g * c, d), ("expert", "expert_replicas", "embed"))


def combine_from_experts(out: jax.Array, groups: int) -> jax.Array:
    """``[E, G·C, D]`` expert outputs -> ``[G, E·C, D]`` per-group slots (the all-to-all back); without an
    active mesh exactly ``reshape(E, G, C, D).transpose(1, 0, 2, 3).reshape(G, E·C, D)``."""
    e, gc, d = out.shape
    c = gc // groups
    out = constrain(out, ("expert", "expert_replicas", "embed"))
    out = constrain(out.reshape(e, groups, c, d), ("expert", "expert_replicas", "length", "embed"))
    out = out.transpose(1, 0, 2, 3)
    out = constrain(out, ("batch", "unmodeled", "length", "embed"))
    return out.reshape(groups, e * c, d)


def expert_parallel_sorted(x_tok: jax.Array, e_tok: jax.Array, num_experts: int, run: Any,
                           expert_params: Any) -> jax.Array:
    """The sorted (``"dropless"`` / ``"hf"``) MoE exchange with experts split over the ``expert`` mesh axis.

    ``x_tok [T, D]`` tokens, ``e_tok [T, k]`` chosen experts (``num_experts`` = not dispatched); ``run(x, e,
    n, params)`` sorts ``x``'s slots by ``e`` (values in ``[0, n]``), runs the experts (``params``: the local
    expert weights, or None for the module's own) and returns the per-slot outputs ``[T, k, D]`` (0 for slots
    of expert ``n``). Without an active mesh (or when the expert axis is 1, ``E`` or ``T`` do not divide)
    this is exactly ``run(x_tok, e_tok, num_experts, None)``. On a mesh (``jax.shard_map``): the tokens of
    the expert-axis peers are all-gathered, each device runs its own ``E / expert`` experts on the slots that
    chose them, and a reduce-scatter returns every slot's output to its token's device (docs/PARTITIONING.md
    §3: the static, CPU-testable equivalent of a ragged all-to-all; only the slots' owner adds a non-zero).
    """
    mesh = active_mesh()
    x_ax = 1 if mesh is None else mesh.shape.get("expert", 1)
    t = x_tok.shape[0]
    if mesh is None or x_ax == 1 or num_experts % x_ax or t % batch_partitions(mesh):
        return run(x_tok, e_tok, num_experts, None)
    local = num_experts // x_ax
    bspec = activation_spec(("batch",), mesh, (t,))[0]

    def leaf_spec(a: Any) -> P:
        return P("expert") if a.ndim and a.shape[0] == num_experts else P()

    w_specs = jax.tree.map(leaf_spec, expert_params)

    def body(xl: jax.Array, el: jax.Array, wl: Any) -> jax.Array:
        xa = jax.lax.all_gather(xl, "expert", axis=0, tiled=True)
        ea = jax.lax.all_gather(el, "expert", axis=0, tiled=True)
        loc = ea - jax.lax.axis_index("expert") * local
        loc = jnp.where((loc >= 0) & (loc < local), loc, local)
        y = run(xa, loc, local, wl)
        return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(bspec), P(bspec), w_specs), out_specs=P(bspec),
                         check_vma=False)(x_tok, e_tok, expert_params)
