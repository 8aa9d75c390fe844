"""``moqe train``: pretrain a Switch MoE / dense model on the gettext MT corpus, or STE-QAT its experts."""

from __future__ import annotations

import argparse
from typing import Any

from moqe_jax.commands.common import (
    add_config_args,
    add_distributed_args,
    apply_sets,
    config_value,
    init_distributed,
    model_source,
    parse_sets,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a Switch model (MoE or dense) on the MT corpus, or QAT its experts")
    add_config_args(p, "preset name or a config JSON file (default small-mt; ignored with --init)", default="small-mt")
    p.add_argument("--data", default=None,
                   help="corpus directory from `moqe data build`, or 'synthetic' (default: $MOQE_DATA, "
                        "work_data/corpus, data/corpus, then the corpus `moqe demo` cached)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir (default <data>/tokenizer, else --init's tokenizer/, else the bundled one)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, help="run directory (checkpoints/, metrics.jsonl, model/)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tokens-per-batch", type=int, default=None, help="rows per bucket = tokens // bucket length")
    p.add_argument("--max-len", type=int, default=96, help="MT: longest example kept; MLM: corrupted input length")
    p.add_argument("--objective", choices=("mt", "mlm"), default="mt",
                   help="mt: translation (20 directions); mlm: T5 span corruption of the English side")
    p.add_argument("--optimizer", choices=("adafactor", "adamw"), default="adafactor")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default 0.01 adafactor, 1e-3 adamw)")
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--schedule", choices=("rsqrt", "constant", "cosine"), default="rsqrt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default="", help="e.g. data=2,expert=2 (default: one device)")
    p.add_argument("--qat-bits", default=None, help="STE QAT of --qat-components to this many bits (or 'ternary')")
    p.add_argument("--qat-components", default="experts")
    p.add_argument("--qat-granularity", default="channel", help="'channel' or a group size")
    p.add_argument("--init", default=None, help="start from this saved model directory or 'default' (required for QAT)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the exported <out>/model weights")
    add_distributed_args(p)
    p.set_defaults(func=_train)


def _corpus_and_tokenizer(args: argparse.Namespace) -> tuple[str, str]:
    """The corpus (``--data`` or the default search, docs/DATA.md) and its tokenizer: ``--tokenizer``, the
    corpus's ``tokenizer/``, ``--init``'s ``tokenizer/``, then the bundled one."""
    from pathlib import Path

    from moqe_jax.commands.common import local_dir
    from moqe_jax.data.locate import resolve_corpus, resolve_tokenizer

    corpus = resolve_corpus(args.data, "train.jsonl")
    if args.tokenizer:
        return corpus, args.tokenizer
    if (Path(corpus) / "tokenizer").exists():
        return corpus, str(Path(corpus) / "tokenizer")
    return corpus, str(resolve_tokenizer(None, local_dir(args.init) if args.init else None, None))


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moqe_jax import sharding as shd
    from moqe_jax.training import (
        SyntheticData,
        TrainConfig,
        load_mlm_data,
        load_mt_data,
        save_final_model,
        train,
    )

    init_distributed(args)
    init_params = None
    if args.init:
        from moqe_jax.api import load_model

        m = load_model(model_source(args.init))
        cfg = apply_sets(m.config, parse_sets(args.set))
        init_params = m.params
    else:
        cfg = apply_sets(config_value(args.config), parse_sets(args.set))
    lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "adafactor" else 1e-3)
    gran: Any = int(args.qat_granularity) if str(args.qat_granularity).isdigit() else args.qat_granularity
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, tokens_per_batch=args.tokens_per_batch,
                     optimizer=args.optimizer, learning_rate=lr, warmup_steps=args.warmup, schedule=args.schedule,
                     seed=args.seed, mesh=shd.parse_mesh(args.mesh), log_every=args.log_every,
                     eval_every=args.eval_every, save_every=args.save_every, keep=args.keep,
                     qat_bits=args.qat_bits, qat_components=tuple(args.qat_components.split(",")),
                     qat_granularity=gran)
    tc.validate()
    shd.check_fits(cfg, tc.mesh, [tc.batch_size] if tc.tokens_per_batch is None else [])
    data: Any
    if args.data == "synthetic":
        data = SyntheticData(cfg.vocab_size, args.batch_size, 16, args.seed)
    else:
        corpus, tok = _corpus_and_tokenizer(args)
        if args.objective == "mlm":
            data = load_mlm_data(corpus, tc, inputs_length=args.max_len, tokenizer_dir=tok,
                                 vocab_size=cfg.vocab_size)
        else:
            data = load_mt_data(corpus, tc, max_len=args.max_len, tokenizer_dir=tok, vocab_size=cfg.vocab_size)
    res = train(cfg, tc, data, args.out, init_params=init_params)
    if tc.qat_bits is not None:  # QAT: float master weights + the packed QuantizedTensor export (MoQE deployable)
        from moqe_jax.api import Model
        from moqe_jax.quant.ste import export_qat
        from moqe_jax.tree import to_host

        save_final_model(cfg, res.params, Path(args.out) / "model-float", dtype=args.save_dtype)
        import jax

        spec = tc.qat_spec()
        assert spec is not None  # qat_bits is set
        packed = Model(cfg, export_qat(to_host(res.params), spec, tc.qat_components))
        out: str | Path = Path(args.out) / "model"
        if jax.process_index() == 0:  # one writer; to_host gathered the params on every process (Orbax would
            out = packed.save(out, format="safetensors" if jax.process_count() > 1 else "orbax")  # wait for all)
        print(f"QAT {res.step} steps; packed {tc.qat_bits}-bit model saved to {out} (float masters: model-float)")
        return 0
    final = save_final_model(cfg, res.params, Path(args.out) / "model", dtype=args.save_dtype)
    print(f"trained {res.step} steps; model saved to {final}")
    return 0
