"""Triton IR (TTIR) of the Pallas kernels, lowered for CUDA on any machine (no GPU needed).

``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` runs the Pallas Triton lowering on CPU; the
kernel's TTIR is the serialized module in the ``__gpu$xla.gpu.triton`` custom call, parsed here with jax's
bundled MLIR and Triton dialect (jax-internal modules: a development tool, not library code). The GPU-platform
check of ``pallas_kernels.backend`` is bypassed for the lowering only (nothing is compiled or run).

    python -m benchmarks.ttir [--out ttir_gemv]     # inner-loop loads and op counts of the GEMV kernels

Per kernel it reports the loads inside the K loop (``scf.for``) with their pointer element type — the word
layout must load ``i32`` tiles (8 int4 / 16 int2 codes per load), the byte layout ``i8`` — and a histogram of
the loop body's operations (per K tile; divide by ``bkr·bn·p`` for ops per code).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Callable
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp

from pallas_kernels import backend
from pallas_kernels import dequant_matmul as dq


def triton_modules(fn: Callable[..., Any], *args: Any) -> list[str]:
    """TTIR text of every Pallas kernel in ``jax.jit(fn)(*args)`` lowered for CUDA."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    with mock.patch.object(backend, "_gpu_platform", lambda: "cuda"):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        module = lowered.compiler_ir("stablehlo")
    calls: list[Any] = []

    def walk(op: Any) -> None:
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    if o.operation.name == "stablehlo.custom_call" and \
                            "triton" in str(o.operation.attributes["call_target_name"]):
                        calls.append(o.operation)
                    walk(o.operation)

    walk(module.operation)
    out = []
    for op in calls:
        blob = ir.StringAttr(ir.DictAttr(op.attributes["mhlo.backend_config"])["ir"]).value_bytes
        with ir.Context() as ctx:
            tt_dialect.register_dialect(ctx)
            ctx.allow_unregistered_dialects = True
            out.append(str(ir.Module.parse(blob)))
    return out


def loop_body(ttir: str) -> list[str]:
    """Lines of the outermost ``scf.for`` body (the K loop) of one kernel."""
    lines = ttir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            body = []
            for nxt in lines[i + 1:]:
                if nxt.strip() == "}" and len(nxt) - len(nxt.lstrip()) == indent:
                    return body
                body.append(nxt)
    return []


def loads(lines: list[str]) -> list[str]:
    """``tensor<…x!tt.ptr<T>>`` types of the ``tt.load`` ops in ``lines``."""
    return [m.group(1) for line in lines if "tt.load" in line
            for m in [re.search(r":\s*(tensor<[^>]*>>|!tt\.ptr<[^>]*>)", line)] if m]


def op_histogram(lines: list[str]) -> Counter[str]:
    """Operation names in ``lines`` (``%x = arith.addf …`` -> ``arith.addf``)."""
    return Counter(m.group(1) for line in lines for m in [re.search(r"=\s*\"?([a-z_]+\.[a-z_.]+)", line)] if m)


def gemv_ttir(code_bits: int, scheme: str, word_bits: int, m: int = 1, k: int = 4096, n: int = 10240,
              group_size: int | None = None) -> str:
    """TTIR of the planned kernel for ``x [m, k] @ W [k, n]`` in ``word_bits`` words."""
    rows = (3 if code_bits == 3 else 1) * dq.packed_height(k, code_bits, word_bits)
    pdt = jnp.uint32 if word_bits == 32 else jnp.uint8
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((rows, n), pdt),
            jax.ShapeDtypeStruct((k // (group_size or k), n), jnp.float32),
            jax.ShapeDtypeStruct((k // (group_size or k), n), jnp.float32) if scheme == "ternary" else None)

    def f(x: Any, p: Any, s: Any, z: Any) -> Any:
        return dq.quant_matmul(x, p, s, z, k=k, code_bits=code_bits, scheme=scheme, group_size=group_size)

    return triton_modules(f, *args)[0]


CASES = [("int4", 4, "linear", 32), ("int4 (bytes)", 4, "linear", 8), ("int2", 2, "linear", 32),
         ("int2 (bytes)", 2, "linear", 8), ("ternary", 2, "ternary", 32), ("int8", 8, "linear", 32)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default=None, help="also write benchmarks/results/<out>.md")
    ap.add_argument("--m", type=int, default=1)
    a = ap.parse_args(argv)
    if not backend.triton_available():
        raise SystemExit(f"jax {jax.__version__} has no Pallas Triton lowering")
    lines = [f"# TTIR of the GEMV kernels (M = {a.m}, 4096×10240), lowered for CUDA on "
             f"{jax.devices()[0].platform} with jax {jax.__version__}", "",
             "| kernel | blocks | loads in the K loop | loop-body ops (per K tile) |", "|---|---|---|---|"]
    for name, bits, scheme, wb in CASES:
        body = loop_body(gemv_ttir(bits, scheme, wb, m=a.m))
        b = dq.plan_blocks(a.m, 4096, 10240, 1, code_bits=bits, group_size=None, word_bits=wb)
        hist = op_histogram(body)
        top = ", ".join(f"{op.split('.')[-1]}×{c}" for op, c in hist.most_common(12))
        lines.append(f"| {name} | {b.mode} bkr{b.bkr} bn{b.bn} | {'; '.join(loads(body))} | {top} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        from benchmarks.common import RESULTS_DIR

        (RESULTS_DIR / f"{a.out}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
