"""Per-device memory plan of a job (train, QAT, GPTQ, generation) on a mesh, from abstract shapes only.

Nothing is allocated: every tensor is a ``jax.ShapeDtypeStruct`` from ``jax.eval_shape`` (the model's
``init_params``, the optimizer's ``init``, the RTN packer, the VJP of the training loss), and every parameter
is split by the project's own rules (`moqe_jax.sharding.param_specs` on an abstract mesh of the requested
sizes). The categories and the exact accounting are in docs/MEMORY_PLAN.md; in short, per device:

* ``params``: float parameters as the step holds them (f32 master weights for train/QAT), sharded by the rules;
* ``packed params``: packed expert weights (generate: ``QuantizedTensor`` at ``bits``; sub1: a nominal
  bits/param, the stored size is data dependent);
* ``optimizer state``: the optimizer's slots, sharded like their parameter when the shape matches and
  replicated otherwise (the rule of `moqe_jax.training.loop`);
* ``gradients``: one gradient per parameter, sharded like it;
* ``weight copies``: the compute-dtype (and, for QAT, fake-quantized) copies of the weights the backward pass
  keeps, sharded like their parameter;
* ``activations``: the residuals of the loss's VJP that are not weights, divided over the data-parallel
  devices (data × expert) and, for tensors with an ``mlp``/``heads``/``vocab`` sized dim, over ``model``, plus
  the f32 gradient of the loss w.r.t. the logits;
* ``kv cache`` (generate): self-attention cache ``[B·beams, cache_len, H, d_kv]`` ×2 per decoder layer and the
  cross-attention keys/values of the encoder output;
* ``hessians`` / ``gptq work`` (gptq): one batched GPTQ call of the largest expert kernel (``wo``, K = d_ff):
  its Hessians ``[g, K, K]`` f32, weights, factor ``U`` and the solver's buffers, ``g`` experts per device.

`plan_memory` gives one mesh's plan; `suggest_mesh` the smallest mesh (fewest devices) that fits.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from moqe_jax import sharding as shd
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import ConfigError
from moqe_jax.packed import is_packed
from moqe_jax.packed.spec import QuantSpec

__all__ = ["JOBS", "CATEGORIES", "SUB1_BITS_PER_PARAM", "MemoryPlan", "parse_bytes", "format_bytes", "plan_memory",
           "suggest_mesh", "candidate_meshes"]

JOBS: tuple[str, ...] = ("train", "qat", "gptq", "generate")
CATEGORIES: tuple[str, ...] = ("params", "packed params", "optimizer state", "gradients", "weight copies",
                               "gathered experts", "activations", "batch", "kv cache", "hessians", "gptq work",
                               "outputs")
# QMoE's whole-model size of switch-c-2048 in its sub-1-bit format (docs/QMOE.md: 0.807 bits/param); a Sub1Tensor's
# stored size depends on the weights, so the plan uses this nominal rate for --bits sub1
SUB1_BITS_PER_PARAM = 0.807
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str | int | float) -> int:
    """``"80GB"`` (10⁹), ``"80GiB"`` (2³⁰), ``"512MiB"``, ``"1e9"`` → bytes; one-line `ConfigError` otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        val = float(text)
        unit = ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"--device-memory {text!r}: use a size such as 80GB, 80GiB or 16000MiB")
        val, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(val) or val <= 0:
        raise ConfigError(f"--device-memory {text!r}: must be a size > 0")
    return int(val * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Bytes as GiB/MiB/KiB with three significant digits (binary units, like device memory reports)."""
    for unit, f in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= f:
            return f"{n / f:.3g} {unit}"
    return f"{int(n)} B"


@dataclass
class MemoryPlan:
    """Per-device bytes by category of one job on one mesh (see the module docstring)."""

    config: str
    job: str
    mesh: dict[str, int]
    rows: dict[str, int]
    batch: int
    length: int
    bits: str | None = None
    device_memory: int | None = None
    suggestion: dict[str, int] | None = None
    suggestion_total: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total(self) -> int:
        return int(sum(self.rows.values()))

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "job": self.job, "mesh": dict(self.mesh), "devices": self.devices,
                "batch": self.batch, "length": self.length, "bits": self.bits,
                "per_device_bytes": dict(self.rows), "total_bytes": self.total,
                "device_memory_bytes": self.device_memory, "fits": self.fits,
                "suggested_mesh": self.suggestion, "suggested_total_bytes": self.suggestion_total,
                "suggested_devices": None if self.suggestion is None else math.prod(self.suggestion.values()),
                "notes": list(self.notes)}

    def table(self) -> str:
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        bits = f", bits {self.bits}" if self.bits else ""
        shape = "" if self.job == "gptq" else f", batch {self.batch} × length {self.length}"
        lines = [f"{self.config} {self.job}: mesh {mesh} ({self.devices} devices){shape}{bits}",
                 f"{'per device':<18}{'bytes':>18}{'':>4}"]
        for k, v in self.rows.items():
            if v:
                lines.append(f"  {k:<16}{v:>18,}  {format_bytes(v):>10}")
        lines.append(f"  {'total':<16}{self.total:>18,}  {format_bytes(self.total):>10}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{verdict} in {format_bytes(self.device_memory)} ({self.device_memory:,} bytes) per device")
        if self.suggestion is not None and not self.fits:
            sm = ",".join(f"{k}={v}" for k, v in self.suggestion.items())
            lines.append(f"smallest mesh that fits: {sm} ({math.prod(self.suggestion.values())} devices, "
                         f"{format_bytes(self.suggestion_total or 0)} per device)")
        elif self.device_memory is not None and not self.fits:
            lines.append("no mesh up to the search limit fits (see --max-devices)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- abstract shapes (computed once per config and job; meshes only change the arithmetic) -------------------
def _nbytes(x: Any) -> int:
    return int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def _abstract_mesh(sizes: Mapping[str, int]) -> Any:
    """A device-less mesh of ``sizes``: the sharding rules read only ``mesh.shape``, so an ``AbstractMesh``
    plans meshes far larger than the machine (typed Any: the rules annotate ``Mesh``)."""
    return AbstractMesh(tuple(int(sizes[a]) for a in shd.MESH_AXES), shd.MESH_AXES)


def _shard_bytes(x: Any, spec: P, sizes: Mapping[str, int]) -> int:
    """Bytes of ``x``'s largest shard under ``spec`` (uneven splits round up, as XLA pads)."""
    dims = list(x.shape)
    for i, ax in enumerate(tuple(spec)[:len(dims)]):
        names = (ax,) if isinstance(ax, str) else tuple(ax or ())
        div = math.prod(int(sizes.get(n, 1)) for n in names)
        dims[i] = -(-dims[i] // div)
    return int(math.prod(dims)) * jnp.dtype(x.dtype).itemsize


def _tree_bytes(tree: Any, sizes: Mapping[str, int]) -> int:
    """Per-device bytes of a (float or packed) param tree laid out by `moqe_jax.sharding.param_specs`."""
    specs = shd.param_specs(tree, _abstract_mesh(sizes))
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    return sum(_shard_bytes(x, s, sizes) for x, s in zip(leaves, spec_leaves, strict=True))


def _param_index(params: Any) -> dict[tuple[int, ...], list[str]]:
    out: dict[tuple[int, ...], list[str]] = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        out.setdefault(tuple(x.shape), []).append(jax.tree_util.keystr(kp))
    return out


def _param_specs_by_key(params: Any, sizes: Mapping[str, int]) -> dict[str, P]:
    specs = shd.param_specs(params, _abstract_mesh(sizes))
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0]
    return {jax.tree_util.keystr(kp): s for kp, s in flat}


@dataclass
class _Abstract:
    params: Any                       # float param tree (ShapeDtypeStruct leaves)
    opt: list[tuple[Any, str | None]] = field(default_factory=list)   # (slot, param key it is sharded like)
    weight_res: list[tuple[Any, str]] = field(default_factory=list)   # (residual, param key)
    act_res: list[tuple[Any, bool]] = field(default_factory=list)     # (residual, has a model-split dim)
    packed: Any = None                # generate: the packed param tree


def _model_dims(cfg: SwitchConfig) -> set[int]:
    """Dim sizes of the logical axes ``mlp``, ``heads``, ``vocab`` (split over ``model``); a size that is also
    d_model or d_kv is ambiguous and left out (such a tensor is counted as not split)."""
    return {cfg.d_ff, cfg.num_heads, cfg.vocab_size} - {cfg.d_model, cfg.d_kv}


def _batch_structs(batch: int, length: int) -> dict[str, Any]:
    b = {k: jax.ShapeDtypeStruct((batch, length), jnp.int32) for k in ("input_ids", "decoder_input_ids", "targets")}
    b["weights"] = jax.ShapeDtypeStruct((batch, length), jnp.float32)
    return b


@functools.lru_cache(maxsize=16)
def _abstract(cfg: SwitchConfig, job: str, batch: int, length: int, bits: str | None, optimizer: str) -> _Abstract:
    from moqe_jax.model.switch import init_params

    params = jax.eval_shape(lambda: init_params(cfg, 0))
    ab = _Abstract(params=params)
    if job in ("train", "qat"):
        from moqe_jax.training.config import TrainConfig
        from moqe_jax.training.loss import make_loss_fn
        from moqe_jax.training.optimizer import make_optimizer

        tc = TrainConfig(optimizer=optimizer, qat_bits=_qat_bits(bits) if job == "qat" else None)
        tx = make_optimizer(tc)
        by_shape = {jax.tree_util.keystr(kp): tuple(x.shape)
                    for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        for kp, x in jax.tree_util.tree_flatten_with_path(jax.eval_shape(tx.init, params))[0]:
            ks = jax.tree_util.keystr(kp)  # the loop's rule: the param's sharding when the shape matches
            match = next((pk for pk, shp in by_shape.items() if ks.endswith(pk) and tuple(x.shape) == shp), None)
            ab.opt.append((x, match))
        loss_fn = make_loss_fn(cfg, tc, train=True)
        bt = _batch_structs(batch, length)
        vjp = jax.eval_shape(lambda p, b: jax.vjp(lambda q: loss_fn(q, b), p, has_aux=True)[1], params, bt)
        index = _param_index(params)
        mdims = _model_dims(cfg)
        for r in jax.tree.leaves(vjp):
            keys = index.get(tuple(r.shape))
            if keys and len(r.shape) >= 2:
                ab.weight_res.append((r, keys[0]))
            else:
                ab.act_res.append((r, any(d in mdims for d in r.shape)))
    if job == "generate":
        ab.packed = _packed_params(cfg, params, bits)
    return ab


def _qat_bits(bits: str | None) -> int | str:
    if bits in (None, "sub1", "ternary"):
        return "ternary" if bits else 2
    return int(bits)


def _packed_params(cfg: SwitchConfig, params: Any, bits: str | None) -> Any:
    """Expert kernels as the packed leaves `moqe quantize` writes (RTN packer on abstract shapes)."""
    from moqe_jax.quant.policy import quantize_params

    b: Any = "ternary" if bits in ("sub1", "ternary") else int(bits or 4)
    spec = QuantSpec(bits=b)
    return jax.eval_shape(lambda p: quantize_params(p, spec, ("experts",)), params)


# ---- per-mesh arithmetic ----------------------------------------------------------------------------------------
def _check_mesh(cfg: SwitchConfig, sizes: Mapping[str, int], batch: int, job: str) -> None:
    shd.check_fits(cfg, sizes, () if job == "gptq" else (batch,))


def _training_rows(cfg: SwitchConfig, ab: _Abstract, sizes: Mapping[str, int], batch: int,
                   length: int) -> dict[str, int]:
    specs = _param_specs_by_key(ab.params, sizes)
    flat = {jax.tree_util.keystr(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(ab.params)[0]}
    p_bytes = sum(_shard_bytes(x, specs[k], sizes) for k, x in flat.items())
    opt = sum(_shard_bytes(x, specs[k] if k else P(), sizes) for x, k in ab.opt)
    wcopy = sum(_shard_bytes(x, specs[k], sizes) for x, k in ab.weight_res)
    dp = shd.batch_divisor(sizes)
    mo = int(sizes.get("model", 1))
    act = sum(-(-_nbytes(x) // (dp * (mo if split else 1))) for x, split in ab.act_res)
    # + the loss's gradient w.r.t. the f32 logits [B, L, V], live with the residuals when the backward starts
    act += -(-batch // dp) * length * -(-cfg.vocab_size // mo) * 4
    b_bytes = -(-sum(_nbytes(x) for x in _batch_structs(batch, length).values()) // dp)
    return {"params": p_bytes, "optimizer state": opt, "gradients": p_bytes, "weight copies": wcopy,
            "activations": act, "batch": b_bytes}


def _generate_rows(cfg: SwitchConfig, ab: _Abstract, sizes: Mapping[str, int], batch: int, length: int,
                   bits: str | None, decode_length: int, num_beams: int) -> tuple[dict[str, int], list[str]]:
    notes: list[str] = []
    leaves = jax.tree_util.tree_flatten_with_path(ab.packed, is_leaf=is_packed)[0]
    specs = jax.tree.leaves(shd.param_specs(ab.packed, _abstract_mesh(sizes)), is_leaf=lambda s: isinstance(s, P))
    floats = packed = 0
    it = iter(specs)
    gathered = 0  # the largest packed expert kernel, whole (the decode step gathers it on every device)
    for _, x in leaves:
        if is_packed(x):
            arrs = jax.tree.leaves(x)
            pb = sum(_shard_bytes(a, next(it), sizes) for a in arrs)
            if bits == "sub1":
                pb = int(math.ceil(math.prod(x.shape) * SUB1_BITS_PER_PARAM / 8 / int(sizes.get("expert", 1))))
            packed += pb
            whole = sum(_nbytes(a) for a in arrs) if bits != "sub1" else pb * int(sizes.get("expert", 1))
            gathered = max(gathered, whole)
        else:
            floats += _shard_bytes(x, next(it), sizes)
    if bits == "sub1":
        notes.append(f"sub1 packed size is nominal ({SUB1_BITS_PER_PARAM} bits/param, QMoE's c2048 rate): the "
                     "stored size depends on the weights")
    dp = shd.batch_divisor(sizes)
    mo = int(sizes.get("model", 1))
    rows_loc = -(-batch * num_beams // dp)
    heads_loc = -(-cfg.num_heads // mo)
    itemsize = jnp.dtype(cfg.jnp_dtype).itemsize
    per_pos = 2 * heads_loc * cfg.d_kv * itemsize * rows_loc * cfg.num_decoder_layers
    kv = per_pos * (decode_length + length)  # self cache + cross-attention k/v of the encoder output
    enc = rows_loc * length * cfg.d_model * itemsize * 4  # encoder output, residual stream, norms (bf16)
    logits = rows_loc * -(-cfg.vocab_size // mo) * 4 * 2
    out = rows_loc * decode_length * 4
    notes.append("generate: the decode step gathers each packed expert kernel on every device (2 kernels live) "
                 "and keeps compute-dtype/layout copies of the float weights (measured on XLA:CPU, "
                 "docs/MEMORY_PLAN.md)")
    return {"params": floats, "packed params": packed, "weight copies": floats, "gathered experts": 2 * gathered,
            "kv cache": kv, "activations": enc + logits, "outputs": out}, notes


def _gptq_rows(cfg: SwitchConfig, sizes: Mapping[str, int], group_experts: int) -> tuple[dict[str, int], list[str]]:
    """One batched GPTQ call of the largest kernel (``wo``: K = d_ff, N = d_model; or wi when d_model is larger)."""
    e = cfg.num_experts if (cfg.sparse_layers("encoder") or cfg.sparse_layers("decoder")) else 1
    ndev = int(sizes.get("expert", 1))
    grp = e if not group_experts else min(group_experts, e)
    g_loc = -(-grp // ndev)  # gptq_quantize pads the group to a multiple of the expert axis
    k, n = max((cfg.d_ff, cfg.d_model), (cfg.d_model, cfg.d_ff))
    h = g_loc * k * k * 4
    w = g_loc * k * n * 4
    # XLA:CPU buffers of the batched solve, measured (docs/MEMORY_PLAN.md): per expert the factor U [K, K] f32
    # and a [K, K] mask (4.5 B per K² entry) plus 18 B per K² entry of the one-at-a-time factorization's work;
    # with one expert per device the batch axis disappears and XLA needs 12 B per K² entry in all
    work = 12 * k * k if g_loc == 1 else g_loc * 9 * k * k // 2 + 18 * k * k
    out = g_loc * (k * n + 3 * n * 4 + 16)  # uint8 codes, scales/zeros, loss, flags
    notes = [f"GPTQ: {g_loc} expert(s) per device per call ({grp} per call, --group-experts), K={k}, N={n}; "
             f"the host holds the layer's float kernels and Hessians ({format_bytes(_gptq_host(cfg, grp))})"]
    return {"hessians": h, "params": w, "gptq work": work, "outputs": out}, notes


def _gptq_host(cfg: SwitchConfig, grp: int) -> int:
    e = cfg.num_experts
    kernels = (3 if cfg.gated else 2) * e * cfg.d_model * cfg.d_ff * 4
    return kernels + grp * (cfg.d_model ** 2 + cfg.d_ff ** 2) * 4


def plan_memory(cfg: SwitchConfig, mesh: str | Mapping[str, int], job: str, *, batch: int = 32, length: int = 512,
                bits: str | int | None = None, decode_length: int | None = None, num_beams: int = 1,
                group_experts: int = 16, optimizer: str = "adafactor",
                device_memory: int | str | None = None, suggest: bool = True,
                max_devices: int = 65536) -> MemoryPlan:
    """The per-device memory plan of ``job`` for ``cfg`` on ``mesh`` (module docstring); with ``device_memory``
    says whether it fits and, if not and ``suggest``, the smallest mesh that does."""
    if job not in JOBS:
        raise ConfigError(f"unknown job {job!r}: use one of {', '.join(JOBS)}")
    sizes = shd.parse_mesh(mesh)
    bits_s = _bits(bits, job)
    for name, v in (("--batch", batch), ("--length", length), ("--num-beams", num_beams)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    dlen = decode_length if decode_length is not None else length
    if not isinstance(dlen, int) or dlen < 1:
        raise ConfigError(f"--decode-length must be an integer >= 1, got {dlen!r}")
    if optimizer not in ("adafactor", "adamw"):
        raise ConfigError(f"--optimizer must be adafactor or adamw, got {optimizer!r}")
    cfg.validate()
    _check_mesh(cfg, sizes, batch, job)
    mem = parse_bytes(device_memory) if device_memory is not None else None
    rows, notes = _rows(cfg, sizes, job, batch, length, bits_s, dlen, num_beams, group_experts, optimizer)
    plan = MemoryPlan(cfg.name, job, sizes, {k: rows.get(k, 0) for k in CATEGORIES if k in rows}, batch, length,
                      bits_s, mem, notes=notes)
    if mem is not None and not plan.fits and suggest:
        found = suggest_mesh(cfg, job, mem, batch=batch, length=length, bits=bits_s, decode_length=dlen,
                             num_beams=num_beams, group_experts=group_experts, optimizer=optimizer,
                             max_devices=max_devices)
        if found is not None:
            plan.suggestion, plan.suggestion_total = found
    return plan


def _bits(bits: str | int | None, job: str) -> str | None:
    if job == "train":
        return None
    b = str(bits if bits is not None else {"qat": 2, "gptq": 2, "generate": 4}[job])
    if b not in ("8", "4", "3", "2", "ternary", "sub1"):
        raise ConfigError(f"--bits {bits!r}: use 8, 4, 3, 2, ternary or sub1")
    return b


def _rows(cfg: SwitchConfig, sizes: Mapping[str, int], job: str, batch: int, length: int, bits: str | None,
          dlen: int, num_beams: int, group_experts: int, optimizer: str) -> tuple[dict[str, int], list[str]]:
    if job in ("train", "qat"):
        ab = _abstract(cfg, job, batch, length, bits, optimizer)
        notes = ["QAT: params are the float master weights (f32), trained through fake-quantized experts (STE)"] \
            if job == "qat" else []
        return _training_rows(cfg, ab, sizes, batch, length), notes
    if job == "generate":
        ab = _abstract(cfg, job, batch, length, bits, optimizer)
        return _generate_rows(cfg, ab, sizes, batch, length, bits, dlen, num_beams)
    return _gptq_rows(cfg, sizes, group_experts)


def candidate_meshes(cfg: SwitchConfig, job: str, batch: int, max_devices: int = 65536) -> Iterable[dict[str, int]]:
    """Meshes (powers of two per axis) the config can be laid out on, fewest devices first."""
    out = []
    n = 1
    while n <= max_devices:
        for e in _pow2_upto(n):
            for m in _pow2_upto(n // e):
                d = n // (e * m)
                sizes = {"data": d, "expert": e, "model": m}
                try:
                    _check_mesh(cfg, sizes, batch, job)
                except ConfigError:
                    continue
                if job == "gptq" and (d > 1 or m > 1):
                    continue  # GPTQ shards experts only
                out.append(sizes)
        n *= 2
    return out


def _pow2_upto(n: int) -> list[int]:
    return [1 << i for i in range(n.bit_length()) if (1 << i) <= n and n % (1 << i) == 0]


def suggest_mesh(cfg: SwitchConfig, job: str, device_memory: int, *, batch: int = 32, length: int = 512,
                 bits: str | None = None, decode_length: int | None = None, num_beams: int = 1,
                 group_experts: int = 16, optimizer: str = "adafactor",
                 max_devices: int = 65536) -> tuple[dict[str, int], int] | None:
    """``(mesh, per-device total)`` of the fewest-device mesh that fits ``device_memory`` (ties: the smallest
    total), or None when none up to ``max_devices`` does."""
    dlen = decode_length if decode_length is not None else length
    best: tuple[int, int, dict[str, int]] | None = None
    for sizes in candidate_meshes(cfg, job, batch, max_devices):
        n = math.prod(sizes.values())
        if best is not None and n > best[0]:
            break
        rows, _ = _rows(cfg, sizes, job, batch, length, bits, dlen, num_beams, group_experts, optimizer)
        tot = int(sum(rows.values()))
        if tot <= device_memory and (best is None or tot < best[1]):
            best = (n, tot, sizes)
    return None if best is None else (best[2], best[1])
