"""Held-out output error of ternary (and 2-bit) GPTQ with dead inputs zeroed (gptq) vs kept (QMoE).

A "dead input" of an expert kernel is an input that none of the expert's calibration tokens activates
(``diag H == 0``): for ``wo`` a ReLU unit of the expert that never fires on its calibration tokens, for ``wi``
a model dimension that is 0 on all of them (in practice: none). gptq's ``fasterquant`` zeroes those weights;
QMoE's ``batch_gptq`` keeps and quantizes them (docs/QMOE.md §3.3, §3.9). This script measures what that does
on tokens the solver did not see.

For every sparse layer of the model, the float model's FFN inputs of the calibration batches (512 training
translation pairs, as eval/reproduce_qmoe.py) and of held-out batches (test-split pairs) are captured with
the calibration driver's own token mask and dispatch; each layer's experts are then solved by
``moqe_jax.quant.gptq_ffn.compress_ffn`` (the solver of ``moqe compress``) from the same calibration tokens with
``dead_inputs="zero"`` and ``"keep"``, and every expert kernel's relative output error
``‖XW − XQ‖/‖XW‖`` is measured on its held-out tokens (``wo``: X = the float ``wi``'s hidden activations of
those tokens). Experts are split into those with dead inputs and those without.

  python -m eval.dead_inputs                       # bundled model, corpus `moqe demo` caches
  python -m eval.dead_inputs --bits ternary --calib 512,128 --heldout 512

Writes ``<out>/gptq_dead_inputs.{md,json}`` (default docs/results/).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import REPO, RESULTS, Timer, command_line, machine_note, md_table, write_json, write_markdown


def capture_ffn_inputs(model: Any, batches: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"stack/layers_i/mlp": (x_tok [T, D], expert [T])}`` of every sparse layer of the float model: the
    dispatched (token, expert) pairs of the tokens that enter GPTQ's Hessians (calibration driver's mask)."""
    import jax.numpy as jnp

    from moqe_jax.model import layerwise
    from moqe_jax.quant.hessians import default_special_min_id, token_mask
    from moqe_jax.quant.layer_runner import run_layer

    cfg, params = model.config, model.params
    special = default_special_min_id(cfg.vocab_size)
    out: dict[str, tuple[list, list]] = {}
    for b in batches:
        x, ectx = layerwise.encode_embed(cfg, params, b["input_ids"], b.get("attention_mask"))
        stacks = [("encoder", x, ectx, token_mask(b["input_ids"], np.asarray(ectx["valid"]), special, False))]
        for stack, h, ctx, m in stacks:  # the decoder is appended once the encoder is done
            n = cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers
            for i in range(n):
                lp = params[stack][f"layers_{i}"]
                y, info, _ = run_layer(cfg, stack, i, lp, jnp.asarray(h), ctx)
                if cfg.is_sparse(stack, i):
                    inp = np.asarray(info["inputs"], np.float32)
                    disp = np.asarray(info["dispatch"]) & m[..., None]
                    tok, ex = np.nonzero(disp.reshape(-1, disp.shape[-1]))
                    xs, es = out.setdefault(f"{stack}/layers_{i}/mlp", ([], []))
                    xs.append(inp.reshape(-1, inp.shape[-1])[tok])
                    es.append(ex.astype(np.int64))
                h = y
            if stack == "encoder":
                enc = layerwise.encoder_final(cfg, params, jnp.asarray(h), ectx)
                d, dctx = layerwise.decode_embed(cfg, params, b["decoder_input_ids"], enc, ectx,
                                                 b.get("decoder_attention_mask"))
                stacks.append(("decoder", d, dctx, token_mask(b["decoder_input_ids"], np.asarray(dctx["valid"]),
                                                              special, True)))
    return {k: (np.concatenate(xs), np.concatenate(es)) for k, (xs, es) in out.items()}


