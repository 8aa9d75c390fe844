"""Lines of hand-written zarr / msgpack / safetensors I/O code at a git revision (issue 15's done-when).

Counts named top-level definitions (and ``Class.method``) with :mod:`ast`: physical lines, and code lines
(non-blank, not a comment, not a docstring). ``zarr.py`` counts whole (module docstring and imports
included) except the path confinement (``check_confined``: security, reported on its own line). Code that
moved between files is counted where it lives now (``T5XCheckpoint._read_msgpack`` whole, although only its
``msgpack_restore`` wrapper replaced msgpack_flax.py; the writer's ``chunked``).

    python -m benchmarks.io_line_count 6e0f8ea HEAD
"""

from __future__ import annotations

import ast
import subprocess
import sys

C = "moqe_jax/checkpoint/"
CONFINEMENT = ["check_confined", "_OUTSIDE_HINT"]
TABLE = [
    (C + "zarr.py", ["*"]),
    (C + "msgpack_flax.py", ["*"]),
    (C + "store.py", ["_ST_DTYPES", "_ST_NP", "_ST_STORABLE", "_ST_ERRORS", "write_safetensors", "read_safetensors",
                      "_mapped"]),
    (C + "hf.py", ["_ST_DTYPES", "read_safetensors"]),
    (C + "t5x.py", ["T5XCheckpoint._read_msgpack"]),
    (C + "t5x_writer.py", ["chunked"]),
]


def _source(rev: str, path: str) -> str:
    r = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""


def _spans(tree: ast.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = (min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno or 0)
            for sub in node.body if isinstance(node, ast.ClassDef) else ():
                if isinstance(sub, ast.FunctionDef):
                    out[f"{node.name}.{sub.name}"] = (sub.lineno, sub.end_lineno or 0)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            tgt = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(tgt, ast.Name):
                out[tgt.id] = (node.lineno, node.end_lineno or 0)
    return out


def _code(text: str, tree: ast.Module, lo: int, hi: int) -> int:
    doc: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            doc.update(range(body[0].lineno, (body[0].end_lineno or 0) + 1))
    lines = text.splitlines()
    return sum(1 for i in range(lo, hi + 1) if i not in doc and lines[i - 1].strip()
               and not lines[i - 1].strip().startswith("#"))


def count(rev: str, table: list[tuple[str, list[str]]], exclude: list[str] = ()) -> tuple[int, int]:
    tot_p = tot_c = 0
    for path, names in table:
        text = _source(rev, path)
        if not text:
            continue
        tree = ast.parse(text)
        spans = _spans(tree)
        for name in names:
            if name == "*":
                lo, hi = 1, len(text.splitlines())
                minus = [spans[x] for x in exclude if x in spans]
            elif name in spans:
                (lo, hi), minus = spans[name], []
            else:
                continue
            p = hi - lo + 1 - sum(b - a + 1 for a, b in minus)
            c = _code(text, tree, lo, hi) - sum(_code(text, tree, a, b) for a, b in minus)
            print(f"  {path}:{name}: {p} lines, {c} code lines")
            tot_p, tot_c = tot_p + p, tot_c + c
    print(f"  total: {tot_p} lines, {tot_c} code lines")
    return tot_p, tot_c


def main() -> None:
    for rev in sys.argv[1:] or ["HEAD"]:
        print(f"{rev}: zarr / msgpack / safetensors I/O")
        count(rev, TABLE, CONFINEMENT)
        print(f"{rev}: path confinement (security, counted separately)")
        count(rev, [(C + "zarr.py", CONFINEMENT)])


if __name__ == "__main__":
    main()
