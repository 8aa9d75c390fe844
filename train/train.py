"""ONE training loop: Switch MoE / dense baselines from scratch, and STE QAT of expert weights (MoQE §3).

* Loss (T5X, docs/T5X_SWITCH.md §3/§4.9): token cross-entropy + ``z_loss``·logZ² of the output logits
  (1e-4), normalised by the number of real target tokens, + ``aux_loss_factor`` (0.01) × mean
  load-balancing loss over sparse layers + ``router_z_loss_factor`` (0) × mean router z-loss.
* Optimizers: optax Adafactor (T5X: decay 0.8, parameter-scale, clipping 1.0, rsqrt schedule) or AdamW.
* QAT: with ``qat_spec`` the loss sees ``fake_quant_params(params, spec, components)`` (straight-through
  estimator, ``moqe_jax.quant.ste``); the float master weights are what the optimizer updates.
* Sharding: a `jax.sharding.Mesh` with ``data``/``expert`` (/``model``) axes via `moqe_jax.sharding`
  rules (experts over ``expert``, batch over data×expert); the step is jitted with explicit in/out
  shardings. `check_fits` runs before anything is computed.
* Checkpoints: Orbax ``CheckpointManager`` (async saves, keep-N); the state holds params, optimizer
  state, step and RNG key, the JSON item the data position, so a resumed run continues bit-exactly.
* Multi-host: `maybe_init_distributed` calls ``jax.distributed.initialize`` from flags / env vars.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moqe_jax import sharding as shd
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import ConfigError, DataError

__all__ = ["TrainConfig", "TrainData", "MTData", "MLMData", "load_mlm_data", "SyntheticData",
           "cross_entropy_with_z_loss", "make_optimizer", "train", "TrainResult", "maybe_init_distributed",
           "load_mt_data"]

Batch = dict[str, np.ndarray]


# ---- configuration -----------------------------------------------------------------------------------
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

    def qat_spec(self) -> Any:
        if self.qat_bits is None:
            return None
        from moqe_jax.packed.spec import QuantSpec

        bits = self.qat_bits if self.qat_bits == "ternary" else int(self.qat_bits)
        return QuantSpec(bits=bits, granularity=self.qat_granularity)


class TrainData(Protocol):
    """What the loop needs from a data source: a deterministic batch stream and eval batches."""

    def batch(self, index: int) -> Batch: ...

    def batch_rows(self) -> list[int]: ...

    def eval_batches(self, n: int) -> list[Batch]: ...


@dataclass
class SyntheticData:
    """Random seq2seq batches (target = reversed source) for tests: batch ``i`` depends only on ``seed, i``."""

    vocab_size: int
    batch_size: int = 8
    length: int = 16
    seed: int = 0

    def batch(self, index: int) -> Batch:
        from moqe_jax.data.batching import make_batch

        rng = np.random.default_rng([self.seed, int(index)])
        src, tgt = [], []
        for _ in range(self.batch_size):
            n = int(rng.integers(self.length // 2, self.length))
            s = rng.integers(3, self.vocab_size, size=n - 1).astype(np.int32)
            src.append(np.append(s, 1))
            tgt.append(np.append(s[::-1], 1))
        return make_batch(src, tgt, self.length)

    def batch_rows(self) -> list[int]:
        return [self.batch_size]

    def eval_batches(self, n: int) -> list[Batch]:
        return [self.batch(10_000_000 + i) for i in range(n)]


@dataclass
class MTData:
    """The gettext MT corpus, tokenized and length-bucketed (moqe_jax.data)."""

    batcher: Any
    valid: list[Batch]

    def batch(self, index: int) -> Batch:
        return self.batcher.batch(index)

    def batch_rows(self) -> list[int]:
        return sorted({self.batcher.rows_for(b) for b in self.batcher.buckets})

    def eval_batches(self, n: int) -> list[Batch]:
        return self.valid[:n]


def _encode_split(corpus_dir: Path, split: str, tok: Any, max_len: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Tokenize a split once and cache it next to the corpus (keyed by the tokenizer file's hash)."""
    import hashlib

    from moqe_jax.data.batching import encode_pairs
    from moqe_jax.data.corpus import read_jsonl

    h = hashlib.sha1(Path(tok.path).read_bytes()).hexdigest()[:10]
    cache = corpus_dir / f".{split}.{h}.{max_len}.npz"
    if cache.is_file():
        z = np.load(cache)
        s_off, t_off = z["src_off"], z["tgt_off"]
        src = np.split(z["src"], s_off[1:-1])
        tgt = np.split(z["tgt"], t_off[1:-1])
        return src, tgt
    rows = read_jsonl(corpus_dir / f"{split}.jsonl")
    src, tgt = encode_pairs(rows, tok, max_len)
    try:
        s_off = np.cumsum([0] + [len(s) for s in src])
        t_off = np.cumsum([0] + [len(t) for t in tgt])
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, src=np.concatenate(src), tgt=np.concatenate(tgt), src_off=s_off, tgt_off=t_off)
        os.replace(tmp, cache)
    except OSError:
        pass
    return src, tgt


