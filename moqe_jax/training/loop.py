"""ONE training loop: Switch MoE / dense baselines from scratch, and STE QAT of expert weights (MoQE §3).

* Loss and optimizer: :mod:`moqe_jax.training.loss`, :mod:`moqe_jax.training.optimizer`.
* Sharding: a `jax.sharding.Mesh` with ``data``/``expert`` (/``model``) axes via `moqe_jax.sharding`
  rules (experts over ``expert``, batch over data×expert); the step is jitted with explicit in/out
  shardings. `check_fits` runs before anything is computed.
* Checkpoints: Orbax ``CheckpointManager`` (async saves, keep-N); the state holds params, optimizer
  state, step and RNG key, the JSON item the data position, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moqe_jax import sharding as shd
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import CheckpointError, ConfigError, DataError, MoqeError
from moqe_jax.progress import progress, write
from moqe_jax.training.config import TrainConfig
from moqe_jax.training.data import Batch, TrainData
from moqe_jax.training.loss import make_loss_fn
from moqe_jax.training.optimizer import make_optimizer
from moqe_jax.tree import to_host

__all__ = ["train", "TrainResult", "save_final_model", "TrainingDivergedError"]


class TrainingDivergedError(MoqeError, RuntimeError):
    """The loss (or the update) became NaN/inf: the run stopped without saving that state."""

_COMPILED: dict[Any, tuple] = {}
_INIT: dict[Any, Any] = {}
_BATCH_KEYS = ("input_ids", "decoder_input_ids", "targets", "weights")


def _compiled(cfg: SwitchConfig, tc: TrainConfig, mesh: Any) -> tuple:
    """``(optimizer, jitted step, jitted eval, param shardings)``, cached per (config, hyper-parameters, mesh)
    so that repeated runs in one process (tests, resume) reuse the compiled step."""
    key = (cfg, json.dumps({k: v for k, v in tc.to_dict().items()
                            if k not in ("steps", "log_every", "eval_every", "eval_batches", "save_every", "keep",
                                         "async_save", "seed")}, sort_keys=True, default=str), mesh)
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
        # the state's key chain (seed -> split each step; checkpointed, so a resumed run draws the same keys):
        # [0] is the next state key, [1] this step's dropout / router-noise key (train_rngs)
        next_key, step_key = jax.random.split(jax.random.wrap_key_data(st["rng"]))
        with shd.activation_mesh(mesh):  # MoE dispatch constraints (all-to-all over `expert`)
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"], batch, step_key)
        updates, opt = tx.update(grads, st["opt_state"], st["params"])
        params = optax.apply_updates(st["params"], updates)
        rng = jax.random.key_data(next_key)
        metrics["grad_norm"] = optax.tree.norm(grads)
        # 1.0 when the loss, the gradients and the update are all finite (checked on the host every step)
        metrics["finite"] = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
                             & jnp.isfinite(optax.tree.norm(updates))).astype(jnp.float32)
        return {"step": st["step"] + 1, "params": params, "opt_state": opt, "rng": rng}, metrics

    batch_in = dict.fromkeys(_BATCH_KEYS, b_shard)
    jstep = jax.jit(step_fn, in_shardings=(state_shard, batch_in), out_shardings=(state_shard, rep),
                    donate_argnums=(0,))
    def eval_fn(p: Any, b: Batch) -> dict:
        with shd.activation_mesh(mesh):
            return eval_loss_fn(p, b)[1]

    jeval = jax.jit(eval_fn, in_shardings=(p_shard, batch_in), out_shardings=rep)
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
        write(msg)


def train(cfg: SwitchConfig, tc: TrainConfig, data: TrainData, out_dir: str | os.PathLike | None = None,
          init_params: Any = None, stop_after: int | None = None, log: Callable[[str], None] = _log,
          ) -> TrainResult:
    """Train ``cfg`` for ``tc.steps`` steps (resuming from ``out_dir/checkpoints`` if present).

    ``init_params``: start from these weights (QAT / fine-tuning); otherwise random init with ``tc.seed``.
    ``stop_after``: stop (after saving) once this step is reached — used to simulate a killed run.
    """
    # -- validate everything before any compute --------------------------------------------------------
    cfg.validate()
    tc.validate()
    mesh_sizes = shd.parse_mesh(tc.mesh)
    shd.check_fits(cfg, mesh_sizes, data.batch_rows())
    if tc.qat_bits is not None and init_params is None:
        raise ConfigError("QAT needs a trained model to start from (--init DIR)")
    if init_params is not None:  # e.g. `--init M --set d_model=…`: the weights no longer fit the config
        from moqe_jax.checkpoint.store import check_params

        check_params(cfg, init_params, "the initial weights (--init)")
    mesh = shd.make_mesh(mesh_sizes)
    tx, jstep, jeval, state_shard = _compiled(cfg, tc, mesh)
    p_shard = state_shard["params"]

    # -- state: params (sharded by the rules), optimizer state, step, rng --------------------------------
    from moqe_jax.model.switch import init_params as model_init

    if init_params is None:
        if (cfg, mesh) not in _INIT:  # one compiled init per (config, mesh), the seed's key is its argument
            _INIT[(cfg, mesh)] = jax.jit(lambda key: model_init(cfg, key), out_shardings=p_shard)
        params = _INIT[(cfg, mesh)](jax.random.PRNGKey(tc.seed))
    else:
        def place(x: Any, s: Any) -> jax.Array:
            host = np.asarray(x, np.float32)
            return jax.make_array_from_callback(np.shape(host), s, lambda idx: host[idx])
        params = jax.tree.map(place, init_params, p_shard)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params),
             "rng": jax.random.key_data(jax.random.PRNGKey(tc.seed))}
    state = jax.device_put(state, state_shard)

    # -- checkpoints -----------------------------------------------------------------------------------------
    mngr = None
    start = 0
    if out_dir is not None:
        import orbax.checkpoint as ocp

        ckdir = Path(out_dir).absolute() / "checkpoints"
        # cleanup_tmp_directories: a save killed mid-write leaves `<step>.orbax-checkpoint-tmp-*`; it is removed
        # here, so it neither piles up nor blocks the next save of that step
        opts = ocp.CheckpointManagerOptions(max_to_keep=tc.keep, save_interval_steps=1,
                                            enable_async_checkpointing=tc.async_save, create=True,
                                            cleanup_tmp_directories=True)
        mngr = ocp.CheckpointManager(ckdir, options=opts)
        latest = mngr.latest_step()
        if latest is not None:
            _check_resume(Path(out_dir), cfg, tc)
            try:
                restored = mngr.restore(latest, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged/foreign dir
                mngr.close()
                raise CheckpointError(f"{ckdir}: cannot resume step {latest} ({type(e).__name__}: {e}"
                                      .splitlines()[0] + "); use a fresh --out") from e
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

    def kept() -> str:
        ckd = Path(out_dir or ".").absolute() / "checkpoints"
        steps = _finished_steps(ckd)
        return (f"the last good checkpoint (step {steps[-1]}) is kept in {ckd}" if steps
                else f"no checkpoint was saved in {ckd}")

    def save_failed(e: BaseException, step: int) -> CheckpointError:
        """One line for an Orbax training-checkpoint save that failed (a full disk, often wrapped by Orbax's
        writer threads): the run directory, what is kept, the fix."""
        from moqe_jax.checkpoint.store import _no_space

        if mngr is not None:
            _quietly(mngr.wait_until_finished)  # let other in-flight writes finish (or fail) first
        fix = "free disk space" if _no_space(e) else "check free space and permissions"
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return CheckpointError(f"{out_dir}: saving the training checkpoint of step {step} failed "
                               f"({type(e).__name__}{': ' + cause if cause else ''}); {kept()}; {fix} and rerun "
                               "the same command to resume from it")

    def save(step: int, force: bool = False) -> None:
        if mngr is None:
            return
        import orbax.checkpoint as ocp

        try:
            mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({"data_position": step, "seed": tc.seed})), force=force)
        except Exception as e:  # noqa: BLE001 - orbax raises OSError or wraps it (ExceptionGroup, ValueError, ...)
            raise save_failed(e, step) from e

    def run_eval(step: int) -> dict:
        acc: dict[str, float] = {}
        tot = 0.0
        for b in data.eval_batches(tc.eval_batches):
            m = to_host(jeval(state["params"], shd.shard_batch(b, mesh)))
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
    if start < end:  # the first step compiles (about a minute on a laptop CPU for small-mt): say so
        log(f"training {cfg.name} steps {start + 1}..{end}: compiling the train step ...")
    bar = progress(total=end, initial=start, desc="train", enable=None if jax.process_index() == 0 else False)
    t0, tok_acc, last_log = time.perf_counter(), 0.0, start
    jsonl = None
    if out_dir is not None and jax.process_index() == 0:
        jsonl = open(Path(out_dir) / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    finished = False
    try:
        for step in range(start, end):
            host_batch = data.batch(step)
            _check_ids(host_batch, cfg.vocab_size, step + 1)
            batch = shd.shard_batch(host_batch, mesh)
            new_state, metrics = jstep(state, batch)  # state is donated: only new_state is valid now
            m = to_host(metrics)
            if not float(m.pop("finite")) > 0:
                last = mngr.latest_step() if mngr is not None else None
                ckd = Path(out_dir or ".") / "checkpoints"
                keep = f"the last good checkpoint (step {last}) is kept in {ckd}" if last is not None \
                    else "no checkpoint was saved"
                raise TrainingDivergedError(
                    f"non-finite loss at step {step + 1} (loss {float(m['loss'])}, grad norm "
                    f"{float(m['grad_norm'])}): stopped without saving; {keep} (lower --lr, check the data)")
            state = new_state
            tok_acc += float(m["tokens"])
            rec = {"step": step + 1, **{k: float(v) for k, v in m.items() if np.ndim(v) == 0},
                   "expert_usage": [round(float(u), 4) for u in np.ravel(m["expert_usage"])]}
            history.append(rec)
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
                jsonl.flush()
            if tc.eval_every and (s % tc.eval_every == 0 or s == tc.steps):
                ev = run_eval(s)
                eval_history.append(ev)
                if jsonl is not None:
                    jsonl.write(json.dumps(ev) + "\n")
                    jsonl.flush()
            if tc.save_every and (s % tc.save_every == 0 or s == end):
                save(s, force=True)
        if mngr is not None:
            try:  # the async writes of the last saves: a full disk surfaces here
                mngr.wait_until_finished()
            except Exception as e:  # noqa: BLE001
                raise save_failed(e, end) from e
        finished = True
    except KeyboardInterrupt:
        if mngr is not None:  # Ctrl-C: finish (or drop) the in-flight write, remove partial step directories
            _quietly(mngr.wait_until_finished)
            _remove_partial_steps(Path(out_dir or ".").absolute() / "checkpoints")
            log(f"{out_dir}: training interrupted; {kept()}; rerun the same command to resume from it")
        raise
    finally:
        bar.close()
        if jsonl is not None:
            jsonl.close()
        if mngr is not None:
            try:
                mngr.close()
            except Exception as e:  # noqa: BLE001 - only reported when nothing else failed first
                if finished:
                    raise save_failed(e, end) from e
    return TrainResult(state["params"], int(state["step"]), history, eval_history)


def _quietly(fn: Callable[[], Any]) -> None:
    """Run ``fn`` (waiting for Orbax writers) while another error is already being reported."""
    try:
        fn()
    except Exception:  # noqa: BLE001, S110 - the first error is the one the user sees
        pass


def _finished_steps(ckdir: Path) -> list[int]:
    """Step directories Orbax finalized (an unfinished write is still named `<step>.orbax-checkpoint-tmp-*`)."""
    try:
        return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit() and p.is_dir())
    except OSError:
        return []


def _remove_partial_steps(ckdir: Path) -> None:
    """Remove `<step>.orbax-checkpoint-tmp-*` directories left by an interrupted save (never a finished step)."""
    import shutil

    if jax.process_index() != 0 or not ckdir.is_dir():
        return
    for p in ckdir.iterdir():
        if ".orbax-checkpoint-tmp" in p.name and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _check_ids(batch: Batch, vocab: int, step: int) -> None:
    """Token ids must index the model's vocabulary (out-of-range ids make the loss NaN on accelerators)."""
    for k in ("input_ids", "decoder_input_ids", "targets"):
        a = np.asarray(batch[k])
        if a.size and (int(a.max()) >= vocab or int(a.min()) < 0):
            raise DataError(f"batch {step}: {k} holds token id {int(a.max()) if a.max() >= vocab else int(a.min())} "
                            f"outside the model's vocabulary [0, {vocab}) (tokenizer and model vocab_size differ)")


