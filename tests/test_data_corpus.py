"""Corpus builder on synthetic locale dirs (own .mo writer + Babel's compiler), bad inputs, a distro-sized dir."""

from __future__ import annotations

import gettext
import io
import json
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo as babel_write_mo
from babel.messages.pofile import read_po

from moqe_jax.data.corpus import (
    LANGS,
    build_corpus,
    collect_pairs,
    lang_tag,
    parse_mo,
    read_jsonl,
    read_mo,
    split_of,
    write_mo,
)
from moqe_jax.errors import DataError

ENTRIES = [
    ("Hello", "Bonjour"),
    ("menu\x04Open", "Ouvrir"),  # context stripped
    ("Cannot open %s: %d", "Impossible d'ouvrir %s : %d"),
    ("%d file\x00%d files", "%d fichier\x00%d fichiers"),  # plural: skipped, counted
    ("Two\nlines", "Deux\nlignes"),  # multi-line msgid: skipped
    ("Same", "Same"),  # msgid == msgstr: skipped
    ("x" * 201, "y"),  # > 200 chars: skipped
    ("Empty", ""),  # untranslated: skipped
]


def _check_against_gettext(path: Path) -> None:
    with open(path, "rb") as fh:
        cat = gettext.GNUTranslations(fh)._catalog
    ref = {k.split("\x04", 1)[-1]: v for k, v in cat.items() if isinstance(k, str) and k and v}
    ours = dict(parse_mo(path.read_bytes()).pairs)
    assert ours == ref


@pytest.mark.parametrize("big_endian", [False, True])
def test_parse_mo_both_endiannesses_matches_gettext(tmp_path: Path, big_endian: bool) -> None:
    p = tmp_path / "a.mo"
    write_mo(p, ENTRIES, big_endian=big_endian)
    assert p.read_bytes()[:4] == (b"\x95\x04\x12\xde" if big_endian else b"\xde\x12\x04\x95")
    cat = read_mo(p)
    assert cat.stats.plural == 1 and cat.stats.empty == 1 and cat.stats.header == 1
    d = dict(cat.pairs)
    assert d["Open"] == "Ouvrir" and d["Cannot open %s: %d"] == "Impossible d'ouvrir %s : %d"
    _check_against_gettext(p)


def test_parse_mo_babel_compiled_po(tmp_path: Path) -> None:
    """An independent PO compiler (Babel's, pure Python, in the test extra) instead of our own writer."""
    po = ('msgid ""\nmsgstr "Content-Type: text/plain; charset=UTF-8\\n"\n\n'
          'msgctxt "verb"\nmsgid "Open"\nmsgstr "Öffnen"\n\n'
          'msgid "%s: %d byte"\nmsgid_plural "%s: %d bytes"\n'
          'msgstr[0] "%s: %d Byte"\nmsgstr[1] "%s: %d Bytes"\n\n'
          'msgid "Quit {0}"\nmsgstr "Beenden {0}"\n\n'
          '#, fuzzy\nmsgid "Fuzzy one"\nmsgstr "Unscharf"\n')
    mo = tmp_path / "x.mo"
    with open(mo, "wb") as fh:
        babel_write_mo(fh, read_po(io.StringIO(po), locale="de"))
    cat = read_mo(mo)
    assert dict(cat.pairs) == {"Open": "Öffnen", "Quit {0}": "Beenden {0}"}  # fuzzy not compiled, plural skipped
    assert cat.stats.plural == 1
    _check_against_gettext(mo)


def _locale(tmp_path: Path) -> Path:
    root = tmp_path / "locale"
    shared = [(f"Message number {i} %s", None) for i in range(60)]
    for lang in ("fr", "de", "ja"):
        ents = [(k, f"[{lang}] {k} {{{lang}}}") for k, _ in shared] + ENTRIES
        write_mo(root / lang / "LC_MESSAGES" / "a.mo", ents, big_endian=(lang == "de"))
        # b.mo sorts after a.mo: its duplicate msgid must lose ("first occurrence over sorted file names")
        write_mo(root / lang / "LC_MESSAGES" / "b.mo", [("Hello", "SECOND"), (f"Only in b {lang}", f"b-{lang}")])
    (root / "fr" / "LC_MESSAGES" / "corrupt.mo").write_bytes(b"\xde\x12\x04\x95" + b"\x00" * 8 + b"\xff" * 40)
    (root / "de" / "LC_MESSAGES" / "notmo.mo").write_bytes(b"this is not a catalog at all, just text....")
    return root