def load_mt_data(corpus_dir: str | os.PathLike, tc: TrainConfig, max_len: int = 96, eval_rows: int = 64,
                 tokenizer_dir: str | os.PathLike | None = None, drop_long: bool = True) -> MTData:
    """``MTData`` from a ``moqe data build`` directory (tokenizer in ``<dir>/tokenizer`` unless given).

    Examples longer than ``max_len`` tokens (source or target incl. eos) are dropped from training when
    ``drop_long`` (else truncated); the validation sample keeps only those that fit."""
    from moqe_jax.data.batching import DEFAULT_BUCKETS, BucketBatcher, eval_batches
    from moqe_jax.data.tokenizer import Tokenizer

    d = Path(corpus_dir)
    if not (d / "train.jsonl").is_file():
        raise DataError(f"{d}: no train.jsonl (build the corpus with `moqe data build --out {d}`)")
    tok = Tokenizer(tokenizer_dir or d / "tokenizer")
    buckets = tuple(b for b in DEFAULT_BUCKETS if b <= max_len) or (max_len,)
    src, tgt = _encode_split(d, "train", tok, max_len + 1)
    vsrc, vtgt = _encode_split(d, "valid", tok, max_len + 1)
    if drop_long:  # train on what fits (truncated targets would teach truncated translations)
        keep = [i for i in range(len(src)) if max(len(src[i]), len(tgt[i])) <= max_len]
        src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    vkeep = [i for i in range(len(vsrc)) if max(len(vsrc[i]), len(vtgt[i])) <= max_len]
    vsrc, vtgt = [vsrc[i] for i in vkeep], [vtgt[i] for i in vkeep]
    div = shd.batch_divisor(tc.mesh)
    batcher = BucketBatcher(src, tgt, tc.batch_size, buckets, seed=tc.seed, tokens_per_batch=tc.tokens_per_batch,
                            row_multiple=div)
    # a fixed, direction-balanced validation sample (every 7th example) for the periodic eval loss
    sel = list(range(0, len(vsrc), 7))
    valid = list(eval_batches([vsrc[i] for i in sel], [vtgt[i] for i in sel], eval_rows, buckets))
    return MTData(batcher, valid)


@dataclass
class MLMData:
    """T5 span corruption (noise 0.15, mean span 3) of an English token stream (QMoE-style MLM objective).

    Batch ``i`` depends only on ``(seed, i)`` (`moqe_jax.data.span_corruption.mlm_batches`), so the data
    position is the step, as for `MTData`."""

    token_lists: list[list[int]]
    eval_token_lists: list[list[int]]
    vocab_size: int
    batch_size: int = 32
    inputs_length: int = 32
    seed: int = 0

    def batch(self, index: int) -> Batch:
        from moqe_jax.data.span_corruption import mlm_batches

        return next(mlm_batches(self.token_lists, self.vocab_size, self.batch_size, self.inputs_length,
                                seed=self.seed, start=int(index)))

    def batch_rows(self) -> list[int]:
        return [self.batch_size]

    def eval_batches(self, n: int) -> list[Batch]:
        from moqe_jax.data.span_corruption import mlm_batches

        it = mlm_batches(self.eval_token_lists, self.vocab_size, self.batch_size, self.inputs_length,
                         seed=self.seed + 1)
        return [next(it) for _ in range(n)]