def _check_resume(out_dir: Path, cfg: SwitchConfig, tc: TrainConfig) -> None:
    """A run resumed in ``out_dir`` must have the model config (and optimizer) it was started with."""
    f = out_dir / "model_config.json"
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except (OSError, ValueError):
            old = None
        new = json.loads(json.dumps(cfg.to_dict()))
        if isinstance(old, dict):
            # fields added to SwitchConfig after the run started (e.g. dropout_rate) read as their defaults
            defaults = {f.name: f.default for f in dataclasses.fields(SwitchConfig)}
            old = {**json.loads(json.dumps({k: defaults[k] for k in new if k not in old and k in defaults})), **old}
            old.pop("name", None)
            new.pop("name", None)
        if old != new:
            diff = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
            raise ConfigError(f"{out_dir}: holds checkpoints of another model config (differs in "
                              f"{', '.join(diff[:4]) or 'format'}); use a fresh --out or the same --config/--set")
    f = out_dir / "train_config.json"
    if f.is_file():
        try:
            old_opt = json.loads(f.read_text()).get("optimizer")
        except (OSError, ValueError, AttributeError):
            old_opt = None
        if old_opt is not None and old_opt != tc.optimizer:
            raise ConfigError(f"{out_dir}: was trained with --optimizer {old_opt}; resume with the same optimizer "
                              "or use a fresh --out")


def save_final_model(cfg: SwitchConfig, params: Any, directory: str | os.PathLike, dtype: str = "float32",
                     format: str = "safetensors") -> str:
    """Export trained params with the checkpoint store (``Model.save`` format), float leaves cast to ``dtype``."""
    from moqe_jax.checkpoint.store import save_params

    host = to_host(params)
    if jax.process_index() != 0:
        return str(directory)
    if dtype == "bfloat16":
        import ml_dtypes

        host = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16) if a.dtype == np.float32 else a, host)
    return save_params(host, directory, config=cfg.to_dict(), format=format)
