"""QAT recipe (MoQE §4/§6): 2-bit expert-only QAT of the bundled MoE model vs 2-bit RTN, BLEU per direction.

    python -m train.qat --model moqe_jax/assets/default/moe --data work_data/corpus --bits 2 --steps 300 \\
        --out runs/qat2

1. float model: BLEU/chrF per direction (sacrebleu, greedy ``Model.generate``, test-split sample);
2. RTN: ``moqe_jax.quantize(model, QuantSpec(bits), components=("experts",))`` — same table;
3. QAT: ``moqe_jax.training.qat_finetune`` (the training loop from the float weights with
   ``fake_quant_params`` (STE) on the expert kernels in the loss), then ``export_qat`` → a packed
   ``QuantizedTensor`` model, saved with ``Model.save`` under ``<out>/model`` — same table.
Writes ``<out>/qat_report.json`` and ``<out>/qat_report.md``.

One tokenizer for training and evaluation: the model's (``--tokenizer``, else ``<model>/tokenizer``, else
``<model>/../tokenizer`` as in the bundled assets, else ``<data>/tokenizer`` for a model trained by
``moqe train`` on that corpus), so the fine-tuning data is tokenized with the vocabulary the model was trained
with; a different ``<data>/tokenizer`` is not used (a note says so).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _table(results: dict[str, dict]) -> str:
    names = list(results)
    dirs = list(next(iter(results.values()))["per_direction"])
    lines = ["| direction | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for d in dirs:
        lines.append(f"| {d} | " + " | ".join(f"{results[n]['per_direction'][d]:.2f}" for n in names) + " |")
    lines.append("| **avg BLEU** | " + " | ".join(f"**{results[n]['bleu']:.2f}**" for n in names) + " |")
    lines.append("| avg chrF | " + " | ".join(f"{results[n]['chrf']:.2f}" for n in names) + " |")
    lines.append("| teacher-forced CE | " + " | ".join(f"{results[n]['mt_ce']:.4f}" for n in names) + " |")
    return "\n".join(lines)


RUNS = ("float", "rtn", "qat", "ft", "ft-rtn")


def resolve_tokenizer(arg: str | None, model: str, data: str) -> Path:
    """The tokenizer used for both training data and evaluation (see the module docstring); one ``DataError``
    naming ``--tokenizer`` when none exists."""
    from moqe_jax.errors import DataError

    cands = [Path(arg)] if arg else [Path(model) / "tokenizer", Path(model).parent / "tokenizer",
                                     Path(data) / "tokenizer"]
    for c in cands:
        if c.exists():
            return c
    raise DataError(f"no tokenizer found (looked in {', '.join(map(str, cands))}); pass --tokenizer DIR "
                    "(the SentencePiece tokenizer the model was trained with)")


def _spm_bytes(tok: Path) -> bytes | None:
    f = tok / "spm.model" if tok.is_dir() else tok
    return f.read_bytes() if f.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "moqe_jax" / "assets" / "default" / "moe"))
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for training data and evaluation (default: <model>/tokenizer, "
                        "<model>/../tokenizer, then <data>/tokenizer)")
    p.add_argument("--data", default="work_data/corpus")
    p.add_argument("--bits", default="2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=50, help="test sentences per direction for BLEU")
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--runs", default=",".join(RUNS),
                   help="float, rtn, qat, ft (float fine-tune control: same data/steps/lr without quantization), "
                        "ft-rtn (RTN of the fine-tuned float model); results merge into <out>/qat_report.json")
    p.add_argument("--out", default="runs/qat2")
    a = p.parse_args(argv)

    from moqe_jax.api import Model, load_model
    from moqe_jax.evaluate import evaluate_model
    from moqe_jax.packed.spec import QuantSpec
    from moqe_jax.pipeline import quantize
    from moqe_jax.training import TrainConfig, load_mt_data, qat_finetune, train
    from moqe_jax.tree import to_host

    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise SystemExit(f"unknown --runs {bad}; choose from {', '.join(RUNS)}")
    bits: int | str = a.bits if a.bits == "ternary" else int(a.bits)
    spec = QuantSpec(bits=bits)
    tok_path = resolve_tokenizer(a.tokenizer, a.model, a.data)
    tok = str(tok_path)
    data_tok = Path(a.data) / "tokenizer"
    if data_tok.exists() and _spm_bytes(data_tok.resolve()) != _spm_bytes(tok_path.resolve()):
        print(f"qat: note: training data tokenized with {tok_path} (the model's), not {data_tok}", file=sys.stderr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rep_path = out / "qat_report.json"
    report: dict[str, Any] = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
    report.update({"bits": bits, "steps": a.steps, "lr": a.lr, "samples_per_direction": a.samples})
    results: dict[str, dict] = report.setdefault("results", {})
    model = load_model(a.model)
    model = model.replace(params=to_host(model.params))
    names = {"float": "float", "rtn": f"RTN-{bits}bit", "qat": f"QAT-{bits}bit", "ft": "float+FT",
             "ft-rtn": f"float+FT RTN-{bits}bit"}

    def ev(m: Any, key: str) -> None:
        t = time.time()
        r = evaluate_model(m, tokenizer=tok, data=a.data, directions="all", samples=a.samples, mt_loss=True,
                           buckets=(16, 32, 64), max_new_tokens=None)
        print(f"{names[key]}: BLEU {r.bleu:.2f} chrF {r.chrf:.2f} CE {r.mt_ce:.4f} ({time.time() - t:.0f}s)",
              flush=True)
        results[names[key]] = {"bleu": r.bleu, "chrf": r.chrf, "mt_ce": r.mt_ce,
                               "per_direction": {d: x.bleu for d, x in r.directions.items()}}

    data = None
    if {"qat", "ft", "ft-rtn"} & set(runs):
        data = load_mt_data(a.data, TrainConfig(batch_size=32, tokens_per_batch=2048, seed=1), max_len=a.max_len,
                            tokenizer_dir=tok_path, vocab_size=model.config.vocab_size)
    if "float" in runs:
        ev(model, "float")
    if "rtn" in runs:
        ev(quantize(model, spec, components=("experts",), method="rtn"), "rtn")
    if "qat" in runs:
        qat_model, tr = qat_finetune(model, data, bits=bits, steps=a.steps, lr=a.lr, out_dir=out / "run", seed=1)
        ev(qat_model, "qat")
        qat_model.save(out / "model")
        import jax

        from moqe_jax.packed.qtensor import QuantizedTensor

        report["packed_quantized_tensors"] = sum(
            isinstance(x, QuantizedTensor)
            for x in jax.tree.leaves(qat_model.params, is_leaf=lambda x: isinstance(x, QuantizedTensor)))
        report["qat_train_loss_first_last"] = [tr.history[0]["loss"], tr.history[-1]["loss"]]
    if "ft" in runs or "ft-rtn" in runs:  # the control: identical fine-tune (data, steps, lr, seed), no quantization
        tc = TrainConfig(steps=a.steps, batch_size=32, tokens_per_batch=2048, optimizer="adafactor",
                         learning_rate=a.lr, schedule="constant", warmup_steps=0, seed=1, log_every=25,
                         eval_every=a.steps, eval_batches=4, save_every=max(a.steps // 2, 1))
        ft = Model(model.config, to_host(train(model.config, tc, data, out / "run-ft",
                                                   init_params=model.params).params))
        if "ft" in runs:
            ev(ft, "ft")
        if "ft-rtn" in runs:
            ev(quantize(ft, spec, components=("experts",), method="rtn"), "ft-rtn")
    order = [names[k] for k in RUNS if names[k] in results]
    results = {k: results[k] for k in order}
    report["results"] = results
    b = {k: v["bleu"] for k, v in results.items()}
    q, fl, rt = b.get(names["qat"]), b.get(names["ft"]), b.get(names["ft-rtn"])
    if None not in (q, fl, rt) and fl > rt:
        report["qat_recovered_fraction_vs_same_budget_rtn"] = (q - rt) / (fl - rt)
    (rep_path).write_text(json.dumps(report, indent=1))
    md = (f"# {bits}-bit expert-only QAT vs RTN ({a.steps} steps, lr {a.lr}, {a.samples} test sentences per "
          f"direction, greedy)\n\n" + _table(results) + "\n\n"
          "`float` = the bundled model; `float+FT` = the same fine-tune as QAT (data, steps, lr, seed) without "
          "quantization, the fair reference for QAT; RTN columns quantize the experts of the column's float "
          "model with round-to-nearest (channel-wise, symmetric).\n")
    (out / "qat_report.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    from moqe_jax.errors import MoqeError

    try:
        sys.exit(main())
    except MoqeError as e:  # bad input: one line, no traceback
        sys.exit(f"qat: error: {e}")
