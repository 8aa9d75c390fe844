"""Routing of Flaxformer's ``MoeLayer`` (docs/T5X_SWITCH.md §4.8, docs/ROUTING.md), pure functions.

Static shape helpers (``maybe_pad_amounts``, ``num_groups``, ``expert_capacity``) work on Python ints
and are usable outside jit (e.g. by calibration code or NumPy references). ``top1_route`` (the Switch
router), ``tokens_choose_route`` (``TokensChooseMaskedRouter``: top-k, batch-prioritized routing, padding
tokens ignored) and ``experts_choose_route`` (``ExpertsChooseMaskedRouter``) work on router probabilities
``[G, S, E]``; ``load_balancing_loss`` is Flaxformer's ``_load_balancing_loss`` for k choices.

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
           "tokens_choose_route", "TokensChooseRouting", "experts_choose_route", "ExpertsChooseRouting",
           "load_balancing_loss", "hf_layout", "topk_choice", "sort_slots", "unsort_slots", "SortedSlots"]


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


class TokensChooseRouting(NamedTuple):
    expert: jax.Array  # [G, S, k] int32 chosen experts, most probable first
    gate: jax.Array  # [G, S, k] f32 router probability of each chosen expert (not renormalised)
    priority: jax.Array  # [G, S, k] int32 position in that expert's buffer (-1: an ignored padding token)
    kept: jax.Array  # [G, S, k] bool 0 <= priority < capacity


def tokens_choose_route(probs: jax.Array, k: int, capacity: int, *, batch_prioritized: bool = False,
                        valid: jax.Array | None = None) -> TokensChooseRouting:
    """Flaxformer ``TokensChooseMaskedRouter`` over ``probs [G, S, E]`` (docs/ROUTING.md §2).

    Each token picks its ``k`` most probable experts. Buffer positions are handed out per group in one pass
    over the ``k·S`` (choice, token) slots, choice-major: every token's 1st choice before any 2nd choice; within
    a choice, token order, or with ``batch_prioritized`` descending top-1 probability (stable: ties keep token
    order). A slot is kept iff its position is below ``capacity``; a dropped 2nd choice does not affect the
    1st. ``valid [G, S]`` (``ignore_padding_tokens``): tokens with ``valid = False`` take no slot (priority
    -1, never kept) and, with BPR, sort last (their gate counts as 0). ``k = 1`` without BPR or ``valid`` is
    exactly ``top1_route``.
    """
    g, s, e = probs.shape
    expert, gate = topk_choice(probs, k)
    ex, ok = expert, valid
    if batch_prioritized:
        key = gate[..., 0] if valid is None else jnp.where(valid, gate[..., 0], 0.0)
        perm = jnp.argsort(-key, axis=-1, stable=True)  # [G, S]
        ex = jnp.take_along_axis(expert, perm[..., None], axis=1)
        ok = None if valid is None else jnp.take_along_axis(valid, perm, axis=1)
    flat = jnp.swapaxes(ex, 1, 2).reshape(g, k * s)  # choice-major slot order
    onehot = jax.nn.one_hot(flat, e, dtype=jnp.int32)  # [G, k·S, E]
    if ok is not None:
        onehot = onehot * jnp.tile(ok, (1, k)).astype(jnp.int32)[..., None]
    prio = jnp.sum(jnp.cumsum(onehot, axis=1) * onehot, axis=-1) - 1  # [G, k·S]
    prio = jnp.swapaxes(prio.reshape(g, k, s), 1, 2)  # [G, S, k]
    if batch_prioritized:
        prio = jnp.take_along_axis(prio, jnp.argsort(perm, axis=-1)[..., None], axis=1)
    prio = prio.astype(jnp.int32)
    kept = prio < capacity if valid is None else (prio >= 0) & (prio < capacity)
    return TokensChooseRouting(expert, gate, prio, kept)


class ExpertsChooseRouting(NamedTuple):
    token: jax.Array  # [G, E, C] int32 the tokens each expert takes, most probable first
    gate: jax.Array  # [G, E, C] f32 their router probability for that expert


def experts_choose_route(probs: jax.Array, capacity: int, valid: jax.Array | None = None) -> ExpertsChooseRouting:
    """Flaxformer ``ExpertsChooseMaskedRouter`` (docs/ROUTING.md §4): per group, each expert takes the
    ``capacity`` tokens with the highest probability for it (``lax.top_k`` over tokens: ties -> lower token
    index). ``valid`` multiplies the probabilities (padding is down-weighted to 0 but may still be taken)."""
    if capacity > probs.shape[1]:
        raise ValueError(f"experts-choose capacity {capacity} exceeds the {probs.shape[1]} tokens of a group")
    if valid is not None:
        probs = probs * valid[..., None].astype(probs.dtype)
    gate, token = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)
    return ExpertsChooseRouting(token.astype(jnp.int32), gate)


def load_balancing_loss(probs: jax.Array, expert: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Flaxformer ``_load_balancing_loss`` (spec §4.9) for ``expert [G, S, k]`` choices made before capacity:
    ``mean_{g,e}(f·P)·E²`` with ``f`` the fraction of a group's tokens that chose ``e`` among their ``k``
    choices and ``P`` the mean probability. ``valid = False`` tokens count with a zero row in both (the mean
    still divides by all ``S`` tokens, as Flaxformer's masked router)."""
    e = probs.shape[-1]
    mask = jnp.max(jax.nn.one_hot(expert, e, dtype=jnp.float32), axis=-2)  # [G, S, E]
    if valid is not None:
        mask = mask * valid[..., None]
        probs = probs * valid[..., None]
    return jnp.mean(jnp.mean(mask, axis=1) * jnp.mean(probs, axis=1)) * (e ** 2)


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
