"""Training: the one loop for Switch MoE / dense models and STE QAT of their experts (MoQE §3).

Modules: ``config`` (``TrainConfig``), ``data`` (batch sources), ``loss`` (T5X loss terms), ``optimizer``
(Adafactor / AdamW), ``loop`` (``train``, Orbax checkpoints, ``save_final_model``), ``distributed``
(multi-host start-up), ``qat`` (``qat_finetune``). Recipes and scripts live in the checkout's ``train/``.
"""

from moqe_jax.training.config import TrainConfig
from moqe_jax.training.data import MLMData, MTData, SyntheticData, TrainData, load_mlm_data, load_mt_data
from moqe_jax.training.distributed import maybe_init_distributed
from moqe_jax.training.loop import TrainResult, save_final_model, train
from moqe_jax.training.loss import cross_entropy_with_z_loss, make_loss_fn
from moqe_jax.training.optimizer import make_optimizer
from moqe_jax.training.qat import qat_finetune

__all__ = ["TrainConfig", "TrainData", "SyntheticData", "MTData", "MLMData", "load_mt_data", "load_mlm_data",
           "maybe_init_distributed", "train", "TrainResult", "save_final_model", "cross_entropy_with_z_loss",
           "make_loss_fn", "make_optimizer", "qat_finetune"]
