"""Held-out real-PDF questions that no single passage answers (``bench/data/real_qa_multi.jsonl``).

``real_qa.jsonl`` holds extractive questions, each answered by one passage, so top-k passage
retrieval can answer all of them. This set is meant to separate "read the whole document" from
"retrieve a few passages": every item needs evidence from several places, or a check over the whole
text. Three kinds:

- ``count``: "How many X does the document list/describe?" The items are spread over several pages
  or a long list; the gold number was counted by hand from pypdf's text and the evidence lists every
  counted item (plus, where useful, the near-misses that were not counted).
- ``two-hop``: one passage names the thing (a section, a function, a constant) whose property is
  stated in another passage, often many pages away.
- ``absence``: "Does the document mention Y?" (gold "no", with the search terms in ``absent_terms``)
  or scope/order checks ("Is X documented before or after Y?") with a one-word gold answer.

One JSON object a line::

    {"id": "nettle-manual-m01", "pdf": "nettle-manual", "kind": "count", "question": "...?",
     "answers": ["4", "four"], "evidence": [{"page": 27, "text": "<exact span>"}, ...],
     "note": "how the answer follows", "absent_terms": ["..."]}   # absent_terms: absence items only

Evidence spans follow the ``real_qa.jsonl`` convention: an exact, case-sensitive substring of
``normalise_ws(page_texts(pdf)[page - 1])`` (pypdf 7.1.0, 1-based pages). ``verify_multi_qa()`` checks
that, plus the invariants that make the gold answers trustworthy (see its docstring).
``python -m bench.multi_qa`` prints the verification summary and a table of items per PDF and kind.
Like the rest of ``bench/data``, this is evaluation data: never use it for training.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from bench import evalset
from bench.evalset import normalise_answer, normalise_ws

MULTI_QA_JSONL = evalset.DATA_DIR / "real_qa_multi.jsonl"
KINDS = ("count", "two-hop", "absence")
# Gold answers an absence/scope item may have: yes/no for "does it mention", before/after for order.
ABSENCE_ANSWERS = {"yes", "no", "before", "after"}
_NUMBER = re.compile(r"^\d+$")


@dataclass(frozen=True)
class Evidence:
    page: int  # 1-based
    text: str  # exact span of the whitespace-normalised page text


@dataclass
class MultiQAItem:
    id: str
    pdf: str
    kind: str  # one of KINDS
    question: str
    answers: list[str]  # accepted variants; for count items the first one is the number in digits
    evidence: list[Evidence]
    note: str = ""
    absent_terms: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # any other keys of the JSON object, kept as is

    @property
    def pages(self) -> list[int]:
        """Sorted distinct pages the evidence comes from."""
        return sorted({e.page for e in self.evidence})


def load_multi_qa(path: Path = MULTI_QA_JSONL) -> list[MultiQAItem]:
    """All items of the file, in file order (blank lines ignored). Raises on malformed JSON or a
    missing required key, so a broken file fails loudly rather than silently shrinking the set."""
    items = []
    known = {"id", "pdf", "kind", "question", "answers", "evidence", "note", "absent_terms"}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: {e}") from e
        items.append(
            MultiQAItem(
                id=d["id"],
                pdf=d["pdf"],
                kind=d["kind"],
                question=d["question"],
                answers=list(d["answers"]),
                evidence=[Evidence(page=int(e["page"]), text=e["text"]) for e in d.get("evidence", [])],
                note=d.get("note", ""),
                absent_terms=list(d.get("absent_terms", [])),
                extra={k: v for k, v in d.items() if k not in known},
            )
        )
    return items


def _search_forms(text: str) -> list[str]:
    """Forms of a page's text an absent term must not occur in, all lower case.

    Besides the text itself: NFKC (pypdf keeps ligatures such as U+FB01, so "ﬁle" must match "file")
    and a de-hyphenated copy (line-break hyphenation "iden- tifier" must match "identifier"). Without
    these an "absent" term could be present in the document under a typographic disguise."""
    t = unicodedata.normalize("NFKC", text).lower()
    return [text.lower(), t, t.replace("- ", "")]


def unavailable_pdfs(items: list[MultiQAItem] | None = None) -> dict[str, str]:
    """PDF ids used by ``items`` whose copy cannot be found (or fails its sha256), with the reason.

    Their items are skipped by ``verify_multi_qa`` rather than reported as problems, as in
    ``evalset.verify_real_qa``: a machine without a PDF should not fail the check."""
    items = load_multi_qa() if items is None else items
    pdfs = evalset.load_real_pdfs()
    out = {}
    for pid in sorted({i.pdf for i in items if i.pdf in pdfs}):
        if evalset.page_texts(pid) is None:
            out[pid] = evalset.locate_pdf(pdfs[pid])[1]
    return out


def verify_multi_qa(items: list[MultiQAItem] | None = None) -> list[str]:
    """Problems with the items, as ``"<id>: <problem>"`` strings; an empty list means all is well.

    Shape (checked for every item): unique non-empty id, known pdf id, kind in ``KINDS``, a question
    ending in "?", non-empty answers and note. Per kind, the invariants that make the gold answer
    checkable without re-reading the PDF:

    - count: the first answer is a plain number (digits) and every all-digit variant agrees, so
      scoring can compare numbers; at least two evidence spans (the items counted), none repeated
      (a duplicated span would suggest an item was counted twice).
    - two-hop: at least two evidence spans on the PDF (the hop and the fact), and some accepted
      answer occurs inside some evidence span (SQuAD-normalised, whole tokens), so the final fact
      really is quoted.
    - absence: the first answer is one of yes/no/before/after; a "no" item lists ``absent_terms``
      and an order item (before/after) has at least two evidence spans.

    Against the PDF text (only for PDFs that are available; the others are skipped, see
    ``unavailable_pdfs``): every evidence page is in range and its span, whitespace-normalised, is an
    exact case-sensitive substring of that page's normalised text; no absent term occurs on any page,
    case-insensitively, also after NFKC and de-hyphenation (``_search_forms``)."""
    items = load_multi_qa() if items is None else items
    pdfs = evalset.load_real_pdfs()
    missing = unavailable_pdfs([i for i in items if i.pdf in pdfs])
    problems: list[str] = []
    seen: set[str] = set()
    forms_cache: dict[str, list[list[str]]] = {}

    for it in items:
        p = lambda msg, _id=it.id: problems.append(f"{_id}: {msg}")
        if not it.id.strip():
            p("empty id")
        if it.id in seen:
            p("duplicate id")
        seen.add(it.id)
        if it.pdf not in pdfs:
            p(f"unknown pdf id {it.pdf!r}")
            continue
        if it.kind not in KINDS:
            p(f"kind {it.kind!r} not in {KINDS}")
        if not it.question.strip().endswith("?"):
            p("question does not end with '?'")
        if not it.answers or not all(isinstance(a, str) and a.strip() for a in it.answers):
            p("empty answers")
            continue
        if not it.note.strip():
            p("empty note")
        spans = [normalise_ws(e.text) for e in it.evidence]
        if any(not s for s in spans):
            p("empty evidence span")

        if it.kind == "count":
            nums = [a.strip() for a in it.answers if _NUMBER.match(a.strip())]
            if not _NUMBER.match(it.answers[0].strip()):
                p(f"count answer {it.answers[0]!r} is not a number")
            elif len({int(n) for n in nums}) > 1:
                p(f"count answers disagree: {nums}")
            if len(spans) < 2:
                p("count item needs at least two evidence spans")
            if len(set(zip((e.page for e in it.evidence), spans))) != len(spans):
                p("duplicate evidence span")
        elif it.kind == "two-hop":
            if len(spans) < 2:
                p("two-hop item needs at least two evidence spans")
            ev_norm = [f" {normalise_answer(s)} " for s in spans]
            if not any(
                normalise_answer(a) and f" {normalise_answer(a)} " in e for a in it.answers for e in ev_norm
            ):
                p("no accepted answer occurs inside the evidence")
        elif it.kind == "absence":
            first = normalise_answer(it.answers[0])
            if first not in ABSENCE_ANSWERS:
                p(f"absence answer {it.answers[0]!r} not one of {sorted(ABSENCE_ANSWERS)}")
            if first == "no" and not it.absent_terms:
                p("'no' absence item without absent_terms")
            if first in {"before", "after"} and len(spans) < 2:
                p("order item needs at least two evidence spans")
        if it.absent_terms and it.kind != "absence":
            p("absent_terms on a non-absence item")

        if it.pdf in missing:
            continue  # skipped, not a problem
        pages = evalset.page_texts(it.pdf)
        for e, s in zip(it.evidence, spans):
            if not (1 <= e.page <= len(pages)):
                p(f"page {e.page} out of range 1..{len(pages)}")
                continue
            if s and s not in pages[e.page - 1]:
                found = [n for n, t in enumerate(pages, 1) if s in t]
                hint = f" (found on page(s) {found})" if found else " (not found on any page)"
                p(f"evidence not on page {e.page}{hint}: {s[:80]!r}")
        if it.absent_terms:
            if it.pdf not in forms_cache:
                forms_cache[it.pdf] = [_search_forms(t) for t in pages]
            for term in it.absent_terms:
                t = unicodedata.normalize("NFKC", normalise_ws(term)).lower()
                if not t:
                    p("empty absent term")
                    continue
                hits = [n for n, forms in enumerate(forms_cache[it.pdf], 1) if any(t in f for f in forms)]
                if hits:
                    p(f"absent term {term!r} occurs on page(s) {hits[:10]}")
    return problems


def multi_qa_stats(items: list[MultiQAItem] | None = None) -> dict:
    """Items per PDF and kind, the evidence pages used and the widest page gap within an item."""
    items = load_multi_qa() if items is None else items
    out: dict = {"items": len(items), "pdfs": {}}
    for pid in sorted({i.pdf for i in items}):
        its = [i for i in items if i.pdf == pid]
        pages = sorted({pg for i in its for pg in i.pages})
        out["pdfs"][pid] = {
            "items": len(its),
            "by_kind": {k: sum(i.kind == k for i in its) for k in KINDS},
            "pages": pages,
            "max_item_page_spread": max((i.pages[-1] - i.pages[0] for i in its if i.pages), default=0),
        }
    return out


def summary(items: list[MultiQAItem] | None = None) -> tuple[str, bool]:
    """Human-readable verification summary and whether it passed."""
    items = load_multi_qa() if items is None else items
    problems = verify_multi_qa(items)
    missing = unavailable_pdfs(items)
    skipped = [i.id for i in items if i.pdf in missing]
    checked = len(items) - len(skipped)
    lines = [
        f"{len(items)} items, checked against the PDF text {checked}, skipped {len(skipped)}, problems {len(problems)}"
    ]
    lines += [f"  SKIP {pid}: {why}" for pid, why in missing.items()]
    lines += [f"  PROBLEM {msg}" for msg in problems]
    stats = multi_qa_stats(items)
    lines.append(f"{'pdf':24s} {'items':>5s} " + " ".join(f"{k:>7s}" for k in KINDS) + "  pages")
    for pid, s in stats["pdfs"].items():
        kinds = " ".join(f"{s['by_kind'][k]:7d}" for k in KINDS)
        lines.append(
            f"{pid:24s} {s['items']:5d} {kinds}  {s['pages'][0]}-{s['pages'][-1]}" if s["pages"] else pid
        )
    return "\n".join(lines), not problems


if __name__ == "__main__":  # python -m bench.multi_qa
    text, ok = summary()
    print(text)
    raise SystemExit(0 if ok else 1)


_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
          "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12"}


def score_multi(item: MultiQAItem, prediction: str) -> float:
    """1.0 if the prediction answers the item, stricter than `contains_match` where that is lenient:
    count items take the first number said (digits or a word up to twelve), absence items the first
    yes/no word, two-hop items a whole-token match of any accepted answer."""
    from bench.evalset import contains_match, normalise_answer

    words = normalise_answer(prediction).split()
    if item.kind == "count":
        said = next((w if _NUMBER.fullmatch(w) else _WORDS[w] for w in words if _NUMBER.fullmatch(w) or w in _WORDS), None)
        gold = item.answers[0]
        return float(said is not None and said == gold)
    if item.kind == "absence":
        said = next((w for w in words if w in ("yes", "no")), None)
        return float(said is not None and any(normalise_answer(a).split()[:1] == [said] for a in item.answers))
    return contains_match(prediction, item.answers)