def load_mlm_data(corpus_dir: str | os.PathLike, tc: TrainConfig, inputs_length: int = 32,
                  tokenizer_dir: str | os.PathLike | None = None) -> MLMData:
    """Span-corruption data: the training-split English side (``english.txt``) for training, the English side
    of the validation split for eval (docs/DATA.md: the English sentences of valid/test never occur in train)."""
    from moqe_jax.data.corpus import english_sentences, read_jsonl
    from moqe_jax.data.tokenizer import Tokenizer

    d = Path(corpus_dir)
    tok = Tokenizer(tokenizer_dir or d / "tokenizer")
    train_en = english_sentences(d)
    valid_en = sorted({r["en"] for r in read_jsonl(d / "valid.jsonl")})
    return MLMData(tok.encode_batch(train_en), tok.encode_batch(valid_en), tok.vocab_size, tc.batch_size,
                   inputs_length, tc.seed)


# ---- loss / optimizer ---------------------------------------------------------------------------------
def cross_entropy_with_z_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float,
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """T5X ``cross_entropy_with_logits`` (+ z_loss·logZ²), summed with ``weights``: ``(total, ce, z)`` sums."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = (lse - tgt_logit) * weights
    z = z_loss * jnp.square(lse) * weights
    return jnp.sum(ce + z), jnp.sum(ce), jnp.sum(z)


def _schedule(tc: TrainConfig) -> Callable[[Any], Any]:
    lr, w = tc.learning_rate, max(1, tc.warmup_steps)
    if tc.schedule == "constant":
        return lambda step: lr
    if tc.schedule == "rsqrt":
        return lambda step: lr * jnp.sqrt(w / jnp.maximum(step.astype(jnp.float32) + 1.0, w))
    if tc.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, min(w, tc.steps - 1), max(tc.steps, w + 1), lr * 0.05)
    raise ConfigError(f"unknown schedule {tc.schedule!r} (rsqrt, constant, cosine)")


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Adafactor as in T5X (decay 0.8, parameter scale, clipping 1.0) or AdamW (warmup + schedule)."""
    sched = _schedule(tc)
    if tc.optimizer == "adafactor":
        return optax.adafactor(learning_rate=sched, decay_rate=0.8, multiply_by_parameter_scale=True,
                               clipping_threshold=1.0, factored=True, min_dim_size_to_factor=128,
                               weight_decay_rate=tc.weight_decay or None)
    if tc.optimizer == "adamw":
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adamw(sched, b1=0.9, b2=0.98, eps=1e-9, weight_decay=tc.weight_decay))
    raise ConfigError(f"unknown optimizer {tc.optimizer!r} (adafactor, adamw)")


def _fake_quant(tc: TrainConfig) -> Callable[[Any], Any] | None:
    spec = tc.qat_spec()
    if spec is None:
        return None
    from moqe_jax.quant.ste import fake_quant_params

    comps = tuple(tc.qat_components)
    return lambda p: fake_quant_params(p, spec, comps)


