"""Named `SwitchConfig` presets (docs/T5X_SWITCH.md §3 tables) plus small models for tests / MT.

``get_preset(name, **overrides)`` returns a fresh config; every field is tweakable by override.
"""

from __future__ import annotations

from typing import Any

from moqe_jax.config import SwitchConfig
from moqe_jax.errors import ConfigError

_BASE: dict[str, Any] = dict(
    vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
    encoder_sparse_step=2, decoder_sparse_step=2, activation="relu", tie_word_embeddings=True,
    max_group_size=8192, train_capacity_factor=1.25, eval_capacity_factor=2.0, min_expert_capacity=4,
)

PRESETS: dict[str, dict[str, Any]] = {
    **{f"switch-base-{e}": dict(_BASE, num_experts=e) for e in (8, 16, 32, 64, 128, 256)},
    "switch-large-128": dict(_BASE, d_model=1024, d_ff=4096, num_heads=16, num_layers=24, num_decoder_layers=24,
                             num_experts=128, max_group_size=4096),
    "switch-xxl-128": dict(_BASE, d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24,
                           num_experts=128, activation="gated-gelu", tie_word_embeddings=False,
                           max_group_size=4096, eval_capacity_factor=4.0, min_expert_capacity=2),
    "switch-c-2048": dict(_BASE, d_model=2080, d_ff=6144, num_heads=30, num_layers=15, num_decoder_layers=15,
                          num_experts=2048, encoder_sparse_step=1, decoder_sparse_step=1,
                          tie_word_embeddings=False, max_group_size=2048, train_capacity_factor=1.0,
                          eval_capacity_factor=2.0, min_expert_capacity=2),
    # Tiny model for unit tests (every code path: dense + sparse layers, relpos, tied logits).
    "tiny": dict(_BASE, vocab_size=128, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2,
                 num_decoder_layers=2, num_experts=4, max_group_size=64, min_expert_capacity=1),
    # The bundled MT model (trained by train/): 4+4 layers, 8 experts every other layer.
    "small-mt": dict(_BASE, vocab_size=8000, d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4,
                     num_decoder_layers=4, num_experts=8, max_group_size=4096, min_expert_capacity=4),
}
PRESETS["small-mt-dense"] = dict(PRESETS["small-mt"], encoder_sparse_step=0, decoder_sparse_step=0)


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> SwitchConfig:
    """Config for preset ``name`` with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    kw = dict(PRESETS[name], name=name)
    kw.update(overrides)
    try:
        return SwitchConfig(**kw)
    except TypeError as e:
        raise ConfigError(f"bad override for preset {name!r}: {e}") from None
