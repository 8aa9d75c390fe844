"""Reproduce MoQE's experiments (Kim et al. 2023, arXiv 2310.02410) on our MoE model and its dense twin.

1. Fig. 2 — quantize ONE component at a time (experts, dense FFN, self-attention, cross-attention)
   with MoQE's channel-wise linear absmax RTN at 8/4/3/2 bits: BLEU table + plot.
2. Fig. 3 — MoE (experts quantized) vs the dense twin (FFN quantized: all layers, and only the
   layers that are MoE layers in the MoE model, MoQE's "even layers" choice) across bits: plot.
3. Table 2 — size (real packed bytes, bf16 elsewhere), BLEU and decode speed for bf16, 8/4/3/2-bit
   experts and a 2-bit QAT model (``--qat DIR``; skipped with a note when absent), plus the dense twin.
4. Fig. 1 — expert vs dense FFN weight statistics (eval/weight_stats.py).

Every model is evaluated by ``moqe_jax.evaluate.evaluate_model`` (same decode / scoring path; only the
parameters differ). Outputs: ``<out>/moqe_*.{md,png,json}``. ``--quick`` = CI mode.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eval.common import (
    Setup,
    Timer,
    add_common_args,
    command_line,
    machine_note,
    mb,
    md_table,
    new_figure,
    other_layers_overrides,
    packed_bytes,
    quantize,
    save_figure,
    setup_from_args,
    write_json,
    write_markdown,
)

COMPONENTS = ("experts", "dense", "self_attn", "cross_attn")
COMP_LABEL = {"experts": "expert FFN", "dense": "dense FFN (non-MoE layers)", "self_attn": "self-attention",
              "cross_attn": "cross-attention"}


class Runner:
    """Evaluates models with one fixed setting and memoizes results by name."""

    def __init__(self, setup: Setup, args: argparse.Namespace, directions: str, samples: int | None):
        self.s, self.args, self.directions, self.samples = setup, args, directions, samples
        self.results: dict[str, Any] = {}

    def bleu(self, name: str, model: Any) -> Any:
        from moqe_jax.evaluate import evaluate_model

        if name not in self.results:
            with Timer() as t:
                r = evaluate_model(model, tokenizer=self.s.tokenizer, data=self.s.data, directions=self.directions,
                                   samples=self.samples, batch_size=self.args.batch_size, seed=self.args.seed,
                                   mt_loss=True,
                                   max_src_len=self.args.max_src_len,
                                   buckets=[int(b) for b in self.args.buckets.split(",")])
            print(f"  {name:<34} BLEU {r.bleu:6.2f}  chrF {r.chrf:6.2f}  CE {r.mt_ce:.4f}  "
                  f"{r.tokens_per_s:7.0f} tok/s  ({t.wall:.0f} s)", flush=True)
            self.results[name] = r
        return self.results[name]

    def ce(self, name: str) -> float:
        return float(self.results[name].mt_ce)


def _delta(v: float, base: float) -> str:
    return f"{v:.2f} ({v - base:+.2f})"


def fig2(run: Runner, bits: list[int], out: Path) -> dict[str, dict[int, float]]:
    """BLEU and teacher-forced CE when only one component is quantized (MoQE Fig. 2)."""
    moe = run.s.moe
    base = run.bleu("moe-bf16", moe).bleu
    base_ce = run.ce("moe-bf16")
    table: dict[str, dict[int, float]] = {}
    ce: dict[str, dict[int, float]] = {}
    for comp in COMPONENTS:
        table[comp], ce[comp] = {}, {}
        for b in bits:
            key = f"moe-{comp}-int{b}"
            table[comp][b] = run.bleu(key, quantize(moe, b, (comp,))).bleu
            ce[comp][b] = run.ce(key)
    rows = [[COMP_LABEL[c]] + [_delta(table[c][b], base) for b in bits] for c in COMPONENTS]
    ce_rows = [[COMP_LABEL[c]] + [f"{ce[c][b]:.4f} ({ce[c][b] - base_ce:+.4f})" for b in bits] for c in COMPONENTS]
    hdr = ["quantized component"] + [f"{b}-bit" for b in bits]
    body = (f"![BLEU by quantized component](moqe_fig2_components.png)\n\n"
            f"Channel-wise linear absmax RTN (`QuantSpec(bits)`), one component at a time, everything else float; "
            f"{len(run.results['moe-bf16'].directions)} directions × {run.samples} test sentences.\n\n"
            f"**Average BLEU** (Δ vs the float model, {base:.2f}):\n\n" + md_table(hdr, rows) +
            f"\n\n**Teacher-forced token CE** of the same test references, nats (Δ vs float, {base_ce:.4f}; "
            "deterministic, so much less noisy than BLEU on this sample):\n\n" + md_table(hdr, ce_rows))
    write_markdown(out / "moqe_fig2_components.md", "MoQE Fig. 2: robustness of each component to quantization",
                   body, run.s)
    fig, (a1, a2) = new_figure(10, 4.2, ncols=2)
    for c in COMPONENTS:
        a1.plot(bits, [table[c][b] for b in bits], marker="o", label=COMP_LABEL[c])
        a2.plot(bits, [ce[c][b] - base_ce for b in bits], marker="o", label=COMP_LABEL[c])
    a1.axhline(base, color="k", ls="--", lw=1, label="float (bf16 storage)")
    a2.axhline(0.0, color="k", ls="--", lw=1)
    a1.set_ylabel("average BLEU")
    a2.set_ylabel("Δ token CE vs float (nats)")
    for a in (a1, a2):
        a.set_xlabel("bits (weight-only, channel-wise absmax)")
        a.set_xticks(bits)
        a.invert_xaxis()
    a1.legend(fontsize=8)
    a1.set_title("MoE model: one component quantized at a time", fontsize=10)
    a2.set_title("teacher-forced CE increase", fontsize=10)
    save_figure(fig, out / "moqe_fig2_components.png", f"regenerate: {command_line()}")
    return table


FIG3_KEYS = {"MoE: experts": ("moe-bf16", "moe-experts-int{b}"), "dense: all FFN": ("dense-bf16", "dense-ffn-int{b}"),
             "dense: FFN at MoE layers": ("dense-bf16", "dense-ffn-moe-layers-int{b}")}


def fig3(run: Runner, bits: list[int], out: Path) -> dict[str, dict[int, float]] | None:
    """MoE (experts quantized) vs dense (FFN quantized) across bits (MoQE Fig. 3): BLEU and CE."""
    s = run.s
    if s.dense is None:
        return None
    run.bleu("moe-bf16", s.moe)
    run.bleu("dense-bf16", s.dense)
    sparse = {st: set(s.moe.config.sparse_layers(st)) for st in ("encoder", "decoder")}
    for b in bits:
        run.bleu(f"moe-experts-int{b}", quantize(s.moe, b, ("experts",)))
        run.bleu(f"dense-ffn-int{b}", quantize(s.dense, b, ("dense",)))
        q = quantize(s.dense, b, ("dense",), overrides=other_layers_overrides(s.dense, sparse))
        run.bleu(f"dense-ffn-moe-layers-int{b}", q)
    curves = {k: {b: run.results[pat.format(b=b)].bleu for b in bits} for k, (_, pat) in FIG3_KEYS.items()}
    ce = {k: {b: run.ce(pat.format(b=b)) for b in bits} for k, (_, pat) in FIG3_KEYS.items()}
    bases = {k: run.results[base].bleu for k, (base, _) in FIG3_KEYS.items()}
    ce_bases = {k: run.ce(base) for k, (base, _) in FIG3_KEYS.items()}
    hdr = ["model: quantized weights", "float"] + [f"{b}-bit" for b in bits]
    rows = [[k, f"{bases[k]:.2f}"] + [_delta(v[b], bases[k]) for b in bits] for k, v in curves.items()]
    ce_rows = [[k, f"{ce_bases[k]:.4f}"] + [f"{v[b]:.4f} ({v[b] - ce_bases[k]:+.4f})" for b in bits]
               for k, v in ce.items()]
    body = ("![MoE vs dense](moqe_fig3_moe_vs_dense.png)\n\n**Average BLEU** (Δ vs the same model in float):\n\n" +
            md_table(hdr, rows) + "\n\n**Teacher-forced token CE**, nats (Δ vs the same model in float):\n\n" +
            md_table(hdr, ce_rows) +
            "\n\nThe dense twin has the MoE model's shape without experts (same active compute per token), trained "
            "on the same data with the same recipe. 'FFN at MoE layers' quantizes the dense FFN only in the layers "
            "that hold experts in the MoE model (MoQE quantized the dense model's FFN in alternate layers).")
    write_markdown(out / "moqe_fig3_moe_vs_dense.md", "MoQE Fig. 3: MoE vs dense under FFN quantization", body, s)
    fig, (a1, a2) = new_figure(10, 4.2, ncols=2)
    xs = ["float"] + [str(b) for b in bits]
    for k in curves:
        a1.plot(xs, [0.0] + [curves[k][b] - bases[k] for b in bits], marker="o", label=k)
        a2.plot(xs, [0.0] + [ce[k][b] - ce_bases[k] for b in bits], marker="o", label=k)
    a1.set_ylabel("Δ average BLEU vs float")
    a2.set_ylabel("Δ token CE vs float (nats)")
    for a in (a1, a2):
        a.set_xlabel("bits of the quantized FFN / expert weights")
        a.axhline(0.0, color="k", ls="--", lw=0.8)
    a1.legend(fontsize=8)
    a1.set_title("BLEU degradation", fontsize=10)
    a2.set_title("CE increase", fontsize=10)
    save_figure(fig, out / "moqe_fig3_moe_vs_dense.png", f"regenerate: {command_line()}")
    return curves


def table2(run: Runner, bits: list[int], out: Path, qat_dir: str | None, speed: dict) -> list[dict]:
    """Size / BLEU / decode speed (MoQE Table 2)."""
    from moqe_jax.evaluate import _encode, _pad_batch, decode_speed, load_eval_pairs, parse_directions

    s = run.s
    # the speed benchmark decodes real test sentences (first direction of the evaluation)
    d0 = parse_directions(run.directions)[0]
    srcs = [r["src"] for r in load_eval_pairs(s.data, [d0], speed["batch_size"], seed=run.args.seed)[d0]]
    bench_x = _pad_batch([_encode(s.tokenizer, t) + [1] for t in srcs], speed["src_len"], speed["batch_size"], 0, 1)
    moe_bytes = packed_bytes(s.moe)["total"]["bytes"]
    dense_bytes = packed_bytes(s.dense)["total"]["bytes"] if s.dense is not None else None
    entries: list[tuple[str, str, Any]] = []
    if s.dense is not None:
        entries.append(("dense twin (bf16)", "dense-bf16", s.dense))
    entries.append(("MoE bf16", "moe-bf16", s.moe))
    for b in bits:
        entries.append((f"MoE experts {b}-bit RTN", f"moe-experts-int{b}", quantize(s.moe, b, ("experts",))))
    notes = []
    if qat_dir and Path(qat_dir).exists():
        from moqe_jax.api import load_model

        qm = load_model(qat_dir)
        if not _experts_quantized(qm):  # latent float QAT weights: export = RTN on the trained grid (ste.export_qat)
            qm = quantize(qm, 2, ("experts",))
        entries.append(("MoE experts 2-bit QAT", "moe-experts-int2-qat", qm))
    else:
        notes.append(f"2-bit QAT row skipped: no QAT model at {qat_dir!r} (train it with the QAT recipe in train/ "
                     "and pass --qat DIR).")
    rows, out_rows = [], []
    for label, key, m in entries:
        r = run.bleu(key, m)
        sz = packed_bytes(m)
        tb = sz["total"]["bytes"]
        eb = sz.get("experts", {}).get("bits_per_param", float("nan"))
        tps = decode_speed(m, new_tokens=speed["new_tokens"], reps=speed["reps"], input_ids=bench_x)
        rows.append([label, f"{eb:.2f}" if eb == eb else "–", mb(tb), f"{100 * tb / moe_bytes:.1f}",
                     f"{tb / dense_bytes:.2f}" if dense_bytes else "–", f"{r.bleu:.2f}", f"{r.chrf:.2f}",
                     f"{r.mt_ce:.4f}", f"{r.tokens_per_s:.0f}", f"{tps:.0f}"])
        out_rows.append({"model": label, "key": key, "bytes": tb, "expert_bits_per_param": eb, "bleu": r.bleu,
                         "chrf": r.chrf, "mt_ce": r.mt_ce, "eval_tokens_per_s": r.tokens_per_s,
                         "bench_tokens_per_s": tps})
    dirs = list(run.results["moe-bf16"].directions)
    per_dir = [[label] + [f"{run.results[key].directions[d].bleu:.1f}" for d in dirs]
               for label, key, _ in entries]
    qat_note = _qat_control(qat_dir)
    if qat_note:
        notes.append(qat_note)
    body = (md_table(["model", "expert bits/param", "size MiB", "% of bf16 MoE", "× dense", "BLEU", "chrF", "CE",
                      "eval tok/s", "decode tok/s"], rows) +
            f"\n\nSize = real bytes: packed codes + scales (+ zeros) for quantized tensors, 2 bytes/param (bf16) "
            f"for everything else. 'eval tok/s' = generated tokens/s while translating the test sample (greedy, "
            f"batch {run.args.batch_size}, compilation excluded); 'decode tok/s' = steady-state greedy decoding, "
            f"batch {speed['batch_size']} real {d0} test sentences padded to {speed['src_len']} tokens, at most "
            f"{speed['new_tokens']} new tokens (tokens counted up to EOS). CE = teacher-forced token CE of the test "
            "references (nats). "
            f"{machine_note()}.\n\n### BLEU per direction\n\n" + md_table(["model"] + dirs, per_dir) +
            f"\n\nBLEU signature: `{run.results['moe-bf16'].bleu_signature}`; chrF signature: "
            f"`{run.results['moe-bf16'].chrf_signature}`.")
    write_markdown(out / "moqe_table2.md", "MoQE Table 2: size, BLEU and speed", body, run.s, [f"> {n}" for n in notes])
    return out_rows


def _qat_control(qat_dir: str | None) -> str:
    """The QAT recipe's same-budget control (train/qat.py writes ``qat_report.json`` beside the model)."""
    if not qat_dir:
        return ""
    rep = Path(qat_dir).parent / "qat_report.json"
    if not rep.is_file():
        return ""
    import json

    r = json.loads(rep.read_text())["results"]
    if "float+FT" not in r:
        return ""
    f = {k: v.get("bleu", float("nan")) for k, v in r.items()}
    c = {k: v.get("mt_ce", float("nan")) for k, v in r.items()}
    return (f"QAT trains {json.loads(rep.read_text()).get('steps', '?')} more steps than the float model. Same-budget "
            f"control from {rep} (its own evaluation of the same test sample): float+FT {f['float+FT']:.2f} BLEU / "
            f"{c['float+FT']:.4f} CE, float+FT RTN-2bit {f.get('float+FT RTN-2bit', float('nan')):.2f} / "
            f"{c.get('float+FT RTN-2bit', float('nan')):.4f}, QAT-2bit {f.get('QAT-2bit', float('nan')):.2f} / "
            f"{c.get('QAT-2bit', float('nan')):.4f}.")