def make_loss_fn(cfg: SwitchConfig, tc: TrainConfig, train: bool = True) -> Callable[[Any, Batch], tuple]:
    """``loss(params, batch) -> (loss, metrics)`` with the T5X loss terms (module docstring)."""
    from moqe_jax.model.switch import SwitchTransformer

    model = SwitchTransformer(cfg)
    fq = _fake_quant(tc)

    def loss_fn(params: Any, batch: Batch) -> tuple[jax.Array, dict]:
        p = fq(params) if fq is not None else params
        logits, aux = model.apply({"params": p}, batch["input_ids"], batch["decoder_input_ids"], None, None, train)
        w = batch["weights"]
        ntok = jnp.maximum(jnp.sum(w), 1.0)
        total, ce, z = cross_entropy_with_z_loss(logits, batch["targets"], w, tc.z_loss)
        loss = total / ntok + tc.aux_loss_factor * aux["aux_loss"] + tc.router_z_loss_factor * aux["z_loss"]
        usage = [i["expert_usage"] for i in aux["moe"].values()]
        metrics = {"loss": loss, "ce": ce / ntok, "z_logits": z / ntok, "aux_loss": aux["aux_loss"],
                   "router_z_loss": aux["z_loss"], "dropped_fraction": aux["dropped_fraction"],
                   "tokens": jnp.sum(w),
                   "expert_usage": jnp.mean(jnp.stack(usage), axis=0) if usage else jnp.zeros((0,))}
        return loss, metrics

    return loss_fn


# ---- distributed ---------------------------------------------------------------------------------------
def maybe_init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """``jax.distributed.initialize`` when asked by flags or ``MOQE_COORDINATOR``/``MOQE_NUM_PROCESSES``/
    ``MOQE_PROCESS_ID`` (or JAX's own cluster auto-detection via ``MOQE_DISTRIBUTED=auto``)."""
    coordinator = coordinator or os.environ.get("MOQE_COORDINATOR")
    if num_processes is None and os.environ.get("MOQE_NUM_PROCESSES"):
        num_processes = int(os.environ["MOQE_NUM_PROCESSES"])
    if process_id is None and os.environ.get("MOQE_PROCESS_ID"):
        process_id = int(os.environ["MOQE_PROCESS_ID"])
    if coordinator is None and os.environ.get("MOQE_DISTRIBUTED") != "auto":
        return False
    if jax.distributed.is_initialized():
        return True
    try:  # CPU cross-process collectives (no effect on GPU/TPU clients); must not touch the backend yet
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
        pass
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    return True


# ---- the loop ------------------------------------------------------------------------------------------
_COMPILED: dict[Any, tuple] = {}
_BATCH_KEYS = ("input_ids", "decoder_input_ids", "targets", "weights")


def _compiled(cfg: SwitchConfig, tc: TrainConfig, mesh: Any) -> tuple:
    """``(optimizer, jitted step, jitted eval, param shardings)``, cached per (config, hyper-parameters, mesh)
    so that repeated runs in one process (tests, resume) reuse the compiled step."""
    key = (cfg, json.dumps({k: v for k, v in tc.to_dict().items()
                            if k not in ("steps", "log_every", "eval_every", "eval_batches", "save_every", "keep",
                                         "async_save")}, sort_keys=True, default=str), mesh)
    if key in _COMPILED:
        return _COMPILED[key]
    from moqe_jax.model.switch import init_params as model_init

    tx = make_optimizer(tc)
    loss_fn = make_loss_fn(cfg, tc, train=True)
    eval_loss_fn = make_loss_fn(cfg, tc, train=False)
    abstract = jax.eval_shape(lambda: model_init(cfg, 0))
    p_shard = shd.param_shardings(abstract, mesh)
    rep = shd.replicated(mesh)
    b_shard = shd.batch_sharding(mesh)
    abs_opt = jax.eval_shape(tx.init, abstract)
    # optimizer slots: the param's sharding where the shape matches (Adam moments, unfactored Adafactor v),
    # replicated otherwise (factored Adafactor rows/cols, counts)
    flat_p = {jax.tree_util.keystr(kp): (x.shape, s) for (kp, x), s in
              zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(p_shard), strict=True)}

    def opt_sharding(kp: Any, x: Any) -> Any:
        ks = jax.tree_util.keystr(kp)
        for pk, (shape, sh) in flat_p.items():
            if ks.endswith(pk) and tuple(x.shape) == tuple(shape):
                return sh
        return rep

    o_shard = jax.tree_util.tree_map_with_path(opt_sharding, abs_opt)
    state_shard = {"step": rep, "params": p_shard, "opt_state": o_shard, "rng": rep}

    def step_fn(st: dict, batch: Batch) -> tuple[dict, dict]:
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"], batch)
        updates, opt = tx.update(grads, st["opt_state"], st["params"])
        params = optax.apply_updates(st["params"], updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(st["rng"]))[0])
        metrics["grad_norm"] = optax.tree.norm(grads)
        return {"step": st["step"] + 1, "params": params, "opt_state": opt, "rng": rng}, metrics

    batch_in = dict.fromkeys(_BATCH_KEYS, b_shard)
    jstep = jax.jit(step_fn, in_shardings=(state_shard, batch_in), out_shardings=(state_shard, rep),
                    donate_argnums=(0,))
    jeval = jax.jit(lambda p, b: eval_loss_fn(p, b)[1], in_shardings=(p_shard, batch_in), out_shardings=rep)
    _COMPILED[key] = (tx, jstep, jeval, state_shard)
    return _COMPILED[key]


