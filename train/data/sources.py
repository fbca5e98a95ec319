"""Real English text found on this machine, for *training only*.

Sources (each a list of entries, discovered in a stable, sorted order):

* ``man``        English manual pages ``/usr/share/man/man[1-8]/*`` (the per-language trees such as
                 ``/usr/share/man/de`` are never read), rendered with groff (a small roff stripper is
                 the fallback when groff is missing); ``.so`` aliases and symlinks are skipped.
* ``man-gcloud`` the ~16K ``gcloud_*`` pages, kept apart so that they cannot dominate the mixture.
* ``pydoc``      Python's own documentation topics (``pydoc_data.topics``).
* ``docstrings`` module/class/function docstrings of the standard library and of installed packages,
                 read with :mod:`ast` (nothing is imported).
* ``pkgdocs``    Markdown / reST / plain-text documents in installed packages (site-packages, the
                 long descriptions in ``METADATA``, ``/usr/share/doc``).

Exclusions (the evaluation reserves these):

* licence texts: files whose name looks like a licence/copyright/notice file, man sections such as
  COPYRIGHT/LICENSE, and every paragraph that contains licence wording (:func:`looks_like_licence`);
* every PDF: ``*.pdf`` files are never opened, any file starting with ``%PDF`` is dropped, and every
  entry whose name matches a package that ships a PDF on this machine (bzip2, valgrind, fontconfig,
  ...) is dropped as well, so that the PDFs' text does not leak into training through man pages or
  READMEs of the same project (:data:`PDF_DENYLIST` plus the stems of the PDFs found at start).

A deterministic held-out split is provided: an entry belongs to ``heldout`` when a hash of its
name falls into the lowest :data:`HELDOUT_PERCENT` percent; ``build_dataset`` uses ``train`` only.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = ("man", "man-gcloud", "pydoc", "docstrings", "pkgdocs")
CACHE_VERSION = 1  # bump when cleaning/rendering changes (invalidates on-disk text caches)
HELDOUT_PERCENT = 5

MAN_ROOT = Path("/usr/share/man")
DOC_ROOT = Path("/usr/share/doc")
PDF_SEARCH_ROOTS = (Path("/usr/share/doc"), Path("/tmp/pdfs"), Path(__file__).resolve().parents[3] / "bench")

# Projects whose manuals exist as PDFs on this machine (evaluation documents). Matching is by name
# component: an entry is dropped when one of these occurs in its name or path.
PDF_DENYLIST = (
    "bzip2", "bunzip2", "bzcat", "bzip2recover", "bzgrep", "bzmore", "bzless", "bzdiff", "bzcmp",
    "libbz2", "valgrind", "callgrind", "cachegrind", "massif", "ms_print", "helgrind", "vgdb", "drd",
    "fontconfig", "fonts-conf", "fc-cache", "fc-cat", "fc-list", "fc-match", "fc-pattern", "fc-query",
    "fc-scan", "fc-validate", "fc-conflist", "shared-mime-info", "update-mime-database", "nettle",
    "libtasn1", "asn1coding", "asn1decoding", "asn1parser", "tasn1", "zlib", "zlib1g",
)

_LICENCE_FILE_RE = re.compile(
    r"(licen[cs]e|copying|copyright|notice|patents|authors|credits|third[-_]party|disclaimer|eula)",
    re.IGNORECASE)
# Paragraph-level licence detector. Deliberately aggressive: losing a few paragraphs that merely
# mention a licence costs nothing, letting licence text in would contaminate the evaluation.
_LICENCE_TEXT_RE = re.compile(
    r"(\blicen[cs](?:e|es|ed|ing|or|ee)\b|copyright|\(c\)\s*\d{4}|©|permission is hereby granted"
    r"|redistribution and use|without (?:any )?warranty|merchantability|fitness for a particular purpose"
    r"|free software foundation|all rights reserved|spdx|public domain|creative commons|\bgpl\b|\blgpl\b"
    r"|provided\s+[\"'`]?as is)",
    re.IGNORECASE)
_LICENCE_SECTION_RE = re.compile(
    r"^(copyright|copying|licen[cs]e|licensing|warranty|no warranty|disclaimer|legal|authors?"
    r"|copyright and license|license and copyright)\b", re.IGNORECASE)


def looks_like_licence(text: str) -> bool:
    """True if ``text`` contains licence / copyright wording (see module docstring)."""
    return _LICENCE_TEXT_RE.search(text) is not None


# Unambiguous markers of licence texts (used by tests and checks; the filter above is broader).
LICENCE_MARKERS = ("permission is hereby granted", "general public license", "lesser general public",
                   "redistribution and use in source and binary forms", "merchantability",
                   "licensed under the apache", "spdx-license-identifier", "all rights reserved",
                   "mozilla public license", "this program is free software")

_EN_STOP = frozenset("the of and to a in is it that for be are as with this on by or not an if from at which "
                     "can you will use used when all".split())


def looks_english(text: str, sample_chars: int = 20000) -> bool:
    """Cheap language check: enough common English function words, few non-Latin letters."""
    sample = text[:sample_chars]
    words = re.findall(r"[^\W\d_]+", sample.lower())
    if len(words) < 30:
        return False
    stop = sum(w in _EN_STOP for w in words)
    non_ascii = sum(1 for w in words if not w.isascii())
    return stop >= 0.04 * len(words) and non_ascii <= 0.05 * len(words)


def is_pdf_bytes(data: bytes) -> bool:
    return data.lstrip()[:5] == b"%PDF-"


def _stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "big")


def split_of(name: str) -> str:
    return "heldout" if _stable_hash(name) % 100 < HELDOUT_PERCENT else "train"


@dataclass(frozen=True)
class Entry:
    """One source document, not yet loaded."""

    source: str
    name: str
    path: str  # file path, or "pydoc:<topic>"

    @property
    def split(self) -> str:
        return split_of(self.name)


@dataclass(frozen=True)
class Document:
    source: str
    name: str
    text: str


# ----------------------------------------------------------------------------------------------
# Cleaning helpers
# ----------------------------------------------------------------------------------------------

_WS_RUN = re.compile(r"[ \t]{4,}")


def clean_paragraphs(text: str) -> str:
    """Normalise blank lines and drop licence-like paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "".join(ch for ch in text if ch == "\n" or ch.isprintable())
    paras = re.split(r"\n\s*\n", text)
    kept = []
    for p in paras:
        p = "\n".join(line.rstrip() for line in p.split("\n")).strip("\n")
        if not p.strip() or looks_like_licence(p):
            continue
        kept.append(p)
    return "\n\n".join(kept)


