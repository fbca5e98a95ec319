"""Transcript export: every answer with its cited passages and page numbers, in md, json and pdf."""

import io
import json

import pytest
from pypdf import PdfReader

from app.export import ExportError, export, to_markdown

TRANSCRIPT = {
    "id": 7,
    "title": "Fees and termination",
    "engine": "sharedllm",
    "created_at": "2026-11-22T07:00:00",
    "documents": [{"id": 3, "name": "contract.pdf"}],
    "messages": [
        {"role": "user", "text": "What is the annual fee?", "citations": [], "timings": {}},
        {
            "role": "assistant",
            "text": "The annual fee is 12,500 €.",
            "engine": "sharedllm",
            "citations": [
                {
                    "document": 3,
                    "name": "contract.pdf",
                    "page": 2,
                    "text": "The annual fee is 12,500 euros, payable in advance.",
                }
            ],
            "timings": {
                "retrieval_s": 0.01,
                "ttft_s": 0.2,
                "total_s": 1.5,
                "new_tokens": 9,
                "tokens_per_s": 7.0,
            },
        },
        {"role": "user", "text": "Notice period — Kündigungsfrist?", "citations": [], "timings": {}},
        {
            "role": "assistant",
            "text": "Ninety days.",
            "engine": "rag",
            "citations": [
                {"document": 3, "name": "contract.pdf", "page": 3, "text": "ninety days written notice"}
            ],
            "timings": {},
        },
    ],
}


def test_markdown_has_questions_answers_passages_and_pages():
    md = to_markdown(TRANSCRIPT)
    assert md.startswith("# Fees and termination")
    for needle in (
        "## Question",
        "What is the annual fee?",
        "The annual fee is 12,500 €.",
        "*contract.pdf, p. 2*",
        "payable in advance",
        "*contract.pdf, p. 3*",
        "first token 0.20 s",
    ):
        assert needle in md


def test_json_round_trips():
    assert json.loads(export(TRANSCRIPT, "json")) == TRANSCRIPT


def test_pdf_is_valid_and_unicode_text_survives():
    data = export(TRANSCRIPT, "pdf")
    assert data.startswith(b"%PDF")
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)
    for needle in (
        "What is the annual fee?",
        "contract.pdf, p. 2",
        "payable in advance",
        "€",
        "Kündigungsfrist",
    ):
        assert needle in text, needle


def test_unknown_format():
    with pytest.raises(ExportError, match="unknown export format"):
        export(TRANSCRIPT, "docx")


def test_markdown_sources_are_blockquotes():
    """Issue 14, defect 9: `*name, p. 2*: > passage` on one line rendered no blockquote."""
    import re

    md = to_markdown(TRANSCRIPT)
    quotes = re.findall(r"^ {0,3}> (.+)$", md, flags=re.M)
    assert quotes == ["The annual fee is 12,500 euros, payable in advance.", "ninety days written notice"]
    assert ": >" not in md


def test_pdf_keeps_cjk_text():
    """Issue 14, defect 9: "Vertrag_ü_日本語" came out as "Vertrag_ü_"."""
    from pathlib import Path

    if not Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf").exists():
        pytest.fail("no CJK font: `make test` installs fonts-droid-fallback (as root)")
    transcript = dict(TRANSCRIPT, title="Vertrag_ü_日本語", documents=[{"id": 3, "name": "契約書.pdf"}])
    text = " ".join(p.extract_text() for p in PdfReader(io.BytesIO(export(transcript, "pdf"))).pages)
    assert "Vertrag_ü_日本語" in text and "契約書.pdf" in text