def test_build_corpus_rules_split_and_bad_files(tmp_path: Path) -> None:
    root = _locale(tmp_path)
    with pytest.warns(UserWarning, match="corrupt"):
        stats = build_corpus(root, tmp_path / "out", progress=False, test_permille=200, valid_permille=200)
    assert len(stats.bad_files) == 2 and any("corrupt.mo" in f for f in stats.bad_files)
    assert stats.pairs["fr"] == 60 + 3 + 1 and stats.pairs["de"] == 64 and stats.pairs["sv"] == 0
    assert stats.plural_skipped == 3 and stats.duplicate_skipped == 3
    rows = {s: read_jsonl(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "valid", "test")}
    assert sum(len(r) for r in rows.values()) == 2 * (64 * 3)
    # split is a function of the English string only, shared across languages and directions
    en_split = {}
    for s, rs in rows.items():
        for r in rs:
            assert en_split.setdefault(r["en"], s) == s
            assert split_of(r["en"], 200, 200) == s
    assert {s for s in en_split.values()} == {"train", "valid", "test"}
    by = {(r["direction"], r["en"]): r for rs in rows.values() for r in rs}
    r = by[("en-fr", "Hello")]
    assert r["src"] == f"{lang_tag('fr')} Hello" and r["tgt"] == "Bonjour"  # first file wins
    r = by[("ja-en", "Cannot open %s: %d")]
    assert r["src"] == "<2en> Impossible d'ouvrir %s : %d" and r["tgt"] == "Cannot open %s: %d"
    assert ("de-en", "Open") in by  # context stripped
    assert not any(k[1] in ("Same", "Empty", "Two\nlines") or len(k[1]) > 200 for k in by)
    eng = (tmp_path / "out" / "english.txt").read_text().split("\n")
    assert set(e for e in eng if e) == {e for e, s in en_split.items() if s == "train"}
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["pairs"]["fr"] == 64


def test_bad_locale_dirs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        collect_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no <lang>/LC_MESSAGES"):
        collect_pairs(tmp_path / "empty")
    bad = tmp_path / "bad" / "fr" / "LC_MESSAGES"
    bad.mkdir(parents=True)
    (bad / "x.mo").write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable translation pairs"):
        build_corpus(tmp_path / "bad", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "train.jsonl").exists()  # nothing partial


@pytest.mark.parametrize("data,msg", [(b"\x01\x02\x03", "too short"), (b"\x00" * 40, "bad magic"),
                                      (b"\xde\x12\x04\x95" + b"\x00\x00\x00\x00" + b"\xff\xff\x00\x00" + b"\x00" * 20,
                                       "truncated")])
def test_parse_mo_errors(data: bytes, msg: str) -> None:
    with pytest.raises(DataError, match=msg):
        parse_mo(data, "f.mo")


def _distro_like_locale(root: Path) -> Path:
    """A distribution-sized locale dir compiled by Babel: many catalogs per language, messages shared between
    catalogs, and the entries the rules skip (plural, fuzzy, multi-line, over-long, untranslated, context)."""
    verbs = ("Cannot open", "Failed to read", "Unable to write", "Removing", "Installing", "Configuring", "Checking",
             "Downloading", "Skipping", "Updating", "Creating", "Deleting")
    nouns = ("file", "directory", "package", "device", "socket", "archive", "user", "group", "key", "cache",
             "module", "service", "partition", "network")
    for lang, n_pkgs in (("fr", 9), ("cs", 5)):
        for pkg in range(n_pkgs):
            cat = Catalog(locale=lang, domain=f"pkg{pkg}")
            for i in range(160):
                j = pkg * 140 + i  # the last 20 messages of a package reappear in the next one
                en = f"{verbs[j % len(verbs)]} {nouns[j // len(verbs) % len(nouns)]} %s ({j})"
                cat.add(en, f"[{lang}] {en}")
            cat.add(("%d item", "%d items"), ("%d élément", "%d éléments"))
            cat.add("Open", f"Open-{lang}", context="menu")
            cat.add(f"Fuzzy {pkg}", "flou", flags=("fuzzy",))
            cat.add(f"Two\nlines {pkg}", "Deux\nlignes")
            cat.add("x" * 201, "y")
            cat.add(f"Untranslated {pkg}", "")
            d = root / lang / "LC_MESSAGES"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"pkg{pkg}.mo", "wb") as fh:
                babel_write_mo(fh, cat)
    return root


def test_distro_sized_locale_dir_sanity(tmp_path: Path) -> None:
    root = _distro_like_locale(tmp_path / "locale")
    pairs, stats = collect_pairs(root, langs=("fr", "cs"), progress=False)
    assert stats.pairs["fr"] > 1000 and stats.pairs["cs"] > 500
    # identical to Python's gettext on a few catalogs
    for f in sorted((root / "fr" / "LC_MESSAGES").glob("*.mo"))[:5]:
        _check_against_gettext(f)
    en = [e for e, _ in pairs["fr"]]
    assert len(en) == len(set(en)) and all(len(e) <= 200 and "\n" not in e for e in en)
    frac = sum(split_of(e) == "test" for e in en) / len(en)
    assert 0.01 < frac < 0.03
    assert set(LANGS) >= {"fr", "cs"}