def _denied(name: str, denylist: Sequence[str]) -> bool:
    """Substring match for denylist terms of 5+ characters (``libnettle8`` matches ``nettle``), prefix
    match on path components for shorter ones (``vgdb``, ``zlib``)."""
    low = name.lower()
    parts = re.split(r"[/_.\s:-]+", low)
    for d in denylist:
        if len(d) >= 5:
            if d in low:
                return True
        elif any(p.startswith(d) for p in parts):
            return True
    return False


def find_pdf_stems(roots: Iterable[Path] = PDF_SEARCH_ROOTS) -> list[str]:
    """Names of projects that ship a PDF under ``roots`` (used to extend the denylist)."""
    stems: set[str] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                if f.lower().endswith(".pdf"):
                    stem = f[:-4].lower()
                    for tok in re.split(r"[-_.]", stem):
                        if len(tok) >= 5 and tok not in {"manual", "users", "guide", "spec", "user", "info",
                                                           "shared", "valgrind_manual"}:
                            stems.add(tok)
                    if root == DOC_ROOT:
                        stems.add(Path(dirpath).name.lower())
    return sorted(stems)


# ----------------------------------------------------------------------------------------------
# Man pages
# ----------------------------------------------------------------------------------------------

_MAN_SECTION_HEAD = re.compile(r"^[A-Z][A-Z0-9 ,&/()'-]{1,60}$")