def _rel(x: np.ndarray, w: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """``(‖X(W−Q)‖², ‖XW‖²)`` in float64."""
    x = x.astype(np.float64)
    return float(np.sum((x @ (w - q)) ** 2)), float(np.sum((x @ w) ** 2))


def layer_errors(mlp: dict, cal: tuple[np.ndarray, np.ndarray], held: tuple[np.ndarray, np.ndarray], spec: Any,
                 name: str, max_tokens_factor: float = 4.0) -> list[dict]:
    """One row per (kernel, expert): dead inputs among its calibration tokens, held-out/calibration error of the
    ``zero`` and ``keep`` solutions."""
    from moqe_jax.quant.gptq_ffn import GPTQOptions, compress_ffn
    from moqe_jax.quant.hessians import cap_and_sort, hidden_activations

    sub = mlp["expert"]
    e = sub["wi"]["kernel"].shape[0]
    sols = {m: compress_ffn(mlp, True, cal[0], cal[1], spec,
                            GPTQOptions(dead_inputs=m, max_tokens_factor=max_tokens_factor), name, None)[0]
            for m in ("zero", "keep")}
    keep, counts, _ = cap_and_sort(cal[1], e, max_tokens_factor)  # the tokens the Hessians were built from
    xs, offs = cal[0][keep], np.concatenate([[0], np.cumsum(counts)])
    rows = []
    for ex in range(e):
        wi = np.asarray(sub["wi"]["kernel"][ex], np.float32)
        xc = xs[offs[ex]:offs[ex + 1]]
        xh = held[0][held[1] == ex]
        inputs = {"wi": (xc, xh)}
        if "wo" in sub:
            inputs["wo"] = tuple(np.asarray(hidden_activations(a, wi, None)) if len(a) else
                                 np.zeros((0, wi.shape[1]), np.float32) for a in (xc, xh))
        for kname, (a_cal, a_held) in inputs.items():
            w = np.asarray(sub[kname]["kernel"][ex], np.float64)
            dead = np.all(a_cal == 0, axis=0) if len(a_cal) else np.zeros(w.shape[0], bool)
            row = {"layer": name, "kernel": kname, "expert": ex, "calib_tokens": len(a_cal),
                   "heldout_tokens": len(a_held), "inputs": int(w.shape[0]), "dead": int(dead.sum()),
                   "dead_fire_rate": float(np.mean(a_held[:, dead] != 0)) if dead.any() and len(a_held) else 0.0}
            for m, sol in sols.items():
                q = np.asarray(sol[kname].dequantize(), np.float64)[ex]
                for split, a in (("heldout", a_held), ("calib", a_cal)):
                    row[f"{split}_{m}"] = _rel(a, w, q) if len(a) else (0.0, 0.0)
            rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per kernel and expert class: counts and errors (mean of per-expert relative errors; pooled ratio)."""
    out = []
    for kname in sorted({r["kernel"] for r in rows}, key=["wi", "wo"].index):
        for cls, pick in (("with dead inputs", lambda r: r["dead"] > 0), ("without", lambda r: r["dead"] == 0),
                          ("all", lambda r: True)):
            rs = [r for r in rows if r["kernel"] == kname and pick(r) and r["heldout_tokens"] and r["calib_tokens"]]
            if not rs:
                out.append({"kernel": kname, "class": cls, "experts": 0})
                continue
            s: dict[str, Any] = {"kernel": kname, "class": cls, "experts": len(rs),
                                 "dead_inputs": int(sum(r["dead"] for r in rs)),
                                 "inputs": int(sum(r["inputs"] for r in rs)),
                                 "heldout_tokens": int(sum(r["heldout_tokens"] for r in rs)),
                                 "dead_fire_rate": float(np.mean([r["dead_fire_rate"] for r in rs if r["dead"]]))
                                 if any(r["dead"] for r in rs) else 0.0}
            for split in ("heldout", "calib"):
                for m in ("zero", "keep"):
                    per = [np.sqrt(r[f"{split}_{m}"][0] / r[f"{split}_{m}"][1]) for r in rs]
                    s[f"{split}_{m}_mean"] = float(np.mean(per))
                    s[f"{split}_{m}_pooled"] = float(np.sqrt(sum(r[f"{split}_{m}"][0] for r in rs) /
                                                             sum(r[f"{split}_{m}"][1] for r in rs)))
            out.append(s)
    return out


def _rel_path(p: str) -> str:
    """``p`` relative to the repository when it lies inside it (results pages name no local paths)."""
    r = os.path.relpath(os.path.abspath(p), REPO)
    return p if r.startswith("..") else r


def main(argv: list[str] | None = None) -> int:
    from moqe_jax.api import load_model
    from moqe_jax.calibration import calibration_batches
    from moqe_jax.data.corpus import read_jsonl
    from moqe_jax.data.locate import BUNDLED, default_data_dir, resolve_tokenizer
    from moqe_jax.errors import MoqeError
    from moqe_jax.evaluate import load_tokenizer
    from moqe_jax.packed.spec import QuantSpec

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(BUNDLED / "moe"), help="float MoE model dir (default: bundled)")
    p.add_argument("--data", default=None, help="corpus dir (default $MOQE_DATA, work_data/corpus, data/corpus, "
                                                "the corpus `moqe demo` caches)")
    p.add_argument("--bits", default="ternary,2", help="comma-separated: ternary, 2, 3, 4 (default ternary,2)")
    p.add_argument("--calib", default="512,64", help="comma-separated numbers of calibration translation pairs "
                                                    "(training split; default 512 as eval/reproduce_qmoe.py, and 64)")
    p.add_argument("--heldout", type=int, default=512, help="held-out translation pairs (test split)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    data = args.data or default_data_dir()
    if data is None:
        raise MoqeError("no corpus found ($MOQE_DATA, work_data/corpus, data/corpus, the `moqe demo` cache); build "
                        "one with `moqe data build --out work_data/corpus` or pass --data")
    with Timer() as total:
        model = load_model(args.model)
        tok = load_tokenizer(resolve_tokenizer(None, args.model, data))
        held_b = calibration_batches(tok, read_jsonl(Path(data) / "test.jsonl"), mode="mt", n=args.heldout,
                                     batch_size=args.batch_size, seed=args.seed)
        held = capture_ffn_inputs(model, held_b)
        train = read_jsonl(Path(data) / "train.jsonl")
        results: dict[str, Any] = {}
        for n_cal in (int(c) for c in args.calib.split(",")):
            cal = capture_ffn_inputs(model, calibration_batches(tok, train, mode="mt", n=n_cal,
                                                                batch_size=args.batch_size, seed=args.seed))
            for b in args.bits.split(","):
                spec = QuantSpec(bits="ternary") if b == "ternary" else QuantSpec(bits=int(b), symmetric=False)
                rows = []
                for name in cal:
                    stack, layer = name.split("/")[:2]
                    rows += layer_errors(model.params[stack][layer]["mlp"], cal[name], held[name], spec, name)
                key = f"{n_cal}/{b}"
                results[key] = {"calib": n_cal, "bits": b, "summary": summarize(rows), "rows": rows}
                print(f"calib {n_cal}, {b}: " + "; ".join(
                    f"{s['kernel']} {s['class']} ({s['experts']}): held-out {s.get('heldout_zero_mean', np.nan):.4f}"
                    f" → {s.get('heldout_keep_mean', np.nan):.4f}" for s in results[key]["summary"]), flush=True)
    out = Path(args.out)
    head = ["calib. pairs", "bits", "kernel", "experts", "count", "dead inputs", "dead fire rate (held-out)",
            "held-out error, zero", "held-out error, keep", "keep vs zero", "pooled, zero", "pooled, keep",
            "calib. error, zero", "calib. error, keep"]
    table = []
    for r in results.values():
        b = r["bits"]
        for s in r["summary"]:
            if not s["experts"]:
                table.append([r["calib"], b, s["kernel"], s["class"], 0] + ["–"] * (len(head) - 5))
                continue
            z, k = s["heldout_zero_mean"], s["heldout_keep_mean"]
            table.append([r["calib"], b, s["kernel"], s["class"], s["experts"], f"{s['dead_inputs']} / {s['inputs']}",
                          f"{100 * s['dead_fire_rate']:.2f} %" if s["dead_inputs"] else "–", f"{z:.4f}", f"{k:.4f}",
                          f"{k / z - 1:+.2%}", f"{s['heldout_zero_pooled']:.4f}", f"{s['heldout_keep_pooled']:.4f}",
                          f"{s['calib_zero_mean']:.4f}", f"{s['calib_keep_mean']:.4f}"])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = (f"Run {when}; {machine_note()}; {total.wall:.0f} s wall.\n\n" + md_table(head, table) +
            f"\n\nModel: {_rel_path(args.model)}. Calibration: {args.calib.replace(',', ' or ')} training "
            "translation pairs "
            f"(512 as eval/reproduce_qmoe.py; fewer pairs = fewer tokens per expert, more dead inputs); "
            f"held-out: {args.heldout} test-split pairs. FFN inputs of the float model "
            "(driver token mask: no padding, no sentinels); each sparse layer's experts solved by `compress_ffn` "
            "(QMoE defaults: per-channel grid, percdamp 0.1, token cap 4× mean load, wo Hessian from the float wi) "
            "from the same calibration tokens with `dead_inputs=zero` and `keep`. Error = ‖XW − XQ‖/‖XW‖ per "
            "expert kernel on its held-out tokens (wo: X = float wi's ReLU activations), mean over experts; "
            "pooled = √(Σ‖XW − XQ‖² / Σ‖XW‖²) over the class. Dead inputs: inputs that are 0 on all of the "
            "expert's (capped) calibration tokens; fire rate: fraction of (held-out token, dead input) pairs "
            "where the input is nonzero. Experts without calibration or held-out tokens are left out.")
    write_markdown(out / "gptq_dead_inputs.md", "GPTQ dead inputs: zeroed (gptq) vs kept (QMoE), held-out error",
                   body, None)
    write_json(out / "gptq_dead_inputs.json", {"command": command_line(), "machine": machine_note(), "date": when,
                                               "wall_s": total.wall, "results": results})
    print(f"done in {total.wall:.0f} s; {out / 'gptq_dead_inputs.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
