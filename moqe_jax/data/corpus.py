"""Multilingual MT corpus from Debian gettext catalogs (docs/DATA.md).

``<locale_dir>/<lang>/LC_MESSAGES/*.mo`` holds English ``msgid`` → translated ``msgstr`` pairs.
We parse the GNU ``.mo`` format ourselves (both byte orders, contexts ``msgctxt\\x04msgid``,
plural entries skipped and counted, files that fail to parse skipped with a warning and counted)
and apply the DATA.md rules: single-line msgids of at most 200 characters, msgid ≠ msgstr,
non-empty msgstr, first occurrence per msgid over sorted file names (per language).

The split is a deterministic function of a hash of the ENGLISH string, shared by all languages,
so no English sentence of valid/test appears in training for any direction. Each pair gives two
directions (en→X, X→en); the source carries the target-language tag ``<2xx>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moqe_jax.errors import DataError

__all__ = [
    "LANGS", "DIRECTIONS", "SPLITS", "MoStats", "MoCatalog", "CorpusStats", "parse_mo", "read_mo",
    "collect_pairs", "split_of", "lang_tag", "build_corpus", "read_jsonl", "english_sentences", "write_mo",
]

LANGS: tuple[str, ...] = ("fr", "sv", "es", "ru", "de", "zh_CN", "it", "ja", "pl", "cs")
DIRECTIONS: tuple[str, ...] = tuple(d for lang in LANGS for d in (f"en-{lang}", f"{lang}-en"))
SPLITS: tuple[str, ...] = ("train", "valid", "test")
MAX_CHARS = 200
_MAGIC_LE = 0x950412DE


def lang_tag(lang: str) -> str:
    """Target-language tag put in front of the source, e.g. ``<2de>`` / ``<2zh_CN>`` / ``<2en>``."""
    return f"<2{lang}>"


@dataclass
class MoStats:
    """What one parse kept and skipped."""

    entries: int = 0
    plural: int = 0
    empty: int = 0
    header: int = 0


@dataclass
class MoCatalog:
    """Singular (msgid, msgstr) pairs of one ``.mo`` file in file order, context stripped."""

    pairs: list[tuple[str, str]]
    stats: MoStats


def _charset(header: str) -> str:
    for line in header.split("\n"):
        if line.lower().startswith("content-type:") and "charset=" in line:
            cs = line.split("charset=", 1)[1].strip().split(";")[0].strip()
            if cs and cs.upper() != "CHARSET":
                return cs
    return "utf-8"


def parse_mo(data: bytes, name: str = "<bytes>") -> MoCatalog:
    """Parse a GNU gettext ``.mo`` image (both endiannesses). Raises `DataError` naming ``name``.

    Layout (GNU gettext manual, "The Format of GNU MO Files"): magic 0x950412de, revision (major 0
    or 1), N, offset of the original-string table, offset of the translation table; each table has
    N (length, offset) uint32 pairs. Plural entries have ``msgid\\0msgid_plural`` keys.
    """
    if len(data) < 28:
        raise DataError(f"{name}: not a .mo file (too short: {len(data)} bytes)")
    for end in ("<", ">"):
        if struct.unpack(end + "I", data[:4])[0] == _MAGIC_LE:
            break
    else:
        raise DataError(f"{name}: not a .mo file (bad magic {data[:4].hex()})")
    rev, n, o_off, t_off = struct.unpack(end + "4I", data[4:20])
    if rev >> 16 > 1:
        raise DataError(f"{name}: unsupported .mo major revision {rev >> 16}")
    if o_off + 8 * n > len(data) or t_off + 8 * n > len(data):
        raise DataError(f"{name}: truncated .mo file (string tables past end of file)")
    raw: list[tuple[bytes, bytes]] = []
    for i in range(n):
        ol, oo = struct.unpack_from(end + "2I", data, o_off + 8 * i)
        tl, to = struct.unpack_from(end + "2I", data, t_off + 8 * i)
        if oo + ol > len(data) or to + tl > len(data):
            raise DataError(f"{name}: truncated .mo file (entry {i} past end of file)")
        raw.append((data[oo:oo + ol], data[to:to + tl]))
    charset = "utf-8"
    for k, v in raw:
        if k == b"":
            charset = _charset(v.decode("ascii", "replace"))
            break
    stats = MoStats()
    pairs: list[tuple[str, str]] = []
    try:
        for k, v in raw:
            if k == b"":
                stats.header += 1
                continue
            if b"\x00" in k:  # plural entry: msgid\0msgid_plural
                stats.plural += 1
                continue
            msgid = k.decode(charset)
            if "\x04" in msgid:  # msgctxt\x04msgid
                msgid = msgid.split("\x04", 1)[1]
            msgstr = v.decode(charset)
            if not msgstr:
                stats.empty += 1
                continue
            pairs.append((msgid, msgstr))
    except (UnicodeDecodeError, LookupError) as e:
        raise DataError(f"{name}: cannot decode strings as {charset!r} ({type(e).__name__})") from None
    stats.entries = len(pairs)
    return MoCatalog(pairs, stats)


def read_mo(path: str | os.PathLike) -> MoCatalog:
    """Read and parse one ``.mo`` file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return parse_mo(data, str(path))


