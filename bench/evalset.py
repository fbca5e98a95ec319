"""Evaluation data: extractive QA over real PDFs, needle items over real text, scoring helpers.

Real PDFs (``bench/data/real_pdfs.json``) are PDFs that were found on the development machine
(package documentation under ``/usr/share/doc``). They are reserved for evaluation: nothing here may
be used for training. Each entry records the absolute path where it was found, the sha256 and size of
the file on disk and of the PDF bytes (several ship gzip-compressed as ``*.pdf.gz``), and, where the
licence allows redistribution, a copy under ``bench/data/pdfs/``. The loader prefers the copy, falls
back to the original path, checks the sha256 of the PDF bytes and skips a PDF it cannot find (with a
reason) rather than failing.

Questions (``bench/data/real_qa.jsonl``), one JSON object a line::

    {"id": "bzip2-03", "pdf": "bzip2-manual", "question": "...", "answers": ["...", ...],
     "evidence": "<exact span of pypdf's extracted text of that page, whitespace-normalised>",
     "page": 7}

``verify_real_qa()`` checks programmatically that every evidence span occurs (whitespace-normalised,
case-sensitive) in pypdf's text of the stated 1-based page and that every gold answer occurs inside
its evidence.

Needle items use real English text as the haystack: Python's own documentation
(``pydoc_data.topics``), concatenated in a deterministic, seeded order.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
REAL_PDFS_JSON = DATA_DIR / "real_pdfs.json"
REAL_QA_JSONL = DATA_DIR / "real_qa.jsonl"

# Characters per token used only to estimate how far into a document the evidence lies when no
# tokenizer is at hand. Conservative: the SmolLM2 tokenizer gives 2.5-4.1 (3.2 typical) on these PDFs,
# so "past 32K characters" under-counts "past 8K tokens" (44 vs 49 items; see evidence_token_offset).
CHARS_PER_TOKEN = 4.0


# --------------------------------------------------------------------------------------------------
# text helpers


def normalise_ws(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends (case is kept)."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------
# real PDFs


@dataclass(frozen=True)
class RealPdf:
    id: str
    title: str
    kind: str
    source_path: str  # absolute path where it was found (may be .pdf.gz)
    source_sha256: str  # sha256 of the file at source_path
    source_size: int
    pdf_sha256: str  # sha256 of the PDF bytes (after gunzip where compressed)
    pdf_size: int
    pages: int
    chars: int  # whitespace-normalised characters of pypdf's text, all pages
    licence: str
    local_copy: str | None = None  # path relative to bench/data/, or None


def load_real_pdfs(path: Path = REAL_PDFS_JSON) -> dict[str, RealPdf]:
    meta = json.loads(Path(path).read_text(encoding="utf-8"))
    return {d["id"]: RealPdf(**d) for d in meta["pdfs"]}


def _read_pdf_bytes(p: Path) -> bytes:
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw


def locate_pdf(pdf: RealPdf) -> tuple[bytes | None, str]:
    """Return (pdf_bytes, where) or (None, reason). Checks the recorded sha256 of the PDF bytes."""
    candidates: list[Path] = []
    if pdf.local_copy:
        candidates.append(DATA_DIR / pdf.local_copy)
    candidates.append(Path(pdf.source_path))
    reasons = []
    for c in candidates:
        if not c.is_file():
            reasons.append(f"{c}: missing")
            continue
        try:
            data = _read_pdf_bytes(c)
        except OSError as e:  # unreadable or corrupt gzip
            reasons.append(f"{c}: {e}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != pdf.pdf_sha256:
            reasons.append(f"{c}: sha256 {digest[:12]} != recorded {pdf.pdf_sha256[:12]}")
            continue
        return data, str(c)
    return None, "; ".join(reasons)


def pdf_path(pdf_id: str) -> Path | None:
    """A path to an uncompressed copy of the PDF with the recorded content, or None if unavailable.

    Gzipped originals are decompressed once into a temporary directory (content-addressed)."""
    pdf = load_real_pdfs()[pdf_id]
    data, where = locate_pdf(pdf)
    if data is None:
        return None
    p = Path(where)
    if p.suffix == ".pdf":
        return p
    import tempfile

    out = Path(tempfile.gettempdir()) / "sharedllm-evalpdfs" / f"{pdf.pdf_sha256[:16]}-{pdf.id}.pdf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return out


@functools.lru_cache(maxsize=32)
def _page_texts_cached(pdf_id: str, pdf_sha256: str) -> tuple[str, ...] | None:
    import io

    import pypdf

    pdf = load_real_pdfs()[pdf_id]
    data, _ = locate_pdf(pdf)
    if data is None:
        return None
    reader = pypdf.PdfReader(io.BytesIO(data))
    return tuple(normalise_ws(page.extract_text() or "") for page in reader.pages)


def page_texts(pdf_id: str) -> list[str] | None:
    """pypdf's extracted text of every page, whitespace-normalised; None if the PDF is unavailable."""
    pdf = load_real_pdfs()[pdf_id]
    t = _page_texts_cached(pdf_id, pdf.pdf_sha256)
    return None if t is None else list(t)


