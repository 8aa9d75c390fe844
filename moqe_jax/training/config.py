"""``TrainConfig``: the hyper-parameters of one training run (T5X Switch defaults, docs/T5X_SWITCH.md §3)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moqe_jax.packed.spec import QuantSpec

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (defaults: T5X Switch, docs/T5X_SWITCH.md §3)."""

    steps: int = 1000
    batch_size: int = 32
    tokens_per_batch: int | None = None  # bucket-dependent rows (see moqe_jax.data.batching)
    optimizer: str = "adafactor"  # or "adamw"
    learning_rate: float = 0.01
    warmup_steps: int = 1000
    schedule: str = "rsqrt"  # rsqrt: lr·sqrt(warmup/max(step, warmup)) (T5X); "constant"; "cosine"
    weight_decay: float = 0.0
    z_loss: float = 1e-4
    aux_loss_factor: float = 0.01
    router_z_loss_factor: float = 0.0
    seed: int = 0
    mesh: dict[str, int] = field(default_factory=lambda: {"data": 1, "expert": 1, "model": 1})
    log_every: int = 50
    eval_every: int = 500
    eval_batches: int = 8
    save_every: int = 500
    keep: int = 3
    async_save: bool = True
    qat_bits: int | str | None = None
    qat_components: tuple[str, ...] = ("experts",)
    qat_granularity: str | int = "channel"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["qat_components"] = list(self.qat_components)
        return d

    def qat_spec(self) -> QuantSpec | None:
        if self.qat_bits is None:
            return None
        bits = self.qat_bits if self.qat_bits == "ternary" else int(self.qat_bits)
        return QuantSpec(bits=bits, granularity=self.qat_granularity)
