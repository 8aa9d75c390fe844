"""Weight-distribution statistics of expert vs dense FFN weights (MoQE's outlier analysis, "Fig. 1").

MoQE argues that expert FFN weights have a smaller range and fewer outliers than dense FFN
weights, which makes them robust to low-bit quantization (docs/MOQE.md §4, [R]). For every FFN
matrix (each expert's ``wi``/``wo`` separately) we measure, in float64:

* ``absmax/std`` — the absmax grid step relative to the bulk (what channel-wise absmax RTN pays for);
* ``range`` — ``max - min``;
* excess kurtosis (Fisher; 0 for a Gaussian);
* outlier fraction — share of weights with ``|w - mean| > 3·std`` (0.27 % for a Gaussian).

Groups: MoE experts, MoE dense FFN (the non-MoE layers), dense-twin FFN, and the dense twin's FFN
at the layers that are sparse in the MoE. ``python -m eval.weight_stats`` writes
``docs/results/moqe_fig1_weights.{png,md}``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

OUTLIER_SIGMA = 3.0


def matrix_stats(w: Any) -> dict[str, float]:
    """Statistics of one weight matrix (any shape; all entries pooled), float64."""
    x = np.asarray(w, np.float64).reshape(-1)
    mu = x.mean()
    d = x - mu
    var = np.mean(d * d)
    sd = np.sqrt(var)
    kurt = float(np.mean(d ** 4) / var ** 2 - 3.0) if var > 0 else 0.0
    return {"absmax": float(np.abs(x).max()), "std": float(sd), "range": float(x.max() - x.min()),
            "absmax_over_std": float(np.abs(x).max() / sd) if sd > 0 else float("inf"),
            "kurtosis": kurt, "outlier_frac": float(np.mean(np.abs(d) > OUTLIER_SIGMA * sd)) if sd > 0 else 0.0,
            "n": int(x.size)}


_LAYER = re.compile(r"(encoder|decoder)/layers_(\d+)/mlp/(expert/)?(wi|wo|wi_0|wi_1)/kernel")


def ffn_matrices(model: Any) -> Iterator[tuple[str, str, int, str, int | None, np.ndarray]]:
    """``(group, stack, layer, kind, expert, matrix)`` for every FFN matrix (experts one by one)."""
    import jax

    from moqe_jax.ops import dequantize_weight

    flat = jax.tree_util.tree_flatten_with_path(model.params, is_leaf=lambda x: hasattr(x, "dequantize"))[0]
    for path, leaf in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        m = _LAYER.search(name)
        if m is None:
            continue
        w = np.asarray(dequantize_weight(leaf, np.float32) if hasattr(leaf, "dequantize") else leaf, np.float32)
        stack, layer, is_exp, kind = m.group(1), int(m.group(2)), bool(m.group(3)), m.group(4)
        if is_exp:
            for e in range(w.shape[0]):
                yield "experts", stack, layer, kind, e, w[e]
        else:
            yield "dense", stack, layer, kind, None, w


def collect(moe: Any, dense: Any | None, sample: int = 4000, seed: int = 0
            ) -> tuple[list[dict[str, Any]], dict[str, list[np.ndarray]]]:
    """One row of statistics per FFN matrix of both models (with its group label), and per
    ``group\\nkind`` a random sample of ``sample`` weights per matrix for the box plot."""
    rows: list[dict[str, Any]] = []
    samples: dict[str, list[np.ndarray]] = {}
    rng = np.random.default_rng(seed)
    sparse = {s: set(moe.config.sparse_layers(s)) for s in ("encoder", "decoder")}
    for model, is_moe in ((moe, True), (dense, False)):
        if model is None:
            continue
        for grp, stack, layer, kind, e, w in ffn_matrices(model):
            if is_moe:
                label = "MoE experts" if grp == "experts" else "MoE dense FFN"
            else:
                label = "dense-model FFN (MoE positions)" if layer in sparse[stack] else "dense-model FFN (other)"
            rows.append({"group": label, "stack": stack, "layer": layer, "kind": kind, "expert": e,
                         **matrix_stats(w)})
            flat = w.reshape(-1)
            samples.setdefault(f"{label}\n{kind}", []).append(rng.choice(flat, min(flat.size, sample), replace=False))
    return rows, samples


GROUP_ORDER = ("MoE experts", "MoE dense FFN", "dense-model FFN (MoE positions)", "dense-model FFN (other)")
STATS = ("absmax_over_std", "range", "kurtosis", "outlier_frac")


def summarize(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Per group and kind (wi/wo): matrix count and the median of each statistic."""
    out = []
    for g in GROUP_ORDER:
        for kind in sorted({r["kind"] for r in rows}):
            sel = [r for r in rows if r["group"] == g and r["kind"] == kind]
            if not sel:
                continue
            med = {s: float(np.median([r[s] for r in sel])) for s in STATS}
            out.append([g, kind, len(sel), f"{med['absmax_over_std']:.2f}", f"{med['range']:.4f}",
                        f"{med['kurtosis']:.3f}", f"{100 * med['outlier_frac']:.3f}"])
    return out


