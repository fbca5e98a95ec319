"""Evaluation data: every real-PDF QA item whose PDF is available must verify; needle items; scoring."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ may not be an installed package yet
    sys.path.insert(0, str(ROOT))

from bench import evalset  # noqa: E402
from bench.evalset import (  # noqa: E402
    QAItem,
    contains_match,
    exact_match,
    f1_score,
    haystack_text,
    load_real_pdfs,
    load_real_qa,
    make_needle_item,
    normalise_answer,
    verify_real_qa,
)

# --------------------------------------------------------------------------------------------------
# real PDFs and QA items


def test_real_pdf_metadata_is_complete():
    pdfs = load_real_pdfs()
    assert 6 <= len(pdfs) <= 10
    for p in pdfs.values():
        assert Path(p.source_path).is_absolute()
        assert len(p.pdf_sha256) == 64 and len(p.source_sha256) == 64
        assert p.pages >= 5 and p.pdf_size > 0 and p.licence
        if p.local_copy:
            assert p.pdf_size < 2_000_000
    assert sum(p.pages >= 20 for p in pdfs.values()) >= 3
    copied = [evalset.DATA_DIR / p.local_copy for p in pdfs.values() if p.local_copy]
    assert sum(c.stat().st_size for c in copied if c.is_file()) < 10_000_000


def test_real_qa_shape():
    items = load_real_qa()
    assert 40 <= len(items) <= 80
    pdfs = load_real_pdfs()
    assert len({i.id for i in items}) == len(items)
    for it in items:
        assert it.pdf in pdfs, it.id
        assert 1 <= it.page <= pdfs[it.pdf].pages, it.id
        assert it.question.strip().endswith("?"), it.id
        assert it.answers and all(a.strip() for a in it.answers), it.id
    # every PDF has questions, spread over the document
    for pid, p in pdfs.items():
        pages = sorted(i.page for i in items if i.pdf == pid)
        assert len(pages) >= 5, pid
        assert pages[-1] >= 0.6 * p.pages or p.pages > 100, (pid, pages)


def test_every_available_item_verifies():
    """Evidence on the stated page of pypdf's text, answers inside evidence. Missing PDFs are skipped."""
    rep = verify_real_qa()
    assert rep.ok, rep.summary()
    if rep.checked == 0:
        pytest.skip("no real PDF available: " + rep.summary())
    assert rep.checked + len(rep.skipped) == len(load_real_qa())


def test_local_copies_cover_most_items():
    items = load_real_qa()
    pdfs = load_real_pdfs()
    local = [i for i in items if pdfs[i.pdf].local_copy]
    assert len(local) >= 0.75 * len(items)


def test_evidence_past_8k_tokens():
    """At least a third of the items have their evidence past ~8K tokens (32K characters)."""
    items = load_real_qa(available_only=True)
    if not items:
        pytest.skip("no real PDF available")
    offsets = [evalset.evidence_offset(i) for i in items]
    assert all(o is not None for o in offsets)
    assert sum(o >= 32_000 for o in offsets) >= len(items) / 3


def test_verify_catches_broken_items():
    items = load_real_qa(available_only=True)
    if not items:
        pytest.skip("no real PDF available")
    good = items[0]
    wrong_page = QAItem(**{**good.__dict__, "id": "bad-page", "page": good.page % 3 + 1 if good.page > 1 else 2})
    wrong_answer = QAItem(**{**good.__dict__, "id": "bad-answer", "answers": ["zzzz not there"]})
    wrong_case = QAItem(**{**good.__dict__, "id": "bad-case", "evidence": good.evidence.upper() + " XYZZY"})
    unknown = QAItem(**{**good.__dict__, "id": "bad-pdf", "pdf": "no-such-pdf"})
    rep = verify_real_qa([good, wrong_page, wrong_answer, wrong_case, unknown])
    bad = {i for i, _ in rep.errors}
    assert bad == {"bad-page", "bad-answer", "bad-case", "bad-pdf"}, rep.summary()


