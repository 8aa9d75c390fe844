"""HF config fidelity (issue 16, finding 9): every field of transformers' own ``SwitchTransformersConfig`` that
``SwitchConfig.from_hf`` reads is read faithfully, the rest are ignored on purpose or rejected with one line."""

from __future__ import annotations

import pytest
from transformers import SwitchTransformersConfig

from moqe_jax.config import SwitchConfig
from moqe_jax.errors import ConfigError


def _hf(**kw) -> dict:
    return SwitchTransformersConfig(**kw).to_dict()


@pytest.mark.parametrize("hf_field,value,ours,expected", [
    ("vocab_size", 333, "vocab_size", 333),
    ("d_model", 96, "d_model", 96),
    ("d_kv", 24, "d_kv", 24),
    ("d_ff", 160, "d_ff", 160),
    ("num_heads", 3, "num_heads", 3),
    ("num_layers", 6, "num_layers", 6),
    ("num_decoder_layers", 4, "num_decoder_layers", 4),
    ("num_experts", 16, "num_experts", 16),
    ("expert_capacity", 32, "hf_expert_capacity", 32),
    ("num_sparse_encoder_layers", 6, "encoder_sparse_step", 2),
    ("num_sparse_decoder_layers", 0, "decoder_sparse_step", 0),
    ("relative_attention_num_buckets", 16, "relative_attention_num_buckets", 16),
    ("relative_attention_max_distance", 64, "relative_attention_max_distance", 64),
    ("layer_norm_epsilon", 1e-5, "layer_norm_epsilon", 1e-5),
    ("tie_word_embeddings", False, "tie_word_embeddings", False),
    ("pad_token_id", 3, "pad_token_id", 3),
    ("eos_token_id", 0, "eos_token_id", 0),
    ("eos_token_id", [2], "eos_token_id", 2),
    ("decoder_start_token_id", 5, "decoder_start_token_id", 5),
    ("router_z_loss_coef", 0.002, "router_z_loss_factor", 0.002),
    ("router_aux_loss_coef", 0.02, "aux_loss_factor", 0.02),
    ("dense_act_fn", "relu", "activation", "relu"),
])
def test_field_read_faithfully(hf_field, value, ours, expected):
    d = _hf(**{hf_field: value})
    assert d[hf_field] == value  # transformers keeps the value we test
    assert getattr(SwitchConfig.from_hf(d), ours) == expected


@pytest.mark.parametrize("hf_field,value,msg", [
    ("dense_act_fn", "gelu", "dense_act_fn"),
    ("dense_act_fn", "gelu_new", "dense_act_fn"),
    ("router_bias", "yes", "router_bias"),
    ("router_dtype", "bfloat16", "router_dtype"),
    ("is_encoder_decoder", False, "is_encoder_decoder"),
    ("eos_token_id", [1, 2], "eos_token_id"),
    ("vocab_size", "big", "vocab_size"),
    ("num_heads", 2.5, "num_heads"),
    ("layer_norm_epsilon", "tiny", "layer_norm_epsilon"),
])
def test_unsupported_or_bad_field_rejected(hf_field, value, msg):
    d = _hf()
    d[hf_field] = value
    with pytest.raises(ConfigError, match=msg) as ei:
        SwitchConfig.from_hf(d)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("field", ["dropout_rate", "initializer_factor", "use_cache", "add_router_probs"])
def test_training_only_fields_ignored(field):
    base = SwitchConfig.from_hf(_hf())
    d = _hf()
    d[field] = 0.5 if isinstance(d[field], float) else (not d[field])
    assert SwitchConfig.from_hf(d) == base


@pytest.mark.parametrize("field,value", [("router_jitter_noise", 0.25), ("router_ignore_padding_tokens", True),
                                         ("router_bias", True)])
def test_router_fields_carried(field, value):
    """The router options HF's config defines are read (docs/ROUTING.md) and written back by ``to_hf``."""
    d = _hf()
    d[field] = value
    cfg = SwitchConfig.from_hf(d)
    assert getattr(cfg, field) == value and cfg.to_hf()[field] == value


def test_gated_roundtrip_and_feed_forward_proj():
    cfg = SwitchConfig.preset("tiny", activation="gated-gelu")
    assert SwitchConfig.from_hf(cfg.to_hf()).activation == "gated-gelu"
    d = _hf()
    d.pop("dense_act_fn")
    d["feed_forward_proj"] = "gated-gelu"
    assert SwitchConfig.from_hf(d).activation == "gated-gelu"
    d = _hf()
    assert SwitchConfig.from_hf(d) == SwitchConfig.from_hf({**d, "model_type": "switch_transformers"})