def _experts_quantized(model: Any) -> bool:
    import jax

    from moqe_jax.model.components import component_of
    from moqe_jax.packed import is_packed

    flat = jax.tree_util.tree_flatten_with_path(model.params, is_leaf=is_packed)[0]
    return any(is_packed(leaf) for path, leaf in flat if component_of(path) == "experts")


def claims(run: Runner, f2: dict, f3: dict | None, t2: list[dict], bits: list[int], out: Path,
           timing: str = "", qat_dir: str | None = None) -> str:
    """Check MoQE's claims against our numbers (BLEU as in the paper, plus the low-noise teacher-forced CE)."""
    base, base_ce = run.results["moe-bf16"].bleu, run.ce("moe-bf16")
    lines = []
    e = f2["experts"]

    def dce(key: str, ref: str = "moe-bf16") -> float:
        return run.ce(key) - run.ce(ref)

    for b, tol in ((4, 0.3), (3, 0.6)):
        if b in e:
            d = e[b] - base
            dc = dce(f"moe-experts-int{b}")
            lines.append(f"- expert-only {b}-bit within {tol} BLEU: Δ = {d:+.2f} BLEU (CE {dc:+.4f})"
                         f" → {'holds' if d >= -tol else 'does NOT hold'}")
    qat = next((r for r in t2 if r["key"] == "moe-experts-int2-qat"), None)
    if 2 in e:
        lines.append(f"- 2-bit RTN experts: {e[2]:.2f} BLEU (Δ {e[2] - base:+.2f}), CE {dce('moe-experts-int2'):+.4f}")
        if qat is not None:
            lines.append(f"- 2-bit QAT experts: {qat['bleu']:.2f} BLEU, CE {qat['mt_ce'] - base_ce:+.4f} vs the float "
                         "model — but QAT also trains more steps; see the same-budget control below")
            ctrl = _qat_control(qat_dir)
            if ctrl:
                lines.append(f"- {ctrl}")
    for b in [x for x in bits if x in (2, 3)]:
        others = {c: f2[c][b] for c in COMPONENTS if c != "experts"}
        ok = all(e[b] >= v for v in others.values())
        ce_ok = all(dce(f"moe-experts-int{b}") <= dce(f"moe-{c}-int{b}") for c in others)
        dc = dce(f"moe-experts-int{b}")
        lines.append(f"- {b}-bit, one component quantized: experts {e[b]:.2f} BLEU / CE {dc:+.4f}"
                     " vs " + ", ".join(f"{c} {v:.2f} / {dce(f'moe-{c}-int{b}'):+.4f}" for c, v in others.items()) +
                     f" → experts most robust: BLEU {'yes' if ok else 'no'}, CE {'yes' if ce_ok else 'no'}")
    if f3 is not None:
        db = run.results["dense-bf16"].bleu
        for b in bits:
            dm, dmc = f3["MoE: experts"][b] - base, dce(f"moe-experts-int{b}")
            dd, ddc = f3["dense: FFN at MoE layers"][b] - db, dce(f"dense-ffn-moe-layers-int{b}", "dense-bf16")
            da, dac = f3["dense: all FFN"][b] - db, dce(f"dense-ffn-int{b}", "dense-bf16")
            lines.append(f"- {b}-bit MoE vs dense: Δ BLEU MoE experts {dm:+.2f} vs dense FFN {dd:+.2f} (same layers) / "
                         f"{da:+.2f} (all layers); Δ CE {dmc:+.4f} vs {ddc:+.4f} / {dac:+.4f} → MoE more robust: BLEU "
                         f"{'yes' if dm >= max(dd, da) else 'no'}, CE {'yes' if dmc <= min(ddc, dac) else 'no'}")
        best2 = max([e.get(2, float('nan'))] + ([qat["bleu"]] if qat else []))
        lines.append(f"- 2-bit-expert MoE ({best2:.2f}) vs float dense ({db:.2f}) → MoE "
                     f"{'beats' if best2 > db else 'does NOT beat'} dense (RTN alone: {e.get(2, float('nan')):.2f})")
    noise = ("BLEU is a corpus score over "
             f"{len(run.results['moe-bf16'].directions)} directions × {run.samples} sentences; differences below "
             "~0.3–0.5 BLEU are within the sampling noise of this test set (8-bit rows show the scale). "
             "The teacher-forced CE is deterministic.")
    text = "\n".join(lines)
    write_markdown(out / "moqe_claims.md", "MoQE claims checked on our model", text, run.s, [noise, "", timing])
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Reproduce MoQE Figs. 1-3 and Table 2 on the bundled MoE + dense models")
    add_common_args(p)
    p.add_argument("--bits", default=None, help="comma list (default 8,4,3,2; --quick: 4,2)")
    p.add_argument("--qat", default=None, help="2-bit QAT model dir (default: bundled moe-qat2 if present)")
    p.add_argument("--max-src-len", type=int, default=None,
                   help="one source length for all batches (one compilation per model; --quick: 32) instead of "
                        "length buckets")
    p.add_argument("--skip", default="", help="comma list of sections to skip: fig1,fig2,fig3,table2")
    args = p.parse_args(argv)
    bits = [int(b) for b in (args.bits or ("4,2" if args.quick else "8,4,3,2")).split(",")]
    if args.quick and args.max_src_len is None:
        args.max_src_len = 32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with Timer() as total:
        s = setup_from_args(args)
        directions = args.directions
        if s.synthetic and directions == "all":
            directions = "en-de,de-en"
        samples = args.samples or (8 if args.quick else 50)
        run = Runner(s, args, directions, samples)
        skip = set(filter(None, args.skip.split(",")))
        # --quick: the benchmark shape equals the evaluation shape, so it reuses that compilation
        speed = (dict(batch_size=args.batch_size, src_len=32, new_tokens=64, reps=1) if args.quick
                 else dict(batch_size=8, src_len=32, new_tokens=64, reps=3))
        print(f"MoQE reproduction: {samples} sentences x {directions}, bits {bits}; {machine_note()}", flush=True)
        results: dict[str, Any] = {"bits": bits, "samples": samples, "directions": directions,
                                   "synthetic": s.synthetic}
        if "fig1" not in skip:
            from eval import weight_stats

            results["fig1"] = weight_stats.run(s.moe, s.dense, out, s)["summary"]
        f2 = fig2(run, bits, out) if "fig2" not in skip else None
        f3 = fig3(run, bits, out) if "fig3" not in skip else None
        qat = args.qat
        if qat is None:
            from eval.common import ASSETS

            qat = str(ASSETS / "moe-qat2")
        t2 = table2(run, bits, out, qat, speed) if "table2" not in skip else []
        results.update(fig2=f2, fig3=f3, table2=t2,
                       evals={k: v.to_dict() for k, v in run.results.items()})
    results["wall_s"], results["cpu_s"] = total.wall, total.cpu
    timing = (f"Run time of the whole script: {total.wall:.0f} s wall, {total.cpu:.0f} s process CPU "
              f"({machine_note()}); {len(run.results)} evaluated models.")
    if f2 is not None:
        results["claims"] = claims(run, f2, f3, t2, bits, out, timing, qat)
        print(results["claims"])
    results["machine"] = machine_note()
    results["command"] = command_line()
    write_json(out / "moqe_results.json", results)
    print(f"done in {total.wall:.0f} s wall / {total.cpu:.0f} s CPU; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
