"""``moqe info``: parameter counts per component (and, for a saved/HF/T5X model, storage facts).

``moqe info --preset switch-c-2048 [--json]`` works without allocating weights (``jax.eval_shape``).
``moqe info MODEL`` accepts ``hf:DIR``, ``t5x:DIR`` (its ``config.json`` or ``--config``), ``qmoe:DIR`` (a QMoE
checkpoint, e.g. from ``moqe convert --to-qmoe``), a ``Model.save`` directory or ``default`` (the bundled model);
``--config NAME|FILE.json`` alone reports a config's counts.
Byte sizes use decimal units (MB = 10^6 bytes), as the size report does.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from moqe_jax.commands.common import MODEL_HELP, add_config_args, config_from_args, load_model_args, local_dir
from moqe_jax.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("info", help="model / size report (parameter counts per component)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", metavar="MODEL", help=MODEL_HELP)
    add_config_args(p, "config preset name or JSON file: reported alone without MODEL; the config of a t5x: "
                       "MODEL that has no config.json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _leaf_kind(leaf: Any) -> str:
    from moqe_jax.packed import is_packed

    if is_packed(leaf):
        return f"{type(leaf).__name__}({leaf.spec.describe()})"
    return str(getattr(leaf, "dtype", None))


def info_dict(cfg: Any, model: Any = None, source: str | None = None) -> dict[str, Any]:
    """The report as a JSON-serialisable dict."""
    from moqe_jax.model.api import param_counts

    counts = param_counts(cfg)
    total = sum(counts.values())
    out: dict[str, Any] = {
        "name": cfg.name,
        "config": cfg.to_dict(),
        "sparse_layers": {"encoder": list(cfg.sparse_layers("encoder")), "decoder": list(cfg.sparse_layers("decoder"))},
        "components": {k: {"params": v, "bytes_bf16": 2 * v} for k, v in counts.items() if v},
        "total_params": total,
        "total_bytes_bf16": 2 * total,
    }
    if model is not None:
        import jax

        from moqe_jax.checkpoint.store import disk_size
        from moqe_jax.packed import is_packed

        leaves = jax.tree_util.tree_leaves(model.params, is_leaf=is_packed)
        out["dtypes"] = dict(Counter(_leaf_kind(x) for x in leaves))
        p = local_dir(source) if source is not None else None
        if p is not None:
            out["disk_bytes"] = disk_size(p)
        if any(is_packed(x) for x in leaves):
            rep = model.size_report()
            out["size_report"] = rep.to_dict()
            out["size_report_text"] = str(rep)
    return out


def _print_text(d: dict[str, Any]) -> None:
    from moqe_jax.quant.report import fmt_bytes, fmt_count

    c = d["config"]
    print(f"{d['name']}: d_model={c['d_model']} d_ff={c['d_ff']} heads={c['num_heads']}x{c['d_kv']} "
          f"layers={c['num_layers']}+{c['num_decoder_layers']} experts={c['num_experts']} "
          f"act={c['activation']} vocab={c['vocab_size']} tied={c['tie_word_embeddings']}")
    print(f"sparse layers: encoder {d['sparse_layers']['encoder']} decoder {d['sparse_layers']['decoder']}")
    print(f"{'component':<12} {'params':>12} {'bf16':>12} {'share':>7}   (bytes: MB = 10^6)")
    for k, v in d["components"].items():
        print(f"{k:<12} {fmt_count(v['params']):>12} {fmt_bytes(v['bytes_bf16']):>12} "
              f"{100 * v['params'] / d['total_params']:6.2f}%")
    print(f"{'total':<12} {fmt_count(d['total_params']):>12} {fmt_bytes(d['total_bytes_bf16']):>12}")
    if "dtypes" in d:
        print("leaf types: " + ", ".join(f"{k}×{v}" for k, v in d["dtypes"].items()))
    if "disk_bytes" in d:
        print(f"on disk: {fmt_bytes(d['disk_bytes'])}")
    if "size_report_text" in d:
        print(d["size_report_text"])


def run(args: argparse.Namespace) -> int:
    if args.path is None:
        cfg = config_from_args(args)
        if cfg is None:
            raise ConfigError("give a MODEL (hf:DIR, t5x:DIR, qmoe:DIR, saved dir, default) or --config NAME|FILE.json")
        d = info_dict(cfg)
    else:
        model = load_model_args(args, args.path)
        d = info_dict(model.config, model, args.path)
    if args.json:
        d.pop("size_report_text", None)
        print(json.dumps(d, indent=2, default=str))
    else:
        _print_text(d)
    return 0
