"""Arguments every model-taking command shares: ``MODEL`` (``default`` = the bundled model), ``--config
NAME|FILE.json`` and ``--set KEY=VALUE`` — defined once here, used by info, convert, quantize, compress, eval
(and train's ``--config``/``--set``)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from moqe_jax.errors import ConfigError

MODEL_HELP = ("hf:DIR, t5x:DIR (its config.json, or --config), qmoe:DIR, a saved model directory, init:PRESET "
              "(random weights) or 'default' (the bundled MoE model)")


def add_config_args(p: argparse.ArgumentParser, config_help: str | None = None, default: str | None = None) -> None:
    """``--config NAME|FILE.json`` (alias ``--preset``) and repeatable ``--set KEY=VALUE``."""
    p.add_argument("--config", "--preset", dest="config", default=default, metavar="NAME|FILE.json",
                   help=config_help or "config preset name or JSON file (SwitchConfig, HF config.json or a saved "
                                       "model's manifest); needed only for a t5x: MODEL without config.json")
    p.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a SwitchConfig field, e.g. --set routing_mode=hf (repeatable; JSON values)")
    p.add_argument("--nonfinite", choices=("warn", "error", "ignore"), default="warn",
                   help="weights with NaN/inf: warn (default), error (refuse to load) or ignore")
    p.add_argument("--allow-outside", action="store_true",
                   help="t5x: MODEL only: trust array paths that leave the checkpoint directory (absolute, gs://)")
    p.add_argument("--allow-missing-chunks", action="store_true",
                   help="t5x: MODEL only: read missing zarr chunks as the array's fill value instead of failing")


def add_weight_layout_arg(p: argparse.ArgumentParser) -> None:
    """``--weight-layout bytes|words`` for commands that run the model: passed to ``load_model(weight_layout=)``
    (``load_model_args`` does; ``moqe demo`` too), which repacks once after the load."""
    p.add_argument("--weight-layout", choices=("bytes", "words"), default=None,
                   help="hold packed (QuantizedTensor) weights in the byte layout or the kernels' uint32 word "
                        "layout (one exact repack after load; default: as the checkpoint stores them, bytes "
                        "unless saved in words; docs/KERNELS.md §2)")


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """``--coordinator``/``--num-processes``/``--process-id``/``--distributed``: a multi-host start
    (``jax.distributed``, docs/LAUNCH.md); each also read from ``MOQE_*`` environment variables."""
    g = p.add_argument_group("multi-host (docs/LAUNCH.md)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address (or MOQE_COORDINATOR / JAX_COORDINATOR_ADDRESS); not needed under "
                        "SLURM srun, Open MPI or on a Cloud TPU pod")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes (or MOQE_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1 (or MOQE_PROCESS_ID)")
    g.add_argument("--distributed", choices=("auto", "on", "off"), default=None,
                   help="auto (default, or MOQE_DISTRIBUTED): start jax.distributed when the settings above are "
                        "complete or a multi-process SLURM/Open MPI/TPU launch is detected; on: always; off: never")


def init_distributed(args: argparse.Namespace) -> bool:
    """Start ``jax.distributed`` as the ``add_distributed_args`` flags and environment ask (before any JAX work)."""
    import sys

    from moqe_jax.training.distributed import describe_processes, maybe_init_distributed

    started = maybe_init_distributed(args.coordinator, args.num_processes, args.process_id, args.distributed)
    if started:  # one line per process: shows at once which processes joined and what each sees
        print(f"moqe: multi-host {describe_processes()}", file=sys.stderr, flush=True)
    return started


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: json(v) or the string v}``."""
    out: dict[str, Any] = {}
    for kv in items or []:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {kv!r}")
        try:
            out[k.strip()] = json.loads(v.strip())
        except json.JSONDecodeError:
            out[k.strip()] = v.strip()
    return out


def config_value(name: str | None) -> Any:
    """``--config`` as a ``SwitchConfig`` (preset name or JSON file), or None."""
    if not name:
        return None
    from moqe_jax.api import read_config_file
    from moqe_jax.config import SwitchConfig

    if os.path.isfile(name):
        return read_config_file(name)
    if name.endswith(".json"):
        raise ConfigError(f"--config {name}: no such file")
    return SwitchConfig.preset(name)


def apply_sets(cfg: Any, sets: dict[str, Any]) -> Any:
    return cfg.replace(**sets) if sets else cfg


