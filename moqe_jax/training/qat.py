"""Quantization-aware training (MoQE §4/§6): STE fine-tuning of chosen components, exported as packed weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moqe_jax.api import Model
from moqe_jax.packed.spec import QuantSpec, as_bits
from moqe_jax.quant.ste import export_qat
from moqe_jax.training.config import TrainConfig
from moqe_jax.training.data import TrainData
from moqe_jax.training.loop import TrainResult, train
from moqe_jax.tree import to_host

__all__ = ["qat_finetune"]


def qat_finetune(model: Model, data: TrainData, bits: int | str = 2, steps: int = 300, lr: float = 1e-3,
                 components: tuple[str, ...] = ("experts",), granularity: str | int = "channel",
                 out_dir: str | Path | None = None, seed: int = 0, batch_size: int = 32,
                 tokens_per_batch: int | None = 2048, mesh: dict[str, int] | None = None,
                 log: Any = None) -> tuple[Model, TrainResult]:
    """STE QAT of ``components`` of ``model`` → ``(Model with packed QuantizedTensor leaves, TrainResult)``."""
    tc = TrainConfig(steps=steps, batch_size=batch_size, tokens_per_batch=tokens_per_batch, optimizer="adafactor",
                     learning_rate=lr, schedule="constant", warmup_steps=0, seed=seed,
                     mesh=mesh or {"data": 1, "expert": 1, "model": 1}, log_every=25, eval_every=max(steps, 1),
                     eval_batches=4, save_every=max(steps // 2, 1), qat_bits=bits, qat_components=tuple(components),
                     qat_granularity=granularity)
    kw = {} if log is None else {"log": log}
    res = train(model.config, tc, data, out_dir, init_params=model.params, **kw)
    spec = QuantSpec(bits=as_bits(bits), granularity=granularity)
    return Model(model.config, export_qat(to_host(res.params), spec, components)), res