def document_text(pdf_id: str) -> str | None:
    """The whole document as the concatenation of its normalised pages, separated by one newline."""
    pages = page_texts(pdf_id)
    return None if pages is None else "\n".join(pages)


def page_offsets(pdf_id: str) -> list[int] | None:
    """Character offset in ``document_text`` at which each page starts."""
    pages = page_texts(pdf_id)
    if pages is None:
        return None
    offs, pos = [], 0
    for p in pages:
        offs.append(pos)
        pos += len(p) + 1
    return offs


# --------------------------------------------------------------------------------------------------
# extractive QA over real PDFs


@dataclass
class QAItem:
    id: str
    pdf: str
    question: str
    answers: list[str]
    evidence: str
    page: int  # 1-based
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d


def load_real_qa(path: Path = REAL_QA_JSONL, available_only: bool = False) -> list[QAItem]:
    """All QA items (or only those whose PDF can be found and matches its recorded sha256)."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        known = {"id", "pdf", "question", "answers", "evidence", "page"}
        extra = {k: v for k, v in d.items() if k not in known}
        items.append(
            QAItem(
                id=d.get("id") or f"{d['pdf']}-{n:03d}",
                pdf=d["pdf"],
                question=d["question"],
                answers=list(d["answers"]),
                evidence=d["evidence"],
                page=int(d["page"]),
                extra=extra,
            )
        )
    if available_only:
        ok = {pid for pid in {i.pdf for i in items} if page_texts(pid) is not None}
        items = [i for i in items if i.pdf in ok]
    return items


def evidence_offset(item: QAItem) -> int | None:
    """Character offset of the item's evidence in ``document_text(item.pdf)``; None if unavailable."""
    pages = page_texts(item.pdf)
    if pages is None or not (1 <= item.page <= len(pages)):
        return None
    pos = pages[item.page - 1].find(normalise_ws(item.evidence))
    if pos < 0:
        return None
    return page_offsets(item.pdf)[item.page - 1] + pos


@dataclass
class VerifyReport:
    checked: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item id, reason)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (item id, problem)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [f"checked {self.checked}, skipped {len(self.skipped)}, errors {len(self.errors)}"]
        lines += [f"  SKIP {i}: {r}" for i, r in self.skipped]
        lines += [f"  ERROR {i}: {r}" for i, r in self.errors]
        return "\n".join(lines)


