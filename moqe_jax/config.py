"""`SwitchConfig`: the frozen description of a Switch Transformer (docs/T5X_SWITCH.md §2–§3).

Field names follow Hugging Face's ``SwitchTransformersConfig`` where HF has the concept; the rest
(sparse-layer rule, gated activation, grouping / capacity, routing mode, dtype) are ours because
HF lacks them or gets them wrong (spec §4.11).

Sparse-layer rule (Flaxformer ``LayerLayout.MIXED``, spec §2): with ``step = *_sparse_step``,
layer ``i`` is sparse iff ``i % step == step - 1``; ``step == 1`` makes every layer sparse and
``step == 0`` none. (HF uses ``i % step == 1``; equal only for steps 1 and 2.) Flaxformer's other layouts
(``bottom`` / ``middle`` / ``top``, and ``mixed`` given a sparse-layer count) come from ``*_sparse_layout`` with
``num_sparse_*_layers`` (``layout_sparse_indices``, docs/FINETUNING.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from moqe_jax.errors import ConfigError

__all__ = ["SwitchConfig", "sparse_layer_indices", "layout_sparse_indices", "ROUTING_MODES", "LAYER_LAYOUTS",
           "ROUTER_TYPES"]

_ACTIVATIONS = ("relu", "gated-gelu")
_DTYPES = ("bfloat16", "float32", "float16")
ROUTING_MODES = ("t5x", "hf", "dropless")
ROUTER_TYPES = ("tokens_choose", "experts_choose")
LAYER_LAYOUTS = ("bottom", "middle", "mixed", "top")  # Flaxformer moe_enums.LayerLayout


@functools.cache
def _preset_table() -> dict[str, dict[str, Any]]:
    """``{name: fields}`` from the package data ``configs/presets.toml`` (each preset = ``base`` + its table)."""
    raw = tomllib.loads(resources.files("moqe_jax").joinpath("configs", "presets.toml").read_text("utf-8"))
    return {name: {**raw["base"], **fields} for name, fields in raw["presets"].items()}


def layout_sparse_indices(num_layers: int, num_sparse: int, layout: str) -> tuple[int, ...]:
    """Sparse layers under Flaxformer's ``LayerLayout`` (``moe_architecture._is_sparse_layer``): ``bottom``
    ``i < n``; ``middle`` ``N - n <= 2i < N + n``; ``mixed`` ``i % (N // n) == N // n - 1`` (``N % n == 0``, n = 0:
    none); ``top`` ``i >= N - n``."""
    n, big_n = num_sparse, num_layers
    if layout == "bottom":
        return tuple(i for i in range(big_n) if i < n)
    if layout == "middle":
        return tuple(i for i in range(big_n) if big_n - n <= 2 * i < big_n + n)
    if layout == "top":
        return tuple(i for i in range(big_n) if i >= big_n - n)
    if layout == "mixed":
        if n <= 0:
            return ()
        if big_n % n:
            raise ConfigError(f"mixed sparse layout: {n} sparse layers do not divide {big_n} layers")
        return sparse_layer_indices(big_n, big_n // n)
    raise ConfigError(f"sparse layout must be one of {LAYER_LAYOUTS}, got {layout!r}")


def sparse_layer_indices(num_layers: int, step: int) -> tuple[int, ...]:
    """Indices of sparse layers under the Flaxformer rule ``i % step == step - 1`` (0 = none)."""
    if step <= 0:
        return ()
    return tuple(i for i in range(num_layers) if i % step == step - 1)


@dataclass(frozen=True)
class SwitchConfig:
    """Switch Transformer encoder-decoder configuration (hashable; usable as a jit static argument).

    Defaults are switch-base-8 (spec §3). ``dtype`` is the activation dtype (bfloat16 as in T5X;
    float32 for parity tests); parameters are always stored float32 (or quantized).
    """

    vocab_size: int = 32128
    d_model: int = 768
    d_ff: int = 3072
    d_kv: int = 64
    num_heads: int = 12
    num_layers: int = 12
    num_decoder_layers: int = 12
    num_experts: int = 8
    encoder_sparse_step: int = 2
    decoder_sparse_step: int = 2
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # ---- ours ------------------------------------------------------------------------------
    activation: str = "relu"  # "relu" | "gated-gelu" (gelu tanh approx × linear; XXL)
    max_group_size: int = 8192
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_expert_capacity: int = 4
    num_expert_replicas: int = 1
    # "t5x" (Flaxformer groups/capacity) | "hf" (per-sequence, fixed capacity) | "dropless" (T5X router, no
    # capacity: only the experts that received tokens run; generation's default)
    routing_mode: str = "t5x"
    hf_expert_capacity: int = 64
    dtype: str = "bfloat16"
    aux_loss_factor: float = 0.01
    router_z_loss_factor: float = 0.0
    z_loss: float = 1e-4
    # ---- router options (Flaxformer routing.py / moe_layers.py; docs/ROUTING.md) -------------------------
    # tokens-choose top-k: each token's k most probable experts (1 = the Switch router)
    num_selected_experts: int = 1
    # batch-prioritized routing (V-MoE / Flaxformer BPR): in the encoder's sparse layers, a group's tokens claim
    # expert capacity in order of their top-1 probability instead of token order (the decoder never uses BPR)
    batch_prioritized_routing: bool = False
    # "tokens_choose" (TokensChooseMaskedRouter) | "experts_choose" (ExpertsChooseMaskedRouter: each expert takes
    # its C most probable tokens of a group; encoder sparse layers only, the decoder stays tokens-choose)
    router_type: str = "tokens_choose"
    router_jitter_noise: float = 0.0  # train only: router inputs × uniform(1-j, 1+j) ('jitter' rng)
    router_bias: bool = False  # router logits + bias (param router/router_weights/w/bias [E])
    router_ignore_padding_tokens: bool = False  # all-zero router inputs (padding) are dispatched nowhere
    # ---- fine-tuning and layer layouts (Flaxformer; docs/FINETUNING.md) -----------------------------------
    # dropout, active only with train=True and a 'dropout' rng: embeddings, after attention / cross-attention /
    # MLP, final layer norms, attention weights, dense-MLP hidden; the experts' hidden uses expert_dropout_rate
    # (None = dropout_rate, as Flaxformer's gin EXPERT_DROPOUT_RATE = %DROPOUT_RATE)
    dropout_rate: float = 0.0
    expert_dropout_rate: float | None = None
    # Flaxformer LayerLayout per stack: "mixed" (every k-th layer sparse: k = *_sparse_step, or
    # num_layers // num_sparse_*_layers when that is set) | "bottom" | "middle" | "top" (need num_sparse_*_layers)
    encoder_sparse_layout: str = "mixed"
    decoder_sparse_layout: str = "mixed"
    num_sparse_encoder_layers: int | None = None
    num_sparse_decoder_layers: int | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        pos = ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_experts", "relative_attention_num_buckets",
               "relative_attention_max_distance", "max_group_size", "num_expert_replicas", "hf_expert_capacity")
        for f in pos:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"SwitchConfig.{f} must be a positive integer, got {v!r}")
        for f in ("num_layers", "num_decoder_layers", "encoder_sparse_step", "decoder_sparse_step",
                  "min_expert_capacity", "pad_token_id", "eos_token_id", "decoder_start_token_id"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"SwitchConfig.{f} must be a non-negative integer, got {v!r}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"SwitchConfig.activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.routing_mode not in ROUTING_MODES:
            raise ConfigError(f"SwitchConfig.routing_mode must be one of {ROUTING_MODES}, got {self.routing_mode!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"SwitchConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for f in ("train_capacity_factor", "eval_capacity_factor"):
            if not float(getattr(self, f)) > 0:
                raise ConfigError(f"SwitchConfig.{f} must be > 0, got {getattr(self, f)!r}")
        if not float(self.layer_norm_epsilon) > 0:
            raise ConfigError(f"SwitchConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if self.relative_attention_num_buckets % 2:
            raise ConfigError("SwitchConfig.relative_attention_num_buckets must be even")
        self._validate_routing()
        self._validate_finetuning()

    def _validate_finetuning(self) -> None:
        """Dropout rates and sparse layer layouts (docs/FINETUNING.md)."""
        for f in ("dropout_rate", "expert_dropout_rate"):
            v = getattr(self, f)
            if v is None and f == "expert_dropout_rate":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                raise ConfigError(f"SwitchConfig.{f} must be a number in [0, 1), got {v!r}")
        for stack, n_layers in (("encoder", self.num_layers), ("decoder", self.num_decoder_layers)):
            layout = getattr(self, f"{stack}_sparse_layout")
            if layout not in LAYER_LAYOUTS:
                raise ConfigError(f"SwitchConfig.{stack}_sparse_layout must be one of {LAYER_LAYOUTS}, got {layout!r}")
            key = f"num_sparse_{stack}_layers"
            n = getattr(self, key)
            if n is None:
                if layout != "mixed":
                    raise ConfigError(f"SwitchConfig.{stack}_sparse_layout={layout!r} needs {key} (how many of the "
                                      f"{n_layers} layers are sparse)")
                continue
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= n_layers:
                raise ConfigError(f"SwitchConfig.{key} must be an integer in [0, {n_layers}] (the {stack} has "
                                  f"{n_layers} layers), got {n!r}")
            if layout == "mixed" and n and n_layers % n:
                raise ConfigError(f"SwitchConfig.{key}={n}: the mixed layout needs a divisor of the {n_layers} "
                                  f"{stack} layers (Flaxformer's rule); use {stack}_sparse_step or another layout")

    @property
    def expert_dropout(self) -> float:
        """The experts' hidden-layer dropout rate (``expert_dropout_rate``, else ``dropout_rate``)."""
        return float(self.dropout_rate if self.expert_dropout_rate is None else self.expert_dropout_rate)

    def _validate_routing(self) -> None:
        """Router options (docs/ROUTING.md) and what each routing mode can represent."""
        k = self.num_selected_experts
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_experts:
            raise ConfigError(f"SwitchConfig.num_selected_experts must be an integer in [1, num_experts="
                              f"{self.num_experts}], got {k!r}")
        if self.router_type not in ROUTER_TYPES:
            raise ConfigError(f"SwitchConfig.router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        for f in ("batch_prioritized_routing", "router_bias", "router_ignore_padding_tokens"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"SwitchConfig.{f} must be true or false, got {getattr(self, f)!r}")
        j = self.router_jitter_noise
        if isinstance(j, bool) or not isinstance(j, (int, float)) or not 0.0 <= float(j) < 1.0:
            raise ConfigError(f"SwitchConfig.router_jitter_noise must be a number in [0, 1), got {j!r}")
        if self.routing_mode == "hf":
            bad = [f"{f}={getattr(self, f)!r}" for f, ok in (
                ("num_selected_experts", k == 1), ("batch_prioritized_routing", not self.batch_prioritized_routing),
                ("router_type", self.router_type == "tokens_choose"),
                ("router_ignore_padding_tokens", not self.router_ignore_padding_tokens)) if not ok]
            if bad:
                raise ConfigError(f"routing_mode='hf' reproduces transformers' top-1 Switch router, which cannot do "
                                  f"{', '.join(bad)} (it never reads router_ignore_padding_tokens); use "
                                  "routing_mode='t5x' or 'dropless'")
        if self.routing_mode == "dropless" and self.router_type == "experts_choose":
            raise ConfigError("router_type='experts_choose' needs routing_mode='t5x': experts choose a fixed "
                              "number of tokens (the capacity), which dropless routing does not have")

    # ---- derived -----------------------------------------------------------------------------
    @property
    def inner_dim(self) -> int:
        """J = H·K (joined q/k/v width)."""
        return self.num_heads * self.d_kv

    @property
    def gated(self) -> bool:
        return self.activation == "gated-gelu"

    @property
    def num_encoder_layers(self) -> int:
        return self.num_layers

    def sparse_layers(self, stack: str) -> tuple[int, ...]:
        """Sparse layer indices of ``stack`` ("encoder" | "decoder"), Flaxformer rules: with
        ``num_sparse_*_layers`` unset, the mixed layout's ``i % step == step - 1``; else ``layout_sparse_indices``."""
        if stack not in ("encoder", "decoder"):
            raise ConfigError(f"stack must be 'encoder' or 'decoder', got {stack!r}")
        n_layers = self.num_stack_layers(stack)
        n = getattr(self, f"num_sparse_{stack}_layers")
        if n is None:
            return sparse_layer_indices(n_layers, getattr(self, f"{stack}_sparse_step"))
        return layout_sparse_indices(n_layers, n, getattr(self, f"{stack}_sparse_layout"))

    def is_sparse(self, stack: str, i: int) -> bool:
        return i in self.sparse_layers(stack)

    def num_stack_layers(self, stack: str) -> int:
        return self.num_layers if stack == "encoder" else self.num_decoder_layers

    @property
    def jnp_dtype(self) -> Any:
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    # ---- construction ------------------------------------------------------------------------
    def replace(self, **kw: Any) -> SwitchConfig:
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown SwitchConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **kw)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SwitchConfig:
        """Named preset from ``moqe_jax/configs/presets.toml`` (e.g. ``switch-base-8``, ``tiny``, ``small-mt``)
        with optional field overrides."""
        table = _preset_table()
        if name not in table:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(table)}")
        kw = dict(table[name], name=name)
        kw.update(overrides)
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"bad override for preset {name!r}: {e}") from None

    @staticmethod
    def preset_names() -> list[str]:
        return list(_preset_table())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SwitchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown SwitchConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_hf(cls, src: dict[str, Any] | str | os.PathLike, **overrides: Any) -> SwitchConfig:
        """From a HF ``config.json`` (dict, file, or directory holding it), spec §5.1.

        Sparse layers are derived with the Flaxformer rule from ``num_sparse_*_layers``
        (``step = num_layers // num_sparse``); ``*_sparse_step`` keys are used only when the
        ``num_sparse_*`` keys are absent. ``num_decoder_layers`` is taken as written; for the
        C-2048 Hub file (which says 12 instead of 15) pass ``num_decoder_layers=15`` or use
        ``SwitchConfig.preset("switch-c-2048")``.
        """
        if not isinstance(src, dict):
            path = os.fspath(src)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path) as f:
                    d = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such HF config.json") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        else:
            d = dict(src)
        if not isinstance(d, dict):
            raise ConfigError(f"HF config must be a JSON object, got a {type(d).__name__}")
        mt = d.get("model_type")
        if mt is not None and mt != "switch_transformers":
            raise ConfigError(f"HF config model_type is {mt!r}, expected 'switch_transformers'")
        g = d.get

        def integer(key: str, default: int | None) -> int:
            v = g(key)
            if v is None:
                if default is None:
                    raise ConfigError(f"HF config field {key} is missing")
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
                raise ConfigError(f"HF config field {key} must be an integer, got {v!r}")
            return int(v)

        def number(key: str, default: float) -> float:
            v = g(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"HF config field {key} must be a number, got {v!r}")
            return float(v)

        def token(key: str, default: int) -> int:
            v = g(key)
            if isinstance(v, list):  # transformers allows a list of ids; one id is all a Switch model uses
                if len(v) != 1:
                    raise ConfigError(f"HF config field {key} lists {len(v)} ids {v!r}; exactly one is supported")
                v = v[0]
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"HF config field {key} must be a non-negative integer, got {v!r}")
            return v

        def flag(key: str, default: bool) -> bool:
            v = g(key)
            if v is None:
                return default
            if not isinstance(v, bool):
                raise ConfigError(f"HF config field {key} must be true or false, got {v!r}")
            return v

        num_layers = integer("num_layers", 12)
        num_dec = integer("num_decoder_layers", num_layers)

        def step(n_layers: int, sparse_key: str, step_key: str) -> int:
            if g(sparse_key) is not None:
                ns = integer(sparse_key, 0)
                return 0 if ns <= 0 else max(1, n_layers // ns)
            return integer(step_key, 0)

        # activation: HF's Switch MLP is act(x @ wi) @ wo with act = ACT2FN[dense_act_fn]; gated-gelu (v1.1/XXL
        # style, from `feed_forward_proj: gated-gelu` or `is_gated_act`) is gelu-tanh(x @ wi_0) * (x @ wi_1)
        ff = g("feed_forward_proj")
        if ff is not None and ff not in ("relu", "gated-gelu"):
            raise ConfigError(f"HF config feed_forward_proj {ff!r} is not supported (relu or gated-gelu)")
        gated = flag("is_gated_act", False) or ff == "gated-gelu"
        act_fn = g("dense_act_fn")
        if gated:
            if act_fn not in (None, "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu"):  # relu: older exports
                raise ConfigError(f"HF config dense_act_fn {act_fn!r} with a gated MLP is not supported (moqe_jax "
                                  "implements gated-gelu with the tanh approximation, gelu_new)")
        elif act_fn not in (None, "relu"):
            raise ConfigError(f"HF config dense_act_fn {act_fn!r} is not supported (moqe_jax implements relu and "
                              "gated-gelu MLPs)")
        if g("router_dtype") not in (None, "float32"):
            raise ConfigError(f"HF config router_dtype {g('router_dtype')!r} is not supported (the router runs in "
                              "float32, as in T5X)")
        if not flag("is_encoder_decoder", True):
            raise ConfigError("HF config is_encoder_decoder=false: only the encoder-decoder Switch is supported")
        name = g("_name_or_path") or "hf"
        # dropout_rate, initializer_factor, use_cache and add_router_probs only affect HF training / outputs: ignored
        kw: dict[str, Any] = dict(
            vocab_size=integer("vocab_size", 32128), d_model=integer("d_model", 768), d_ff=integer("d_ff", 2048),
            d_kv=integer("d_kv", 64), num_heads=integer("num_heads", 12), num_layers=num_layers,
            num_decoder_layers=num_dec, num_experts=integer("num_experts", 8),
            encoder_sparse_step=step(num_layers, "num_sparse_encoder_layers", "encoder_sparse_step"),
            decoder_sparse_step=step(num_dec, "num_sparse_decoder_layers", "decoder_sparse_step"),
            relative_attention_num_buckets=integer("relative_attention_num_buckets", 32),
            relative_attention_max_distance=integer("relative_attention_max_distance", 128),
            layer_norm_epsilon=number("layer_norm_epsilon", 1e-6),
            tie_word_embeddings=flag("tie_word_embeddings", True),
            pad_token_id=token("pad_token_id", 0), eos_token_id=token("eos_token_id", 1),
            decoder_start_token_id=token("decoder_start_token_id", 0),
            activation="gated-gelu" if gated else "relu", hf_expert_capacity=integer("expert_capacity", 64),
            name=str(name),
        )
        # router options transformers' SwitchTransformersConfig defines (its router is always top-1 tokens-choose
        # without BPR; the legacy Hub keys num_selected_experts / batch_prioritized_routing / router_type are read
        # by no transformers code, so they do not describe the HF model and are ignored)
        kw["router_bias"] = flag("router_bias", False)
        kw["router_jitter_noise"] = number("router_jitter_noise", 0.0)
        kw["router_ignore_padding_tokens"] = flag("router_ignore_padding_tokens", False)
        if g("router_z_loss_coef") is not None:
            kw["router_z_loss_factor"] = number("router_z_loss_coef", 0.0)
        if g("router_aux_loss_coef") is not None:
            kw["aux_loss_factor"] = number("router_aux_loss_coef", 0.01)
        kw.update(overrides)
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"bad HF config: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """HF ``config.json`` dict (sparse steps written explicitly; HF's rule differs for steps > 2).

        HF knows only "every k-th layer" layouts: a bottom/middle/top layout (``*_sparse_layout``) is written only
        when its layers are the mixed layout's ``i % k == k - 1`` with ``k = N // n``; otherwise ``ConfigError``."""
        bad = [f"{f}={getattr(self, f)!r}" for f, ok in (
            ("num_selected_experts", self.num_selected_experts == 1),
            ("batch_prioritized_routing", not self.batch_prioritized_routing),
            ("router_type", self.router_type == "tokens_choose")) if not ok]
        if bad:
            raise ConfigError(f"config {self.name}: {', '.join(bad)} cannot be written to a Hugging Face config.json "
                              "(transformers' Switch router is top-1 tokens-choose without batch-prioritized "
                              "routing); save with Model.save or export to T5X")
        ne = len(self.sparse_layers("encoder"))
        nd = len(self.sparse_layers("decoder"))
        steps = {}
        for stack, n in (("encoder", ne), ("decoder", nd)):
            steps[stack] = getattr(self, f"{stack}_sparse_step")
            if getattr(self, f"num_sparse_{stack}_layers") is None:
                continue
            n_layers = self.num_stack_layers(stack)
            steps[stack] = n_layers // n if n else 0
            if sparse_layer_indices(n_layers, steps[stack]) != self.sparse_layers(stack):
                raise ConfigError(
                    f"config {self.name}: {stack} sparse layers {list(self.sparse_layers(stack))} "
                    f"({getattr(self, f'{stack}_sparse_layout')} layout) cannot be written to a Hugging Face "
                    "config.json, which has only every-k-th-layer layouts; save with Model.save or export to T5X")
        return {
            "model_type": "switch_transformers", "architectures": ["SwitchTransformersForConditionalGeneration"],
            "vocab_size": self.vocab_size, "d_model": self.d_model, "d_ff": self.d_ff, "d_kv": self.d_kv,
            "num_heads": self.num_heads, "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers, "num_experts": self.num_experts,
            "num_sparse_encoder_layers": ne, "num_sparse_decoder_layers": nd,
            "encoder_sparse_step": steps["encoder"], "decoder_sparse_step": steps["decoder"],
            "expert_capacity": self.hf_expert_capacity,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon, "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "dense_act_fn": "gelu_new" if self.gated else "relu",
            "is_gated_act": self.gated, "router_bias": self.router_bias, "router_dtype": "float32",
            "router_ignore_padding_tokens": self.router_ignore_padding_tokens,
            "router_jitter_noise": float(self.router_jitter_noise), "dropout_rate": self.dropout_rate,
        }
