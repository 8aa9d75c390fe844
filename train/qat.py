"""QAT recipe (MoQE §4/§6): 2-bit expert-only QAT of the bundled MoE model vs 2-bit RTN, BLEU per direction.

    python -m train.qat --model moqe_jax/assets/default/moe --data work_data/corpus --bits 2 --steps 300 \\
        --out runs/qat2

1. float model: BLEU/chrF per direction (sacrebleu, greedy ``Model.generate``, test-split sample);
2. RTN: ``moqe_jax.quantize(model, QuantSpec(bits), components=("experts",))`` — same table;
3. QAT: the training loop (`train.train.train`) from the float weights with ``fake_quant_params`` (STE) on
   the expert kernels in the loss, then ``export_qat`` → a packed ``QuantizedTensor`` model, saved with
   ``Model.save`` under ``<out>/model`` — same table.
Writes ``<out>/qat_report.json`` and ``<out>/qat_report.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def qat_finetune(model: Any, data: Any, bits: int | str = 2, steps: int = 300, lr: float = 1e-3,
                 components: tuple[str, ...] = ("experts",), granularity: str | int = "channel",
                 out_dir: str | Path | None = None, seed: int = 0, batch_size: int = 32,
                 tokens_per_batch: int | None = 2048, mesh: dict[str, int] | None = None, log: Any = None) -> Any:
    """STE QAT of ``components`` of ``model`` → ``(Model with packed QuantizedTensor leaves, TrainResult)``."""
    from moqe_jax.model.api import Model
    from moqe_jax.quant.spec import QuantSpec
    from moqe_jax.quant.ste import export_qat
    from train.train import TrainConfig, train

    tc = TrainConfig(steps=steps, batch_size=batch_size, tokens_per_batch=tokens_per_batch, optimizer="adafactor",
                     learning_rate=lr, schedule="constant", warmup_steps=0, seed=seed,
                     mesh=mesh or {"data": 1, "expert": 1, "model": 1}, log_every=25, eval_every=max(steps, 1),
                     eval_batches=4, save_every=max(steps // 2, 1), qat_bits=bits, qat_components=tuple(components),
                     qat_granularity=granularity)
    kw = {} if log is None else {"log": log}
    res = train(model.config, tc, data, out_dir, init_params=model.params, **kw)
    spec = QuantSpec(bits=bits if bits == "ternary" else int(bits), granularity=granularity)
    qparams = export_qat(jax_to_host(res.params), spec, components)
    return Model(model.config, qparams), res


def jax_to_host(tree: Any) -> Any:
    import jax
    import numpy as np

    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


def _table(results: dict[str, Any]) -> str:
    names = list(results)
    dirs = list(next(iter(results.values())).directions)
    lines = ["| direction | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for d in dirs:
        lines.append(f"| {d} | " + " | ".join(f"{results[n].directions[d].bleu:.2f}" for n in names) + " |")
    lines.append("| **avg BLEU** | " + " | ".join(f"**{results[n].bleu:.2f}**" for n in names) + " |")
    lines.append("| avg chrF | " + " | ".join(f"{results[n].chrf:.2f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "moqe_jax" / "assets" / "default" / "moe"))
    p.add_argument("--tokenizer", default=None, help="default: <model>/../tokenizer")
    p.add_argument("--data", default="work_data/corpus")
    p.add_argument("--bits", default="2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=50, help="test sentences per direction for BLEU")
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--out", default="runs/qat2")
    a = p.parse_args(argv)

    from moqe_jax.evaluate import evaluate_model
    from moqe_jax.model.api import load_model
    from moqe_jax.pipeline import quantize
    from moqe_jax.quant.spec import QuantSpec
    from train.train import TrainConfig, load_mt_data

    bits: int | str = a.bits if a.bits == "ternary" else int(a.bits)
    tok = a.tokenizer or str(Path(a.model).parent / "tokenizer")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(a.model)
    model = model.replace(params=jax_to_host(model.params))

    def ev(m: Any, name: str) -> Any:
        t = time.time()
        r = evaluate_model(m, tokenizer=tok, data=a.data, directions="all", samples=a.samples, mt_loss=True,
                           buckets=(16, 32, 64), max_new_tokens=None)
        print(f"{name}: BLEU {r.bleu:.2f} chrF {r.chrf:.2f} CE {r.mt_ce:.4f} ({time.time() - t:.0f}s)", flush=True)
        return r

    results = {"float": ev(model, "float")}
    rtn = quantize(model, QuantSpec(bits=bits), components=("experts",), method="rtn")
    results[f"RTN-{bits}bit"] = ev(rtn, "rtn")
    data = load_mt_data(a.data, TrainConfig(batch_size=32, tokens_per_batch=2048, seed=1), max_len=a.max_len)
    qat_model, tr = qat_finetune(model, data, bits=bits, steps=a.steps, lr=a.lr, out_dir=out / "run", seed=1)
    results[f"QAT-{bits}bit"] = ev(qat_model, "qat")
    qat_model.save(out / "model")
    import jax

    from moqe_jax.quant.qtensor import QuantizedTensor

    n_packed = sum(isinstance(x, QuantizedTensor) for x in
                   jax.tree.leaves(qat_model.params, is_leaf=lambda x: isinstance(x, QuantizedTensor)))
    fl, rt, qa = (results[k].bleu for k in results)
    rec = (qa - rt) / (fl - rt) if fl > rt else float("nan")
    report = {"bits": bits, "steps": a.steps, "lr": a.lr, "samples_per_direction": a.samples,
              "bleu": {k: v.bleu for k, v in results.items()}, "chrf": {k: v.chrf for k, v in results.items()},
              "mt_ce": {k: v.mt_ce for k, v in results.items()},
              "per_direction": {k: {d: r.bleu for d, r in v.directions.items()} for k, v in results.items()},
              "recovered_fraction_of_rtn_bleu_loss": rec, "packed_quantized_tensors": n_packed,
              "qat_train_loss_first_last": [tr.history[0]["loss"], tr.history[-1]["loss"]] if tr.history else None}
    (out / "qat_report.json").write_text(json.dumps(report, indent=1))
    md = (f"# {bits}-bit expert QAT vs RTN ({a.steps} QAT steps, {a.samples} test sentences/direction)\n\n"
          + _table(results) + f"\n\nQAT recovers {rec:.0%} of the BLEU lost by RTN; exported model: "
          f"{n_packed} packed QuantizedTensor leaves in {out / 'model'}.\n")
    (out / "qat_report.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