def _render_roff(src: str) -> str:
    groff = shutil.which("groff")
    if groff:
        try:
            out = subprocess.run(
                [groff, "-k", "-t", "-mandoc", "-Tutf8", "-P-cbou", "-rLL=2000n", "-rHY=0", "-dAD=l"],
                input=src.encode("utf-8", "replace"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                timeout=30, check=False,
            ).stdout.decode("utf-8", "replace")
            if out.strip():
                return out
        except (OSError, subprocess.SubprocessError):
            log.debug("groff failed, falling back to the roff stripper", exc_info=True)
    return strip_roff(src)


def strip_roff(src: str) -> str:
    """Very small roff-to-text converter (fallback when groff is unavailable)."""
    out: list[str] = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"^[.'](\S+)\s*(.*)$", line)
            if not m:
                continue
            macro, arg = m.group(1), m.group(2)
            if macro in ("SH", "SS"):
                out.append("")
                out.append(arg.strip('"').upper() if macro == "SH" else arg.strip('"'))
            elif macro in ("PP", "P", "LP", "sp", "br", "TP", "IP"):
                out.append("")
                if macro == "IP" and arg:
                    out.append(arg.split('"')[1] if arg.startswith('"') else arg.split()[0])
            elif macro in ("B", "I", "BI", "IB", "BR", "RB", "IR", "RI", "SM", "SB"):
                out.append(arg.replace('"', ""))
            continue
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\f\[[^\]]*\]", "", text)
    text = re.sub(r"\\\(em|\\\[em\]", "\u2014", text)
    text = re.sub(r"\\\(en|\\\[en\]", "\u2013", text)
    text = re.sub(r"\\\((..)|\\\[([^\]]*)\]", "", text)
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "").replace("\\ ", " ")
    text = re.sub(r"\\.", "", text)
    return text