def plot(rows: list[dict[str, Any]], samples: dict[str, list[np.ndarray]], path: Path, caption: str) -> None:
    """MoQE-Fig.-1-like box plots: weight values per group (left), per-matrix kurtosis (right)."""
    from eval.common import new_figure, save_figure

    labels = [k for g in GROUP_ORDER for k in sorted(samples) if k.startswith(g + "\n")]
    fig, (a1, a2) = new_figure(11, 4.6, ncols=2)
    a1.boxplot([np.concatenate(samples[k]) for k in labels], whis=1.5, flierprops={"markersize": 1.5, "alpha": 0.3})
    a1.set_xticks(range(1, len(labels) + 1), [k.replace(" (", "\n(") for k in labels], fontsize=6, rotation=30)
    a1.set_ylabel("weight value")
    a1.set_title("FFN weight distributions (box: IQR, whiskers 1.5·IQR)", fontsize=9)
    groups = [g for g in GROUP_ORDER if any(r["group"] == g for r in rows)]
    a2.boxplot([[r["kurtosis"] for r in rows if r["group"] == g] for g in groups])
    a2.set_xticks(range(1, len(groups) + 1), [g.replace(" (", "\n(") for g in groups], fontsize=6, rotation=30)
    a2.set_ylabel("excess kurtosis per matrix")
    a2.set_title("tail heaviness per matrix", fontsize=9)
    save_figure(fig, path, caption)


def run(moe: Any, dense: Any | None, out: Path, setup: Any = None, stem: str = "moqe_fig1_weights") -> dict:
    """Compute, tabulate and plot; returns the summary rows."""
    from eval.common import command_line, md_table, write_json, write_markdown

    rows, samples = collect(moe, dense)
    summary = summarize(rows)
    headers = ["group", "matrix", "# matrices", "median absmax/std", "median range", "median excess kurtosis",
               f"median % beyond {OUTLIER_SIGMA:g}σ"]
    body = (f"![weight distributions]({stem}.png)\n\n" + md_table(headers, summary) + "\n\n"
            "Each expert's matrix counts separately. absmax/std is the absmax quantization step relative to the "
            "bulk of the weights (smaller = more robust to channel-wise absmax RTN).")
    write_markdown(out / f"{stem}.md", "Expert vs dense FFN weight statistics (MoQE Fig. 1 analogue)", body, setup)
    write_json(out / f"{stem}.json", rows)
    plot(rows, samples, out / f"{stem}.png", f"regenerate: {command_line()}")
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    from eval.common import add_common_args, setup_from_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    args = p.parse_args(argv)
    s = setup_from_args(args)
    res = run(s.moe, s.dense, Path(args.out), s)
    for r in res["summary"]:
        print(" | ".join(str(c) for c in r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
