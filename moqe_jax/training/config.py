"""``TrainConfig``: the hyper-parameters of one training run (T5X Switch defaults, docs/T5X_SWITCH.md §3)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from moqe_jax.errors import ConfigError
from moqe_jax.packed.spec import QuantSpec, as_bits

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

    def validate(self) -> None:
        """Types and ranges of every numeric option (one-line `ConfigError` naming the option)."""
        def whole(name: str, lo: int, flag: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{flag} must be an integer >= {lo}, got {v!r}")

        whole("steps", 1, "steps (--steps)")
        whole("batch_size", 1, "batch size (--batch-size)")
        whole("warmup_steps", 0, "warmup steps (--warmup)")
        whole("log_every", 1, "log interval (--log-every)")
        whole("eval_every", 0, "eval interval (--eval-every)")
        whole("eval_batches", 0, "eval batches")
        whole("save_every", 0, "save interval (--save-every)")
        whole("keep", 1, "checkpoints to keep (--keep)")
        if self.tokens_per_batch is not None:
            whole("tokens_per_batch", 1, "tokens per batch (--tokens-per-batch)")
        lr = self.learning_rate
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"learning rate (--lr) must be a finite number > 0, got {lr!r}")
        for name in ("weight_decay", "z_loss", "aux_loss_factor", "router_z_loss_factor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.optimizer not in ("adafactor", "adamw"):
            raise ConfigError(f"optimizer must be adafactor or adamw, got {self.optimizer!r}")
        if self.schedule not in ("rsqrt", "constant", "cosine"):
            raise ConfigError(f"schedule must be rsqrt, constant or cosine, got {self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["qat_components"] = list(self.qat_components)
        return d

    def qat_spec(self) -> QuantSpec | None:
        if self.qat_bits is None:
            return None
        return QuantSpec(bits=as_bits(self.qat_bits), granularity=self.qat_granularity)