def verify_real_qa(items: list[QAItem] | None = None) -> VerifyReport:
    """Check every item whose PDF is available: evidence on the stated page, answers inside evidence.

    Also checks the item's shape (known pdf id, non-empty question/answers/evidence, unique ids).
    Items whose PDF is missing or changed are reported in ``skipped`` with the reason."""
    if items is None:
        items = load_real_qa()
    pdfs = load_real_pdfs()
    rep = VerifyReport()
    seen: set[str] = set()
    unavailable: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            rep.errors.append((it.id, "duplicate id"))
        seen.add(it.id)
        if it.pdf not in pdfs:
            rep.errors.append((it.id, f"unknown pdf id {it.pdf!r}"))
            continue
        if not it.question.strip() or not it.answers or not all(a.strip() for a in it.answers):
            rep.errors.append((it.id, "empty question or answer"))
            continue
        ev = normalise_ws(it.evidence)
        if not ev:
            rep.errors.append((it.id, "empty evidence"))
            continue
        if it.pdf not in unavailable:
            pages = page_texts(it.pdf)
            if pages is None:
                unavailable[it.pdf] = locate_pdf(pdfs[it.pdf])[1]
        if it.pdf in unavailable:
            rep.skipped.append((it.id, f"pdf {it.pdf} unavailable: {unavailable[it.pdf]}"))
            continue
        rep.checked += 1
        if not (1 <= it.page <= len(pages)):
            rep.errors.append((it.id, f"page {it.page} out of range 1..{len(pages)}"))
            continue
        if ev not in pages[it.page - 1]:
            found = [n for n, t in enumerate(pages, 1) if ev in t]
            hint = f" (found on page(s) {found})" if found else " (not found on any page)"
            rep.errors.append((it.id, f"evidence not on page {it.page}{hint}: {ev[:80]!r}"))
            continue
        for a in it.answers:
            if normalise_ws(a) not in ev:
                rep.errors.append((it.id, f"answer {a!r} not inside evidence"))
    return rep


# --------------------------------------------------------------------------------------------------
# needle items over real text


@functools.lru_cache(maxsize=1)
def _pydoc_topics() -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics

    return tuple(sorted(topics.items()))


def haystack_text(n_chars: int, seed: int = 0) -> str:
    """Real English text of exactly ``n_chars`` characters (cut at a word boundary, then padded or
    trimmed to size never mid-word where avoidable) from Python's documentation (``pydoc_data.topics``).

    Topics are concatenated in an order shuffled by ``seed`` (a fresh shuffle for each pass when more
    text than one pass is needed). Deterministic for a given Python version."""
    if n_chars <= 0:
        return ""
    topics = _pydoc_topics()
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < n_chars + 200:
        order = list(range(len(topics)))
        rng.shuffle(order)
        for i in order:
            body = topics[i][1].strip()
            parts.append(body)
            total += len(body) + 2
            if total >= n_chars + 200:
                break
    text = "\n\n".join(parts)
    cut = text[:n_chars]
    # end on a word boundary: back up to the last whitespace, then pad with spaces to the exact size
    ws = max(cut.rfind(" "), cut.rfind("\n"))
    if ws > n_chars * 0.9:
        cut = cut[:ws].rstrip()
    return cut + " " * (n_chars - len(cut))


_NEEDLE_KINDS = ("passkey", "magic_number", "kv")
_NOUNS = (
    "harbour", "lantern", "orchard", "violin", "glacier", "compass", "meadow", "falcon", "quarry",
    "ember", "saffron", "turbine", "canyon", "marble", "pylon", "juniper", "beacon", "tundra",
)


@dataclass
class NeedleItem:
    context: str  # haystack with the needle inserted
    question: str
    answer: str
    needle: str
    depth: float  # requested relative depth in [0, 1]
    char_offset: int  # where the needle starts in ``context``
    kind: str
    seed: int

    @property
    def actual_depth(self) -> float:
        return self.char_offset / max(1, len(self.context))