@dataclass
class TrainResult:
    params: Any
    step: int
    history: list[dict]
    eval_history: list[dict]


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _to_host(x: Any) -> Any:
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), x)


def _progress(total: int, initial: int) -> Any:
    if os.environ.get("MOQE_NO_PROGRESS") == "1" or not sys.stderr.isatty() or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


def train(cfg: SwitchConfig, tc: TrainConfig, data: TrainData, out_dir: str | os.PathLike | None = None,
          init_params: Any = None, stop_after: int | None = None, log: Callable[[str], None] = _log,
          ) -> TrainResult:
    """Train ``cfg`` for ``tc.steps`` steps (resuming from ``out_dir/checkpoints`` if present).

    ``init_params``: start from these weights (QAT / fine-tuning); otherwise random init with ``tc.seed``.
    ``stop_after``: stop (after saving) once this step is reached — used to simulate a killed run.
    """
    # -- validate everything before any compute --------------------------------------------------------
    cfg.validate() if hasattr(cfg, "validate") else None
    mesh_sizes = shd.parse_mesh(tc.mesh)
    shd.check_fits(cfg, mesh_sizes, data.batch_rows())
    if tc.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {tc.steps}")
    if tc.qat_bits is not None and init_params is None:
        raise ConfigError("QAT needs a trained model to start from (--init DIR)")
    mesh = shd.make_mesh(mesh_sizes)
    tx, jstep, jeval, state_shard = _compiled(cfg, tc, mesh)
    p_shard = state_shard["params"]

    # -- state: params (sharded by the rules), optimizer state, step, rng --------------------------------
    from moqe_jax.model.switch import init_params as model_init

    if init_params is None:
        params = jax.jit(lambda: model_init(cfg, tc.seed), out_shardings=p_shard)()
    else:
        params = jax.tree.map(lambda x, s: jax.make_array_from_callback(
            np.shape(x), s, lambda idx, x=np.asarray(x, np.float32): x[idx]), init_params, p_shard)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params),
             "rng": jax.random.key_data(jax.random.PRNGKey(tc.seed))}
    state = jax.device_put(state, state_shard)

    # -- checkpoints -----------------------------------------------------------------------------------------
    mngr = None
    start = 0
    if out_dir is not None:
        import orbax.checkpoint as ocp

        ckdir = Path(out_dir).absolute() / "checkpoints"
        opts = ocp.CheckpointManagerOptions(max_to_keep=tc.keep, save_interval_steps=1,
                                            enable_async_checkpointing=tc.async_save, create=True)
        mngr = ocp.CheckpointManager(ckdir, options=opts)
        latest = mngr.latest_step()
        if latest is not None:
            restored = mngr.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
            state = restored["state"]
            meta = restored["meta"]
            start = int(meta["data_position"])
            if int(state["step"]) != latest or start != latest:
                raise ConfigError(f"{ckdir}: inconsistent checkpoint (step {int(state['step'])}, "
                                  f"data position {start}, dir step {latest})")
            log(f"resumed from {ckdir} step {latest}")
        if jax.process_index() == 0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "model_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            (Path(out_dir) / "train_config.json").write_text(json.dumps(tc.to_dict(), indent=1))

    def save(step: int, force: bool = False) -> None:
        if mngr is None:
            return
        import orbax.checkpoint as ocp

        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave({"data_position": step, "seed": tc.seed})),
                  force=force)

    def run_eval(step: int) -> dict:
        acc: dict[str, float] = {}
        tot = 0.0
        for b in data.eval_batches(tc.eval_batches):
            m = _to_host(jeval(state["params"], shd.shard_batch(b, mesh)))
            n = float(m["tokens"])
            tot += n
            for k in ("ce", "aux_loss", "dropped_fraction"):
                acc[k] = acc.get(k, 0.0) + float(m[k]) * (n if k == "ce" else 1.0)
        nb = max(1, len(data.eval_batches(tc.eval_batches)))
        rec = {"step": step, "eval_ce": acc.get("ce", 0.0) / max(tot, 1.0),
               "eval_aux_loss": acc.get("aux_loss", 0.0) / nb, "eval_dropped": acc.get("dropped_fraction", 0.0) / nb}
        log(f"eval step {step}: ce {rec['eval_ce']:.4f} ppl {math.exp(min(rec['eval_ce'], 50)):.2f} "
            f"dropped {rec['eval_dropped']:.3f}")
        return rec

    history: list[dict] = []
    eval_history: list[dict] = []
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = _progress(end, start)
    t0, tok_acc, last_log = time.perf_counter(), 0.0, start
    jsonl = None
    if out_dir is not None and jax.process_index() == 0:
        jsonl = open(Path(out_dir) / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    try:
        for step in range(start, end):
            batch = shd.shard_batch(data.batch(step), mesh)
            state, metrics = jstep(state, batch)
            m = _to_host(metrics)
            tok_acc += float(m["tokens"])
            rec = {"step": step + 1, **{k: float(v) for k, v in m.items() if np.ndim(v) == 0},
                   "expert_usage": [round(float(u), 4) for u in np.ravel(m["expert_usage"])]}
            history.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
            s = step + 1
            if s % tc.log_every == 0 or s == end:
                dt = time.perf_counter() - t0
                rec["tokens_per_s"] = tok_acc / max(dt, 1e-9)
                log(f"step {s}: loss {rec['loss']:.4f} ce {rec['ce']:.4f} aux {rec['aux_loss']:.4f} "
                    f"dropped {rec['dropped_fraction']:.3f} usage {rec['expert_usage']} "
                    f"{rec['tokens_per_s']:.0f} tok/s ({s - last_log} steps in {dt:.1f}s)")
                t0, tok_acc, last_log = time.perf_counter(), 0.0, s
            if jsonl is not None:
                jsonl.write(json.dumps(rec) + "\n")
            if tc.eval_every and (s % tc.eval_every == 0 or s == tc.steps):
                ev = run_eval(s)
                eval_history.append(ev)
                if jsonl is not None:
                    jsonl.write(json.dumps(ev) + "\n")
                    jsonl.flush()
            if tc.save_every and (s % tc.save_every == 0 or s == end):
                save(s, force=True)
    finally:
        if bar is not None:
            bar.close()
        if jsonl is not None:
            jsonl.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
    return TrainResult(state["params"], int(state["step"]), history, eval_history)


def batches_iter(data: TrainData, start: int = 0) -> Iterator[Batch]:
    i = start
    while True:
        yield data.batch(i)
        i += 1


def save_final_model(cfg: SwitchConfig, params: Any, directory: str | os.PathLike, dtype: str = "float32",
                     format: str = "safetensors") -> str:
    """Export trained params with the checkpoint store (``Model.save`` format), float leaves cast to ``dtype``."""
    from moqe_jax.checkpoint.store import save_params

    host = _to_host(params)
    if jax.process_index() != 0:
        return str(directory)
    if dtype == "bfloat16":
        import ml_dtypes

        host = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16) if a.dtype == np.float32 else a, host)
    return save_params(host, directory, config=cfg.to_dict(), format=format)
