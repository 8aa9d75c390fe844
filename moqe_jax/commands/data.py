"""``moqe data build``: build the gettext MT corpus and its tokenizer (docs/DATA.md)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build the multilingual MT corpus (Debian gettext catalogs) + tokenizer")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    b = dsub.add_parser("build", help="parse <locale-dir>/<lang>/LC_MESSAGES/*.mo into JSONL splits + SentencePiece")
    b.add_argument("--locale-dir", default="/usr/share/locale", help="Debian locale dir (default /usr/share/locale)")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--vocab", type=int, default=8000, help="vocabulary size incl. 100 sentinels (default 8000)")
    b.set_defaults(func=_build, uses_jax=False)  # parsing + SentencePiece: no compilation cache, no jax import


def _build(args: argparse.Namespace) -> int:
    from moqe_jax.data import DATA_MD_PAIRS, build_dataset

    stats, tok = build_dataset(args.locale_dir, args.out, args.vocab)
    print(f"{'lang':6s} {'pairs':>7s} {'DATA.md':>8s} {'diff':>7s} {'train':>7s} {'valid':>6s} {'test':>6s} files")
    for lang, n in stats.pairs.items():
        ref = DATA_MD_PAIRS.get(lang, 0)
        sp = stats.split_pairs.get(lang, {})
        print(f"{lang:6s} {n:7d} {ref:8d} {n - ref:+7d} {sp.get('train', 0):7d} {sp.get('valid', 0):6d} "
              f"{sp.get('test', 0):6d} {stats.files.get(lang, 0)}")
    total, ref_total = sum(stats.pairs.values()), sum(DATA_MD_PAIRS.values())
    print(f"total  {total:7d} {ref_total:8d} {total - ref_total:+7d}  -> {2 * total} examples in 20 directions")
    print(f"skipped: {stats.plural_skipped} plural, {stats.empty_skipped} empty, {stats.multiline_skipped} multi-line, "
          f"{stats.too_long_skipped} >200 chars, {stats.identical_skipped} msgid==msgstr, "
          f"{stats.duplicate_skipped} duplicates; {len(stats.bad_files)} corrupt catalogs")
    if total != ref_total:
        print("note: counts differ from docs/DATA.md because the set of installed Debian packages (hence .mo "
              "catalogs) differs between machine images; the rules are the same (checked against gettext).")
    print(f"tokenizer: {tok.path} (vocab {tok.vocab_size}); corpus: {args.out}")
    return 0
