"""Top-1 tokens-choose routing of Flaxformer's ``MoeLayer`` (docs/T5X_SWITCH.md §4.8), pure functions.

Static shape helpers (``maybe_pad_amounts``, ``num_groups``, ``expert_capacity``) work on Python ints
and are usable outside jit (e.g. by calibration code or NumPy references). ``top1_route`` works on
router probabilities ``[G, S, E]``.

Dropless dispatch (``routing_mode="dropless"``, and ``"hf"`` with its capacity as a mask): ``topk_choice``
picks ``k`` experts per token (``k = 1``: exactly ``top1_route``'s argmax and gate), ``sort_slots`` orders
the ``T·k`` token slots by expert (stable: token order inside an expert; slots whose expert is the sentinel
``E`` — dropped — sort last and belong to no group) and counts the group sizes, ``unsort_slots`` puts the
per-slot results back in slot order.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["maybe_pad_amounts", "num_groups", "expert_capacity", "group_layout", "top1_route", "Top1Routing",
           "hf_layout", "topk_choice", "sort_slots", "unsort_slots", "SortedSlots"]


def maybe_pad_amounts(batch: int, length: int, multiple: int) -> tuple[int, int]:
    """``(pad_batch, pad_seq)`` of Flaxformer ``_maybe_pad``: make ``B·L`` divisible by ``multiple`` = E·R.

    Minimal extra batch rows ``pb`` vs minimal extra sequence columns ``ps``; pad the batch dim iff
    ``ps·B > pb·L`` (ties pad the sequence). At most one of the two is non-zero.
    """
    t = batch * length
    if t % multiple == 0:
        return 0, 0
    pb = 1
    while (t + pb * length) % multiple:
        pb += 1
    ps = 1
    while (t + ps * batch) % multiple:
        ps += 1
    return (pb, 0) if ps * batch > pb * length else (0, ps)


def num_groups(num_tokens: int, max_group_size: int, num_experts: int, num_expert_replicas: int = 1) -> int:
    """Smallest ``G ≥ max(T // max_group_size, E·R)`` with ``T % G == 0`` and ``G % (E·R) == 0``."""
    n = num_experts * num_expert_replicas
    g = max(num_tokens // max_group_size, n)
    while g < num_tokens and not (num_tokens % g == 0 and g % n == 0):
        g += 1
    if num_tokens % g:
        raise ValueError(f"cannot split {num_tokens} tokens into groups for {n} experts×replicas")
    return g


def expert_capacity(group_size: int, num_experts: int, capacity_factor: float, min_expert_capacity: int) -> int:
    """``max(int(round(cf·S/E)), min_cap)`` with Python (banker's) rounding, spec §4.8 step 3."""
    return max(int(round(capacity_factor * group_size / num_experts)), min_expert_capacity)


class GroupLayout(NamedTuple):
    pad_batch: int
    pad_seq: int
    groups: int
    group_size: int
    capacity: int


def group_layout(batch: int, length: int, num_experts: int, *, max_group_size: int, capacity_factor: float,
                 min_expert_capacity: int, num_expert_replicas: int = 1) -> GroupLayout:
    """Padding, group count G, tokens per group S and capacity C for a ``[B, L]`` batch (t5x mode)."""
    pb, ps = maybe_pad_amounts(batch, length, num_experts * num_expert_replicas)
    t = (batch + pb) * (length + ps)
    g = num_groups(t, max_group_size, num_experts, num_expert_replicas)
    s = t // g
    return GroupLayout(pb, ps, g, s, expert_capacity(s, num_experts, capacity_factor, min_expert_capacity))


def hf_layout(batch: int, length: int, capacity: int) -> GroupLayout:
    """HF mode (spec §4.11): one group per sequence, fixed capacity."""
    return GroupLayout(0, 0, batch, length, capacity)


class Top1Routing(NamedTuple):
    expert: jax.Array  # [G, S] int32 chosen expert (argmax, lowest index on ties)
    gate: jax.Array  # [G, S] f32 probability of the chosen expert
    priority: jax.Array  # [G, S] int32 position in the chosen expert's queue (0-based, token order)
    kept: jax.Array  # [G, S] bool priority < capacity


def top1_route(probs: jax.Array, capacity: int) -> Top1Routing:
    """Top-1 tokens-choose with in-order priority per group (no BPR), spec §4.8 steps 5–6."""
    e = probs.shape[-1]
    expert, gate = (a[..., 0] for a in topk_choice(probs, 1))
    onehot = jax.nn.one_hot(expert, e, dtype=jnp.int32)
    prio = jnp.sum(jnp.cumsum(onehot, axis=-2) * onehot, axis=-1) - 1
    return Top1Routing(expert, gate, prio.astype(jnp.int32), prio < capacity)


def topk_choice(probs: jax.Array, k: int = 1) -> tuple[jax.Array, jax.Array]:
    """``(expert [..., k] int32, gate [..., k])``: the ``k`` most probable experts of each token, best first.

    ``k = 1`` is ``argmax`` (lowest index on ties) and its probability, the T5X router's choice (spec §4.8);
    ``k > 1`` uses ``lax.top_k`` (ties: lower index first).
    """
    if k == 1:
        expert = jnp.argmax(probs, axis=-1).astype(jnp.int32)[..., None]
        return expert, jnp.take_along_axis(probs, expert, axis=-1)
    gate, expert = jax.lax.top_k(probs, k)
    return expert.astype(jnp.int32), gate


class SortedSlots(NamedTuple):
    order: jax.Array  # [T·k] slot index (t·k + j) of each sorted position
    token: jax.Array  # [T·k] token index of each sorted position (order // k)
    group_sizes: jax.Array  # [E] int32 slots per expert (sentinel slots excluded)


def sort_slots(expert: jax.Array, num_experts: int) -> SortedSlots:
    """Sort the slots of ``expert [T, k]`` (values in ``[0, E]``, ``E`` = dropped) by expert, stably."""
    t, k = expert.shape
    flat = expert.reshape(t * k)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.sum(flat[:, None] == jnp.arange(num_experts, dtype=flat.dtype)[None, :], axis=0, dtype=jnp.int32)
    return SortedSlots(order, order // k, sizes)


def unsort_slots(y_sorted: jax.Array, order: jax.Array, k: int) -> jax.Array:
    """Per-slot results ``[T·k, D]`` in sorted order -> ``[T, k, D]`` in token/slot order."""
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    return y.reshape(-1, k, y.shape[-1])
