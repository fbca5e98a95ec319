"""Extraction statuses for hostile and unusual files, text normalisation, and bounded resources."""

from __future__ import annotations

import time

import pytest
from pdf_factory import (
    make_corrupt_pdf,
    make_deflate_bomb_pdf,
    make_encrypted_pdf,
    make_image_pdf,
    make_text_pdf,
)
from sqlalchemy import func, select

from app.extraction import ExtractionLimits, extract_pdf
from app.pdf_text import clean_whitespace, join_hyphenated, normalise_pages, strip_running_margins
from storage import Chunk, ContextTreeRecord, Page
from storage.db import integrity_check


@pytest.fixture(scope="module")
def text_pdf(tmp_path_factory):
    return make_text_pdf(tmp_path_factory.mktemp("pdf") / "text.pdf", n_pages=3)


def _bad_file(kind, text_pdf, tmp_path):
    if kind == "encrypted":
        return make_encrypted_pdf(text_pdf, tmp_path / "locked.pdf", user_password="s3cret")
    if kind == "image_only":
        return make_image_pdf(tmp_path / "scan.pdf")
    if kind == "corrupt":
        return make_corrupt_pdf(text_pdf, tmp_path / "corrupt.pdf")
    if kind == "zero_byte":
        (tmp_path / "empty.pdf").write_bytes(b"")
        return tmp_path / "empty.pdf"
    if kind == "not_pdf":
        (tmp_path / "photo.pdf").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
        return tmp_path / "photo.pdf"
    raise AssertionError(kind)


EXPECTED = {
    "encrypted": ("needs_password", "password"),
    "image_only": ("no_text_layer", "no text layer"),
    "corrupt": ("failed", "corrupt PDF"),
    "zero_byte": ("failed", "empty file"),
    "not_pdf": ("failed", "not a PDF"),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_files_get_the_right_status_and_leave_nothing_behind(kind, text_pdf, tmp_path, service, sessions,
                                                                 users, data_dir, engine):
    path = _bad_file(kind, text_pdf, tmp_path)
    started = time.monotonic()
    doc = service.ingest(users[0], path)
    status, reason = EXPECTED[kind]
    assert doc.status == status and reason in doc.error
    assert time.monotonic() - started < 30
    with sessions() as s:
        for table in (Page, Chunk, ContextTreeRecord):
            assert s.scalar(select(func.count()).select_from(table)) == 0
    leftovers = [p for p in data_dir.rglob("*") if p.is_file() and not p.name.startswith("sharedllm.db")]
    assert leftovers == []
    assert integrity_check(engine) == "ok"
    # The same bytes again give the same verdict, without a second row.
    assert service.ingest(users[0], path).id == doc.id


def test_encrypted_with_empty_user_password_opens(text_pdf, tmp_path):
    for algorithm in ("AES-256", "RC4-128"):
        locked = make_encrypted_pdf(text_pdf, tmp_path / f"owner-only-{algorithm}.pdf", "", algorithm)
        result = extract_pdf(locked)
        assert result.status == "ok" and "Clause 2 applies to amount 2037" in result.pages[1], algorithm


def test_timeout_kills_the_child(text_pdf):
    started = time.monotonic()
    result = extract_pdf(text_pdf, ExtractionLimits(timeout_s=0.05))
    assert result.status == "failed" and result.reason.startswith("timeout")
    assert time.monotonic() - started < 5


def test_memory_limit_reports_out_of_memory(text_pdf):
    result = extract_pdf(text_pdf, ExtractionLimits(memory_bytes=40 * 1024**2))
    assert result.status == "failed" and "out of memory" in result.reason


def test_deflate_bomb_says_what_happened(tmp_path):
    """Issue 14, defect 10: a 1 GB deflate bomb was reported as "corrupt PDF: no page could be read"."""
    bomb = make_deflate_bomb_pdf(tmp_path / "bomb.pdf", 1 << 30)
    assert bomb.stat().st_size < 5 * 2**20
    result = extract_pdf(bomb, ExtractionLimits(timeout_s=120))
    assert result.status == "failed"
    assert "decompress" in result.reason and "limit" in result.reason and "corrupt" not in result.reason


def test_too_large_file_and_too_many_pages(text_pdf):
    assert extract_pdf(text_pdf, ExtractionLimits(max_file_bytes=100)).reason.startswith("too large")
    assert "too large: 3 pages" in extract_pdf(text_pdf, ExtractionLimits(max_pages=2)).reason


def test_thousand_page_pdf_bounded_time_and_memory(tmp_path, service, users, sessions):
    pdf = make_text_pdf(tmp_path / "big.pdf", n_pages=1000)
    seen = []
    started = time.monotonic()
    result = extract_pdf(pdf, progress=lambda stage, done, total: seen.append(done))
    elapsed = time.monotonic() - started
    assert result.status == "ok" and result.n_pages == 1000 and len(result.pages) == 1000
    assert seen[-1] == 1000 and len(seen) == 1000
    assert elapsed < 60, elapsed
    assert result.peak_rss_bytes < 400 * 1024**2, result.peak_rss_bytes
    assert "1000.1 Clause 1000 applies to amount 1000037." in result.pages[999]
    assert all("Page " not in p and "ACME" not in p for p in result.pages)


def test_normalisation_keeps_numbers_and_clause_numbering():
    assert join_hyphenated("the agree-\nment of 10-\n20 days, Section 4-\nA") == \
        "the agreement of 10-\n20 days, Section 4-\nA"
    assert clean_whitespace("a\u00a0 b\t c\r\n\n\n\nd \ufb01le \u00ad") == "a b c\n\nd file"
    # "1." at the top of every page is content (a list restarting), not a header.
    assert normalise_pages(["1.\nfoo\nbar", "1.\nbaz\nqux", "1.\nquux\nx"]) == \
        ["1.\nfoo\nbar", "1.\nbaz\nqux", "1.\nquux\nx"]
    # "Section n" on page n is a heading; "- n -" counting with the pages is a page number.
    pages = [f"Section {i}\nbody {i * 11}\n- {i} -" for i in range(1, 6)]
    assert strip_running_margins(pages) == [f"Section {i}\nbody {i * 11}" for i in range(1, 6)]
    pages = [f"Report 2024 - confidential\n\n{i}.2 Term text\n\nPage {i} of 5" for i in range(1, 6)]
    assert strip_running_margins(pages) == [f"{i}.2 Term text" for i in range(1, 6)]