@dataclass
class CorpusStats:
    """Counts of a corpus build (per language and over all files)."""

    pairs: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    bad_files: list[str] = field(default_factory=list)
    plural_skipped: int = 0
    empty_skipped: int = 0
    multiline_skipped: int = 0
    too_long_skipped: int = 0
    identical_skipped: int = 0
    duplicate_skipped: int = 0
    split_pairs: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _keep(msgid: str, msgstr: str, stats: CorpusStats) -> bool:
    if "\n" in msgid:
        stats.multiline_skipped += 1
        return False
    if len(msgid) > MAX_CHARS:
        stats.too_long_skipped += 1
        return False
    if msgid == msgstr:
        stats.identical_skipped += 1
        return False
    if not msgid.strip() or not msgstr.strip():
        stats.empty_skipped += 1
        return False
    return True


def _progress(it: Iterable, total: int, desc: str, enable: bool | None = None) -> Iterable:
    if enable is None:
        enable = os.environ.get("MOQE_NO_PROGRESS") != "1" and _isatty()
    if not enable:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc)


def _status(msg: str) -> None:
    """One status line on stderr (a phase that would otherwise be silent for seconds)."""
    import sys

    print(msg, file=sys.stderr, flush=True)


def _isatty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def collect_pairs(locale_dir: str | os.PathLike, langs: Sequence[str] = LANGS, progress: bool | None = None,
                  ) -> tuple[dict[str, list[tuple[str, str]]], CorpusStats]:
    """Per language, the kept (english, translation) pairs in deterministic order (DATA.md rules)."""
    root = Path(locale_dir)
    if not root.is_dir():
        raise DataError(f"{root}: locale directory does not exist")
    jobs: list[tuple[str, Path]] = []
    for lang in langs:
        d = root / lang / "LC_MESSAGES"
        files = sorted(d.glob("*.mo"), key=lambda p: p.name) if d.is_dir() else []
        jobs += [(lang, f) for f in files]
    if not jobs:
        raise DataError(f"{root}: no <lang>/LC_MESSAGES/*.mo catalogs for any of {', '.join(langs)}")
    _status(f"reading {len(jobs)} gettext catalogs under {root} ...")
    stats = CorpusStats()
    out: dict[str, list[tuple[str, str]]] = {lang: [] for lang in langs}
    seen: dict[str, set[str]] = {lang: set() for lang in langs}
    for lang, f in _progress(jobs, len(jobs), "reading .mo", progress):
        try:
            cat = read_mo(f)
        except DataError as e:
            warnings.warn(f"skipping corrupt catalog: {e}", stacklevel=2)
            stats.bad_files.append(str(f))
            continue
        stats.files[lang] = stats.files.get(lang, 0) + 1
        stats.plural_skipped += cat.stats.plural
        stats.empty_skipped += cat.stats.empty
        for msgid, msgstr in cat.pairs:
            if not _keep(msgid, msgstr, stats):
                continue
            if msgid in seen[lang]:
                stats.duplicate_skipped += 1
                continue
            seen[lang].add(msgid)
            out[lang].append((msgid, msgstr))
    stats.pairs = {lang: len(v) for lang, v in out.items()}
    if not any(stats.pairs.values()):
        raise DataError(f"{root}: no usable translation pairs found ({len(stats.bad_files)} corrupt catalogs)")
    return out, stats


def split_of(english: str, test_permille: int = 20, valid_permille: int = 20) -> str:
    """Deterministic split of an English string: sha256 → bucket in [0, 1000) (DATA.md)."""
    h = int.from_bytes(hashlib.sha256(english.encode("utf-8")).digest()[:8], "big") % 1000
    if h < test_permille:
        return "test"
    if h < test_permille + valid_permille:
        return "valid"
    return "train"