def config_from_args(args: argparse.Namespace) -> Any:
    """``--config`` + ``--set`` as a ``SwitchConfig``, or None when no ``--config`` was given."""
    cfg = config_value(args.config)
    return None if cfg is None else apply_sets(cfg, parse_sets(args.set))


def model_source(name: str) -> str:
    """``default`` -> the bundled MoE model's directory; anything else unchanged."""
    if name == "default":
        from moqe_jax.data.locate import BUNDLED

        return str(BUNDLED / "moe")
    return name


def local_dir(source: str) -> str | None:
    """The local directory a model source names (for its tokenizer/ and disk size), if any."""
    src = model_source(source)
    if src.startswith("init:"):
        return None
    return src.split(":", 1)[1] if src.startswith(("hf:", "t5x:", "qmoe:")) else src


def _check_shapes(model: Any, cfg: Any, src: str) -> None:
    from moqe_jax.model.api import param_shapes
    from moqe_jax.tree import flatten_params

    want = param_shapes(cfg)
    have = {k: tuple(v.shape) for k, v in flatten_params(model.params).items()}
    for p in sorted(set(want) | set(have)):
        if p not in have:
            raise ConfigError(f"{src}: config {cfg.name} has parameter {p}, the model does not")
        if p not in want:
            raise ConfigError(f"{src}: model parameter {p} is not in config {cfg.name}")
        if tuple(want[p]) != have[p]:
            raise ConfigError(f"{src}: {p} has shape {list(have[p])}, config {cfg.name} expects {list(want[p])}")


def load_model_args(args: argparse.Namespace, source: str | None = None, seed: int = 0) -> Any:
    """The ``Model`` named by ``source`` (default ``args.model``) with ``args.config``/``args.set`` applied:
    ``--config`` is the config of a ``t5x:``/``hf:``/``init:`` source and replaces a saved model's (shapes must
    agree); ``--set`` overrides fields of whichever config the model ends up with. ``--allow-outside`` /
    ``--allow-missing-chunks`` go to ``load_model``, whose own check refuses them for non-``t5x:`` sources;
    its error is renamed here to name the CLI flags. ``--weight-layout`` (``add_weight_layout_arg``) goes to
    ``load_model(weight_layout=)`` (an ``init:`` source has float weights only: nothing to repack)."""
    try:
        model = _load_model_args(args, source, seed)
    except ConfigError as e:
        if _TRUST_KW not in str(e):
            raise
        raise ConfigError(str(e).replace(_TRUST_KW, "--allow-outside/--allow-missing-chunks")) from None
    return model


_TRUST_KW = "allow_outside/allow_missing_chunks"  # how load_model's check names the options


def _load_model_args(args: argparse.Namespace, source: str | None, seed: int) -> Any:
    from moqe_jax.api import Model, load_model, t5x_config
    from moqe_jax.config import SwitchConfig

    src = model_source(source if source is not None else args.model)
    base = config_value(getattr(args, "config", None))
    sets = parse_sets(getattr(args, "set", None))
    kernels = getattr(args, "kernels", "auto")
    opts: dict[str, Any] = {"nonfinite": getattr(args, "nonfinite", "warn"),
                            "allow_outside": getattr(args, "allow_outside", False),
                            "allow_missing_chunks": getattr(args, "allow_missing_chunks", False),
                            "weight_layout": getattr(args, "weight_layout", None)}
    if src.startswith("init:") and not (opts["allow_outside"] or opts["allow_missing_chunks"]):  # float weights
        cfg = apply_sets(base or SwitchConfig.preset(src[5:]), sets)  # (with a trust flag: load_model refuses)
        return Model.init(cfg, seed=seed).with_kernels(kernels)
    if src.startswith("t5x:"):
        base = base or t5x_config(src[4:])
        if base is None:
            raise ConfigError(f"{src}: T5X checkpoints carry no config and no config.json was found next to it; "
                              "pass --config NAME|FILE.json (e.g. --config switch-base-8)")
        return load_model(src, apply_sets(base, sets), **opts).with_kernels(kernels)
    if src.startswith("hf:"):
        if sets and base is None:
            from moqe_jax.checkpoint.hf_export import export_config

            base = export_config(src[3:]) or SwitchConfig.from_hf(src[3:])
        return load_model(src, None if base is None else apply_sets(base, sets), **opts).with_kernels(kernels)
    model = load_model(src, **opts)
    if base is None and not sets:
        return model.with_kernels(kernels)
    cfg = apply_sets(base or model.config, sets)
    _check_shapes(model, cfg, src)
    return model.replace(config=cfg).with_kernels(kernels)