def make_needle_item(haystack_tokens_text: str, depth: float, seed: int = 0, kind: str | None = None) -> NeedleItem:
    """Insert a needle fact into ``haystack_tokens_text`` at relative ``depth`` (0 = start, 1 = end).

    The needle goes in at the nearest sentence or line boundary to the requested position (never
    inside a word). ``kind`` is one of "passkey", "magic_number", "kv" (default: chosen by ``seed``).
    Returns the context, the question, and the gold answer (digits or a UUID-like key)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"needle:{seed}")
    kind = kind or _NEEDLE_KINDS[seed % len(_NEEDLE_KINDS)]
    if kind == "passkey":
        answer = str(rng.randint(10000, 99999))
        needle = f"The pass key is {answer}. Remember it. {answer} is the pass key."
        question = "What is the pass key? Answer with the number only."
    elif kind == "magic_number":
        noun = rng.choice(_NOUNS)
        answer = str(rng.randint(1000000, 9999999))
        needle = f"One of the special magic numbers for {noun} is: {answer}."
        question = f"What is the special magic number for {noun} mentioned in the document?"
    elif kind == "kv":
        key = "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4))
        answer = "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4))
        needle = f'The value stored under the key "{key}" is "{answer}".'
        question = f'What is the value stored under the key "{key}"?'
    else:
        raise ValueError(f"unknown needle kind {kind!r}")

    text = haystack_tokens_text
    target = int(round(depth * len(text)))
    pos = _nearest_boundary(text, target)
    before, after = text[:pos], text[pos:]
    sep_before = "" if (not before or before[-1].isspace()) else " "
    sep_after = "" if (not after or after[0].isspace()) else " "
    context = before + sep_before + needle + sep_after + after
    return NeedleItem(
        context=context,
        question=question,
        answer=answer,
        needle=needle,
        depth=depth,
        char_offset=len(before) + len(sep_before),
        kind=kind,
        seed=seed,
    )


_BOUNDARY = re.compile(r"(?<=[.!?:])\s+|\n+")


def _nearest_boundary(text: str, target: int, window: int = 400) -> int:
    if target <= 0:
        return 0
    if target >= len(text):
        return len(text)
    lo, hi = max(0, target - window), min(len(text), target + window)
    best = None
    for m in _BOUNDARY.finditer(text, lo, hi):
        p = m.end()
        if best is None or abs(p - target) < abs(best - target):
            best = p
    if best is None:  # no sentence boundary nearby: any whitespace
        for p in range(target, lo, -1):
            if text[p - 1].isspace():
                return p
        return target
    return best


# --------------------------------------------------------------------------------------------------
# scoring (SQuAD-style)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014"}


def normalise_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    s = s.lower()
    s = "".join(ch if ch not in _PUNCT else " " for ch in s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _as_list(golds: str | list[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(prediction: str, golds: str | list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    p = normalise_answer(prediction)
    return float(any(p == normalise_answer(g) for g in _as_list(golds)))


def contains_match(prediction: str, golds: str | list[str]) -> float:
    """1.0 if any normalised gold answer occurs in the normalised prediction as whole tokens."""
    p = f" {normalise_answer(prediction)} "
    for g in _as_list(golds):
        ng = normalise_answer(g)
        if ng and f" {ng} " in p:
            return 1.0
    return 0.0


def f1_score(prediction: str, golds: str | list[str]) -> float:
    """Best token-level F1 against the gold answers (SQuAD)."""
    from collections import Counter

    pt = normalise_answer(prediction).split()
    best = 0.0
    for g in _as_list(golds):
        gt = normalise_answer(g).split()
        common = Counter(pt) & Counter(gt)
        same = sum(common.values())
        if not pt or not gt:
            best = max(best, float(pt == gt))
            continue
        if same == 0:
            continue
        prec, rec = same / len(pt), same / len(gt)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best


# --------------------------------------------------------------------------------------------------
# reporting


def evidence_token_offset(item: QAItem, tokenizer) -> int | None:
    """Tokens of the document before the item's evidence, with ``tokenizer`` (anything with
    ``encode(text) -> list``; special tokens are the caller's business)."""
    off = evidence_offset(item)
    if off is None:
        return None
    return len(tokenizer.encode(document_text(item.pdf)[:off]))


def real_qa_stats(items: list[QAItem] | None = None, far_chars: int = int(8192 * CHARS_PER_TOKEN)) -> dict:
    """Per-PDF counts, pages used and how many items have evidence past ``far_chars`` characters."""
    items = load_real_qa() if items is None else items
    out: dict = {"items": len(items), "far_chars": far_chars, "far": 0, "unavailable": 0, "pdfs": {}}
    for pid, pdf in load_real_pdfs().items():
        its = [i for i in items if i.pdf == pid]
        offs = [evidence_offset(i) for i in its]
        far = sum(o is not None and o >= far_chars for o in offs)
        out["pdfs"][pid] = {
            "items": len(its),
            "pdf_pages": pdf.pages,
            "pdf_chars": pdf.chars,
            "pages": sorted(i.page for i in its),
            "far": far,
            "available": page_texts(pid) is not None,
        }
        out["far"] += far
        out["unavailable"] += sum(o is None for o in offs)
    return out


if __name__ == "__main__":  # python -m bench.evalset
    rep = verify_real_qa()
    print(rep.summary())
    print(json.dumps(real_qa_stats(), indent=1))
    raise SystemExit(0 if rep.ok else 1)