def _postprocess_man(text: str) -> str:
    lines = []
    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        # groff indents body text by 7 columns; keep nesting but make it cheaper in tokens.
        if indent >= 7:
            line = " " * (2 * ((indent - 7) // 7) + ((indent - 7) % 7)) + stripped
        line = _WS_RUN.sub("   ", line) if not line.startswith(" ") else line[: len(line) - len(line.lstrip())] + _WS_RUN.sub("   ", line.lstrip())
        lines.append(line)
    # drop licence-like sections wholesale
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line and not line.startswith(" ") and _MAN_SECTION_HEAD.match(line):
            skipping = bool(_LICENCE_SECTION_RE.match(line))
        if not skipping:
            kept.append(line)
    return clean_paragraphs("\n".join(kept))


def _read_man(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    if is_pdf_bytes(data):
        return ""
    src = data.decode("utf-8", "replace")
    if src.lstrip().startswith(".so "):
        return ""
    return _postprocess_man(_render_roff(src))


def _discover_man(denylist: Sequence[str]) -> tuple[list[Entry], list[Entry]]:
    man, gcloud = [], []
    for sec in range(1, 9):
        d = MAN_ROOT / f"man{sec}"
        if not d.is_dir():
            continue
        for f in sorted(os.listdir(d)):
            p = d / f
            if p.is_symlink() or not p.is_file() or f.lower().endswith(".pdf"):
                continue
            name = f[:-3] if f.endswith(".gz") else f
            if _denied(name, denylist) or _LICENCE_FILE_RE.search(name):
                continue
            e = Entry("man-gcloud" if f.startswith("gcloud") else "man", f"man/{name}", str(p))
            (gcloud if e.source == "man-gcloud" else man).append(e)
    return man, gcloud


# ----------------------------------------------------------------------------------------------
# Python documentation and docstrings
# ----------------------------------------------------------------------------------------------

def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data import topics  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return {}
    return dict(topics.topics)


def _python_roots() -> list[Path]:
    roots = []
    paths = sysconfig.get_paths()
    for key in ("stdlib", "purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and p not in roots:
            roots.append(p)
    for p in sys.path:
        pp = Path(p)
        if pp.name == "site-packages" and pp.is_dir() and pp not in roots:
            roots.append(pp)
    return roots


_SKIP_DIRS = {"test", "tests", "testing", "__pycache__", "idlelib", "lib2to3", "ensurepip", "site-packages",
              "node_modules", "_vendor", "vendor", "templates", "static", "locale", "locales"}


def _discover_python(denylist: Sequence[str]) -> tuple[list[Entry], list[Entry]]:
    doc_entries: list[Entry] = []
    text_entries: list[Entry] = []
    seen: set[str] = set()
    roots = _python_roots()
    for ri, root in enumerate(roots):
        for dirpath, dirs, files in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            # the stdlib root contains site-packages; it is walked as its own root
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
            for f in sorted(files):
                p = os.path.join(dirpath, f)
                rel = os.path.normpath(os.path.join(rel_dir, f))
                low = f.lower()
                if low.endswith(".pdf") or _LICENCE_FILE_RE.search(f) or _denied(rel, denylist):
                    continue
                key = f"py{ri}/{rel}"
                if key in seen:
                    continue
                seen.add(key)
                if low.endswith(".py") and not low.startswith("test_"):
                    doc_entries.append(Entry("docstrings", f"docstrings/{rel}", p))
                elif low.endswith((".md", ".rst")) or (low == "metadata" and rel_dir.endswith(".dist-info")):
                    text_entries.append(Entry("pkgdocs", f"pkgdocs/{rel}", p))
    return doc_entries, text_entries


def _discover_usr_share_doc(denylist: Sequence[str]) -> list[Entry]:
    out: list[Entry] = []
    if not DOC_ROOT.is_dir():
        return out
    for dirpath, dirs, files in os.walk(DOC_ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            low = f.lower()
            rel = os.path.relpath(os.path.join(dirpath, f), DOC_ROOT)
            if low.endswith(".pdf") or _LICENCE_FILE_RE.search(rel) or "changelog" in low or _denied(rel, denylist):
                continue
            base = low[:-3] if low.endswith(".gz") else low
            if base.endswith((".md", ".rst", ".txt")) or base in ("readme", "news", "faq", "todo"):
                p = os.path.join(dirpath, f)
                if os.path.islink(p):
                    continue
                out.append(Entry("pkgdocs", f"doc/{rel}", p))
    return out


def _fmt_args(node: ast.AST) -> str:
    try:
        return ast.unparse(node.args)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        return "..."


def _read_docstrings(path: str, module: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if is_pdf_bytes(data) or len(data) > 3_000_000:
        return ""
    try:
        tree = ast.parse(data)
    except (SyntaxError, ValueError, RecursionError):
        return ""
    parts: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str, depth: int) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                d = ast.get_docstring(node)
                if d and not node.name.startswith("_"):
                    parts.append(f"class {prefix}{node.name}\n\n{d}")
                if depth < 2:
                    visit(node.body, f"{prefix}{node.name}.", depth + 1)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and (not node.name.startswith("_") or node.name == "__init__"):
                    parts.append(f"def {prefix}{node.name}({_fmt_args(node)})\n\n{d}")

    visit(tree.body, "", 0)
    return clean_paragraphs("\n\n".join(parts))


def _read_text_doc(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(4_000_000)
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return ""
    if is_pdf_bytes(data) or b"\x00" in data[:4096]:
        return ""
    text = data.decode("utf-8", "replace")
    if os.path.basename(path) == "METADATA":
        # RFC 822 header (name, version, licence fields, ...) then the long description
        head, _, body = text.partition("\n\n")
        text = body
    # drop raw HTML / badges lines that carry no prose
    text = "\n".join(line for line in text.splitlines()
                     if not re.match(r"^\s*(<[^>]+>\s*)+$|^\s*\[!\[|^\.\. \||^\s+:(target|alt|width|height|align):", line))
    # drop paragraphs that are mostly links
    text = "\n\n".join(p for p in re.split(r"\n\s*\n", text)
                       if sum(len(u) for u in re.findall(r"https?://\S+", p)) < 0.5 * max(1, len(p.strip())))
    return clean_paragraphs(text)


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

class Corpus:
    """Entries of the real-text sources, loaded lazily with an in-memory LRU cache.

    ``Corpus.discover()`` scans this machine; ``Corpus.from_documents()`` wraps given documents
    (tests, or text brought from elsewhere).
    """

    def __init__(self, entries: dict[str, list[Entry]], texts: dict[str, str] | None = None,
                 cache_size: int = 4096, min_chars: int = 400, cache_dir: str | os.PathLike | None = None):
        self.entries = {k: v for k, v in entries.items() if v}
        self._fixed = dict(texts or {})
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cache_size = cache_size
        self.min_chars = min_chars
        # optional on-disk cache of cleaned texts (keyed by path, size, mtime and CACHE_VERSION)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def discover(cls, sources: Sequence[str] = SOURCES, split: str = "train",
                 limit_per_source: int | None = None, cache_dir: str | os.PathLike | None = None) -> Corpus:
        denylist = tuple(PDF_DENYLIST) + tuple(find_pdf_stems())
        entries: dict[str, list[Entry]] = {s: [] for s in sources}
        texts: dict[str, str] = {}
        if "man" in sources or "man-gcloud" in sources:
            man, gcloud = _discover_man(denylist)
            if "man" in sources:
                entries["man"] = man
            if "man-gcloud" in sources:
                entries["man-gcloud"] = gcloud
        if "pydoc" in sources:
            for topic, text in sorted(_pydoc_topics().items()):
                e = Entry("pydoc", f"pydoc/{topic}", f"pydoc:{topic}")
                entries["pydoc"].append(e)
                texts[e.name] = clean_paragraphs(text)
        if "docstrings" in sources or "pkgdocs" in sources:
            py, docs = _discover_python(denylist)
            if "docstrings" in sources:
                entries["docstrings"] = py
            if "pkgdocs" in sources:
                entries["pkgdocs"] = docs + _discover_usr_share_doc(denylist)
        for s in list(entries):
            lst = [e for e in entries[s] if split == "all" or e.split == split]
            if limit_per_source is not None:
                lst = lst[:limit_per_source]
            entries[s] = lst
        log.info("corpus (%s): %s", split, {k: len(v) for k, v in entries.items()})
        return cls(entries, texts, cache_dir=cache_dir)

    @classmethod
    def from_documents(cls, docs: Iterable[Document]) -> Corpus:
        entries: dict[str, list[Entry]] = {}
        texts = {}
        for d in docs:
            entries.setdefault(d.source, []).append(Entry(d.source, d.name, f"mem:{d.name}"))
            texts[d.name] = d.text
        return cls(entries, texts)

    # -- access --------------------------------------------------------------------------------
    @property
    def sources(self) -> list[str]:
        return sorted(self.entries)

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def text(self, entry: Entry) -> str:
        """Cleaned text of ``entry`` ('' when unusable)."""
        if entry.name in self._fixed:
            return self._fixed[entry.name]
        hit = self._cache.get(entry.name)
        if hit is not None:
            self._cache.move_to_end(entry.name)
            return hit
        disk = self._disk_path(entry)
        if disk is not None and disk.exists():
            text = disk.read_text(encoding="utf-8")
            self._remember(entry.name, text)
            return text
        try:
            if entry.source in ("man", "man-gcloud"):
                text = _read_man(entry.path)
            elif entry.source == "docstrings":
                module = entry.name.split("/", 1)[1][:-3].replace("/", ".").removesuffix(".__init__")
                text = _read_docstrings(entry.path, module)
            else:
                text = _read_text_doc(entry.path)
        except OSError:
            log.debug("cannot read %s", entry.path, exc_info=True)
            text = ""
        if len(text) < self.min_chars or not looks_english(text):
            text = ""
        if disk is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_suffix(f".{os.getpid()}.part")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, disk)
        self._remember(entry.name, text)
        return text

    def _remember(self, name: str, text: str) -> None:
        self._cache[name] = text
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _disk_path(self, entry: Entry) -> Path | None:
        if self.cache_dir is None or entry.path.startswith(("mem:", "pydoc:")):
            return None
        try:
            st = os.stat(entry.path)
        except OSError:
            return None
        key = f"{CACHE_VERSION}|{entry.source}|{entry.path}|{st.st_size}|{st.st_mtime_ns}|{self.min_chars}"
        h = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return self.cache_dir / h[:2] / f"{h}.txt"

    def document(self, entry: Entry) -> Document:
        return Document(entry.source, entry.name, self.text(entry))

    def random_document(self, rng, source: str, min_chars: int = 0, tries: int = 50) -> Document | None:
        lst = self.entries.get(source) or []
        for _ in range(tries if lst else 0):
            e = lst[rng.randrange(len(lst))]
            t = self.text(e)
            if t and len(t) >= min_chars:
                return Document(e.source, e.name, t)
        return None

    def long_text(self, rng, source: str, min_chars: int, max_docs: int = 64) -> Document | None:
        """A long text: consecutive entries of ``source`` (sorted order keeps neighbours related,
        e.g. ``git-*`` pages or the modules of one package) joined until ``min_chars`` is reached."""
        lst = self.entries.get(source) or []
        if not lst:
            return None
        start = rng.randrange(len(lst))
        parts: list[str] = []
        names: list[str] = []
        total = 0
        i = start
        for _ in range(min(len(lst), max_docs * 4)):
            e = lst[i % len(lst)]
            i += 1
            t = self.text(e)
            if not t:
                continue
            parts.append(t)
            names.append(e.name)
            total += len(t) + 2
            if total >= min_chars or len(parts) >= max_docs:
                break
        if not parts:
            return None
        return Document(source, names[0] + (f" (+{len(names) - 1})" if len(names) > 1 else ""), "\n\n".join(parts))