def test_whitespace_normalised_evidence_matches():
    items = load_real_qa(available_only=True)
    if not items:
        pytest.skip("no real PDF available")
    it = items[0]
    spaced = QAItem(**{**it.__dict__, "id": "spaced", "evidence": "  " + it.evidence.replace(" ", " \n\t ")})
    assert verify_real_qa([spaced]).ok


def test_missing_pdf_is_skipped_with_reason(tmp_path, monkeypatch):
    meta = json.loads(evalset.REAL_PDFS_JSON.read_text())
    for d in meta["pdfs"]:
        d["source_path"] = str(tmp_path / "nowhere.pdf")
        d["local_copy"] = None
    fake = tmp_path / "real_pdfs.json"
    fake.write_text(json.dumps(meta))
    real_loader = evalset.load_real_pdfs
    monkeypatch.setattr(evalset, "load_real_pdfs", lambda path=fake: real_loader(path))
    evalset._page_texts_cached.cache_clear()
    try:
        rep = verify_real_qa(load_real_qa())
        assert rep.ok and rep.checked == 0
        assert len(rep.skipped) == len(load_real_qa())
        assert "missing" in rep.skipped[0][1]
        assert load_real_qa(available_only=True) == []
    finally:
        evalset._page_texts_cached.cache_clear()


# --------------------------------------------------------------------------------------------------
# needle items


def test_haystack_is_deterministic_real_text():
    a = haystack_text(20_000, seed=1)
    assert len(a) == 20_000
    assert a == haystack_text(20_000, seed=1)
    assert a != haystack_text(20_000, seed=2)
    words = a.split()
    assert len(words) > 2_000
    assert sum(w.lower() in {"the", "of", "is", "a", "and", "to"} for w in words) > 200


def test_haystack_longer_than_one_pass():
    n = 600_000  # pydoc topics hold ~465K characters: needs a second pass
    t = haystack_text(n, seed=0)
    assert len(t) == n
    assert haystack_text(0) == ""


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_needle_item(depth, seed):
    hay = haystack_text(30_000, seed=seed)
    item = make_needle_item(hay, depth, seed=seed)
    assert item.needle in item.context
    assert item.context.index(item.needle) == item.char_offset
    assert item.answer in item.needle and item.answer not in hay
    assert item.question.endswith("?") or "Answer" in item.question
    assert abs(item.actual_depth - depth) < 0.03
    # the haystack is intact around the needle
    assert item.context.replace(item.needle, "", 1).split() == hay.split()
    # deterministic
    assert make_needle_item(hay, depth, seed=seed) == item


def test_needle_kinds_and_bad_depth():
    hay = haystack_text(5_000)
    kinds = {make_needle_item(hay, 0.5, seed=s).kind for s in range(6)}
    assert kinds == {"passkey", "magic_number", "kv"}
    for k in ("passkey", "magic_number", "kv"):
        it = make_needle_item(hay, 0.3, seed=7, kind=k)
        assert it.kind == k and it.answer in it.context
    with pytest.raises(ValueError):
        make_needle_item(hay, 1.5)
    with pytest.raises(ValueError):
        make_needle_item(hay, 0.5, kind="nope")


def test_needle_not_inside_word():
    hay = "word " * 2000
    it = make_needle_item(hay, 0.37, seed=3)
    before = it.context[: it.char_offset]
    assert before == "" or before[-1].isspace()


# --------------------------------------------------------------------------------------------------
# scoring


def test_normalise_answer():
    assert normalise_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalise_answer("an Apple") == "apple"
    assert normalise_answer("“VL Gothic”") == "vl gothic"


def test_exact_and_contains_and_f1():
    golds = ["3,141,622 bytes", "3,141,622"]
    assert exact_match("3,141,622.", golds) == 1.0
    assert exact_match("about 3,141,622 bytes", golds) == 0.0
    assert contains_match("The corpus totals 3,141,622 bytes.", golds) == 1.0
    assert contains_match("31416220", golds) == 0.0
    assert contains_match("VL Gothic is used", "VL Gothic") == 1.0
    assert contains_match("anything", [""]) == 0.0
    assert f1_score("VL Gothic", ["VL Gothic"]) == 1.0
    assert 0 < f1_score("the VL font", ["VL Gothic"]) < 1
    assert f1_score("nothing", ["VL Gothic"]) == 0.0
