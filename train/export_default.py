"""Export the trained default MoE + dense twin into ``moqe_jax/assets/default/{moe,dense,tokenizer}`` (≤ 25 MB).

    python -m train.export_default --moe runs/default-moe/model --dense runs/default-dense/model \\
        --tokenizer work_data/corpus/tokenizer --data work_data/corpus --samples 50

Weights are stored bf16 in the checkpoint store's safetensors format (``Model.save`` layout); the
tokenizer's ``spm.model`` is copied. With ``--data`` both shipped models are evaluated (sacrebleu BLEU/chrF
per direction, greedy ``Model.generate`` on a seeded test-split sample) into ``<assets>/EVAL.md`` + ``eval.json``.

``--eval-only --data DIR`` re-measures the models already in ``--out`` (e.g. after a change of the generation
path) and rewrites only ``EVAL.md`` + ``eval.json``; weights, tokenizer and ``sample.jsonl`` are not touched:

    python -m train.export_default --eval-only --data work_data/corpus --samples 50
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "moqe_jax" / "assets" / "default"
MAX_BYTES = 25 * 1024 * 1024


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def export(src: str | Path, dst: Path, name: str | None = None) -> None:
    import jax
    import ml_dtypes
    import numpy as np

    from moqe_jax.api import load_model
    from moqe_jax.checkpoint.store import save_params

    m = load_model(str(src))
    host = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), m.params)
    if dst.exists():
        shutil.rmtree(dst)
    cfg = m.config.replace(name=name) if name else m.config
    save_params(host, dst, config=cfg.to_dict(), format="safetensors")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", default="runs/default-moe/model")
    p.add_argument("--dense", default="runs/default-dense/model")
    p.add_argument("--tokenizer", default="work_data/corpus/tokenizer")
    p.add_argument("--data", default=None, help="corpus dir: evaluate BLEU of the shipped models")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--out", default=str(ASSETS))
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the models already in --out and write EVAL.md/eval.json only (needs --data)")
    a = p.parse_args(argv)
    out = Path(a.out)
    command = "python -m train.export_default " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.eval_only:
        missing = [k for k in ("moe", "dense", "tokenizer") if not (out / k).is_dir()]
        if not a.data or missing:
            raise SystemExit(f"--eval-only needs --data DIR and the exported moe/, dense/, tokenizer/ in {out}"
                             + (f" (missing: {', '.join(missing)})" if missing else ""))
        evaluate(out, a.data, a.samples, {k: _dir_bytes(out / k) for k in ("moe", "dense", "tokenizer")},
                 command)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    export(a.moe, out / "moe")
    export(a.dense, out / "dense")
    (out / "tokenizer").mkdir(exist_ok=True)
    shutil.copyfile(Path(a.tokenizer) / "spm.model", out / "tokenizer" / "spm.model")
    from moqe_jax.data.tokenizer import _strip_paths

    _strip_paths(out / "tokenizer" / "spm.model")
    sizes = {k: _dir_bytes(out / k) for k in ("moe", "dense", "tokenizer")}
    total = sum(sizes.values())
    print(f"assets: {json.dumps(sizes)} total {total / 2**20:.2f} MiB")
    if total > MAX_BYTES:
        raise SystemExit(f"bundled model too large: {total / 2**20:.2f} MiB > 25 MiB")
    if a.data:
        write_sample(a.data, out / "sample.jsonl")
        evaluate(out, a.data, a.samples, sizes, command)
    return 0


def write_sample(data: str, path: Path, n_train: int = 16, n_test: int = 8) -> None:
    """A small seeded sample of the corpus (per direction) shipped with the model for tests and demos."""
    import random

    from moqe_jax.data.corpus import DIRECTIONS, read_jsonl

    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        by: dict[str, list[dict]] = {}
        for r in read_jsonl(Path(data) / f"{split}.jsonl"):
            if len(r["src"]) <= 80 and len(r["tgt"]) <= 80:
                by.setdefault(r["direction"], []).append(r)
        for d in DIRECTIONS:
            for r in random.Random(f"{split}:{d}").sample(by[d], min(n, len(by[d]))):
                rows.append({"split": split, **r})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def evaluate(out: Path, data: str, samples: int, sizes: dict[str, int], command: str = "") -> dict[str, Any]:
    """BLEU/chrF/CE of ``out``'s moe and dense models into ``out/EVAL.md`` + ``eval.json`` (with the date, JAX
    version, generation routing mode and ``command``); reads the models, writes nothing else."""
    import datetime

    import jax

    from moqe_jax.api import load_model
    from moqe_jax.evaluate import evaluate_model
    from moqe_jax.model.decode import generation_routing_mode

    res = {}
    routing: dict[str, str] = {}
    cfg_mode = ""
    for name in ("moe", "dense"):
        m = load_model(str(out / name))
        moe_layers = m.config.sparse_layers("encoder") or m.config.sparse_layers("decoder")
        routing[name] = generation_routing_mode(m.config) if moe_layers else "none (no MoE layer)"
        cfg_mode = cfg_mode or m.config.routing_mode
        r = evaluate_model(m, tokenizer=str(out / "tokenizer"), data=data, directions="all", samples=samples,
                           mt_loss=True, buckets=(16, 32, 64))
        res[name] = r
        print(f"{name}: BLEU {r.bleu:.2f} chrF {r.chrf:.2f} CE {r.mt_ce:.4f}", flush=True)
    dirs = list(res["moe"].directions)
    lines = [f"# Bundled default models: BLEU on the test split ({samples} sentences per direction, greedy)\n",
             "| direction | MoE BLEU | dense BLEU | MoE chrF | dense chrF |", "|---|---|---|---|---|"]
    for d in dirs:
        mo, de = res["moe"].directions[d], res["dense"].directions[d]
        lines.append(f"| {d} | {mo.bleu:.2f} | {de.bleu:.2f} | {mo.chrf:.2f} | {de.chrf:.2f} |")
    lines.append(f"| **avg** | **{res['moe'].bleu:.2f}** | **{res['dense'].bleu:.2f}** | {res['moe'].chrf:.2f} | "
                 f"{res['dense'].chrf:.2f} |")
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    lines.append(f"\nTeacher-forced CE: MoE {res['moe'].mt_ce:.4f}, dense {res['dense'].mt_ce:.4f}. "
                 f"Sizes (bytes): {json.dumps(sizes)}.\n")
    lines.append(f"Measured {date}, jax {jax.__version__}, {jax.default_backend()}; generation routing: MoE "
                 f"{routing['moe']}, dense {routing['dense']} (the teacher-forced CE runs the config's own "
                 f"routing, {cfg_mode}). Command: `{command}`.\n")
    (out / "EVAL.md").write_text("\n".join(lines))
    js = {k: {"bleu": v.bleu, "chrf": v.chrf, "mt_ce": v.mt_ce,
              "per_direction": {d: {"bleu": x.bleu, "chrf": x.chrf} for d, x in v.directions.items()}}
          for k, v in res.items()}
    js["samples_per_direction"] = samples
    js["sizes"] = sizes
    js["provenance"] = {"date": date, "jax": jax.__version__, "backend": jax.default_backend(),
                        "generation_routing": routing, "command": command}
    (out / "eval.json").write_text(json.dumps(js, indent=1))
    print("\n".join(lines))
    return js


if __name__ == "__main__":
    sys.exit(main())