def _records(lang: str, en: str, tr: str) -> Iterator[dict]:
    yield {"direction": f"en-{lang}", "src_lang": "en", "tgt_lang": lang,
           "src": f"{lang_tag(lang)} {en}", "tgt": tr, "en": en}
    yield {"direction": f"{lang}-en", "src_lang": lang, "tgt_lang": "en",
           "src": f"{lang_tag('en')} {tr}", "tgt": en, "en": en}


def build_corpus(locale_dir: str | os.PathLike, out_dir: str | os.PathLike, langs: Sequence[str] = LANGS,
                 test_permille: int = 20, valid_permille: int = 20, progress: bool | None = None) -> CorpusStats:
    """Write ``{train,valid,test}.jsonl`` (+ ``english.txt``, ``stats.json``) under ``out_dir``.

    Each JSONL line: ``direction, src_lang, tgt_lang, src`` (with the ``<2xx>`` tag), ``tgt``, ``en``.
    Lines are grouped per language in catalog order (shuffling is the batcher's job).
    Files are written to ``*.tmp`` and renamed, so a failed build leaves nothing partial.
    """
    pairs, stats = collect_pairs(locale_dir, langs, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fhs = {s: open(out / f"{s}.jsonl.tmp", "w", encoding="utf-8") for s in SPLITS}  # noqa: SIM115
    english: dict[str, None] = {}
    try:
        for lang in langs:
            counts = dict.fromkeys(SPLITS, 0)
            for en, tr in pairs[lang]:
                s = split_of(en, test_permille, valid_permille)
                counts[s] += 1
                if s == "train":
                    english.setdefault(en, None)
                for rec in _records(lang, en, tr):
                    fhs[s].write(json.dumps(rec, ensure_ascii=False) + "\n")
            stats.split_pairs[lang] = counts
    finally:
        for fh in fhs.values():
            fh.close()
    for s in SPLITS:
        os.replace(out / f"{s}.jsonl.tmp", out / f"{s}.jsonl")
    (out / "english.txt").write_text("".join(e + "\n" for e in english), encoding="utf-8")
    (out / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1), encoding="utf-8")
    return stats


def read_jsonl(path: str | os.PathLike, directions: Sequence[str] | None = None, limit: int | None = None,
               ) -> list[dict]:
    """Read a corpus split; optionally only some directions and the first ``limit`` per direction."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: corpus split not found (run `moqe data build`)")
    want = set(directions) if directions is not None else None
    if want is not None:
        unknown = want - set(DIRECTIONS)
        if unknown:
            raise DataError(f"unknown direction(s) {sorted(unknown)}; known: {', '.join(DIRECTIONS)}")
    per: dict[str, int] = {}
    rows: list[dict] = []
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            d = r["direction"]
            if want is not None and d not in want:
                continue
            if limit is not None:
                if per.get(d, 0) >= limit:
                    continue
                per[d] = per.get(d, 0) + 1
            rows.append(r)
    return rows


def english_sentences(corpus_dir: str | os.PathLike) -> list[str]:
    """The monolingual English stream for span corruption: the unique training-split English side."""
    p = Path(corpus_dir) / "english.txt"
    if not p.is_file():
        raise DataError(f"{p}: English stream not found (run `moqe data build`)")
    return [s for s in p.read_text(encoding="utf-8").split("\n") if s]


def write_mo(path: str | os.PathLike, entries: Sequence[tuple[str | bytes, str | bytes]], big_endian: bool = False,
             charset: str = "UTF-8") -> None:
    """Write a minimal GNU ``.mo`` file (for tests/fixtures): header entry + ``entries`` sorted by key.

    Keys may carry a context (``ctx\\x04msgid``) or be plural (``msgid\\0plural`` with ``\\0``-joined forms).
    """
    end = ">" if big_endian else "<"
    header = f"Content-Type: text/plain; charset={charset}\n".encode("ascii")

    def enc(s: str | bytes) -> bytes:
        return s if isinstance(s, bytes) else s.encode(charset)

    items = sorted([(b"", header)] + [(enc(k), enc(v)) for k, v in entries])
    n = len(items)
    o_off = 28
    t_off = o_off + 8 * n
    pos = t_off + 8 * n
    otab, ttab, blob = [], [], b""
    for k, _ in items:
        otab.append((len(k), pos + len(blob)))
        blob += k + b"\x00"
    for _, v in items:
        ttab.append((len(v), pos + len(blob)))
        blob += v + b"\x00"
    out = struct.pack(end + "7I", _MAGIC_LE, 0, n, o_off, t_off, 0, pos)
    out += b"".join(struct.pack(end + "2I", *e) for e in otab) + b"".join(struct.pack(end + "2I", *e) for e in ttab)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(out + blob)
