"""Transcript export: Markdown, JSON and PDF.

Input is a transcript as returned by `app.services.conversations.ConversationService.transcript`
(already filtered by owner): a dict with id, title, engine, created_at, documents [{id, name}], and
messages [{role, text, engine, created_at, citations [{document, name, page, text}], timings {...},
notes {...}}]. Every answer is written with its cited passages and their page numbers, and with what
its engine said of it (a weights warning, a truncated document).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("md", "json", "pdf")
MEDIA_TYPES = {"md": "text/markdown", "json": "application/json", "pdf": "application/pdf"}


class ExportError(ValueError):
    """Unknown format or malformed transcript."""


def export(transcript: dict[str, Any], fmt: str) -> bytes:
    """Render the transcript in one of FORMATS."""
    if fmt == "md":
        return to_markdown(transcript).encode("utf-8")
    if fmt == "json":
        return to_json(transcript).encode("utf-8")
    if fmt == "pdf":
        return to_pdf(transcript)
    raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


def default_filename(transcript: dict[str, Any], fmt: str) -> str:
    """Named after the conversation's title and day, not its id (ids count every user's conversations)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(transcript.get("title") or "")).strip("-")[:60] or "conversation"
    day = str(transcript.get("created_at") or "")[:10]
    return f"{slug}-{day}.{fmt}" if re.fullmatch(r"\d{4}-\d{2}-\d{2}", day) else f"{slug}.{fmt}"


def to_json(transcript: dict[str, Any]) -> str:
    return json.dumps(transcript, indent=2, ensure_ascii=False, default=str)


def citation_label(citation: dict[str, Any]) -> str:
    name = citation.get("name") or f"document {citation.get('document')}"
    return f"{name}, p. {citation.get('page')}"


def note_lines(notes: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, text) of the notes an engine attached to an answer; shared by the UI and exports."""
    notes = notes or {}
    out = []
    if notes.get("warning"):
        out.append(("Warning", str(notes["warning"])))
    if notes.get("truncated"):
        out.append(("Note", "the document did not fit the model's window; its middle was left out."))
    return out


def _timing_line(timings: dict[str, Any] | None) -> str:
    if not timings:
        return ""
    parts = []
    if timings.get("retrieval_s") is not None:
        parts.append(f"retrieval {timings['retrieval_s']:.2f} s")
    if timings.get("ttft_s") is not None:
        parts.append(f"first token {timings['ttft_s']:.2f} s")
    if timings.get("total_s") is not None:
        parts.append(f"total {timings['total_s']:.2f} s")
    if timings.get("tokens_per_s") is not None:
        parts.append(f"{timings['tokens_per_s']:.1f} tokens/s")
    return ", ".join(parts)


def _header_lines(transcript: dict[str, Any]) -> list[str]:
    docs = ", ".join(d["name"] for d in transcript.get("documents", [])) or "(none)"
    return [
        f"Conversation {transcript['id']}, created {transcript.get('created_at', '')}",
        f"Documents: {docs}",
        f"Engine: {transcript.get('engine', '')}",
    ]


def to_markdown(transcript: dict[str, Any]) -> str:
    lines = [f"# {transcript.get('title') or 'Conversation'}", ""]
    lines += [f"- {line}" for line in _header_lines(transcript)]
    for message in transcript.get("messages", []):
        lines.append("")
        if message["role"] == "user":
            lines += ["## Question", "", message["text"]]
            continue
        if message["role"] != "assistant":
            continue
        lines += ["### Answer", "", message["text"]]
        for label, note in note_lines(message.get("notes")):
            lines += ["", f"**{label}:** {note}"]
        citations = message.get("citations") or []
        if citations:
            lines += ["", "**Sources**", ""]
            for i, citation in enumerate(citations, 1):
                quote = " ".join(str(citation.get("text", "")).split())
                # the quote on its own line, indented under its list item: a blockquote, not "> " text
                lines += [f"{i}. *{citation_label(citation)}*", "", f"   > {quote}", ""]
        timing = _timing_line(message.get("timings"))
        if timing:
            lines += ["", f"_{message.get('engine', '')}: {timing}_"]
    return "\n".join(lines) + "\n"


# Fonts with CJK glyphs, used where DejaVu has none (Debian: fonts-droid-fallback, fonts-noto-cjk).
CJK_FONTS = (
    Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"),
    Path("/usr/share/fonts-droid-fallback/truetype/DroidSansFallback.ttf"),
)


def _cjk_font_path() -> Path | None:
    return next((p for p in CJK_FONTS if p.exists()), None)


def _font_path() -> Path | None:
    """DejaVu Sans ships with matplotlib (a dependency): Unicode text without system fonts."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is a declared dependency
        return None
    path = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    return path if path.exists() else None


def to_pdf(transcript: dict[str, Any]) -> bytes:
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.set_title(str(transcript.get("title") or "Conversation"))
    font = _font_path()
    if font is not None:
        pdf.add_font("DejaVu", "", str(font))
        pdf.add_font("DejaVu", "B", str(font.with_name("DejaVuSans-Bold.ttf")))
        pdf.add_font("DejaVu", "I", str(font.with_name("DejaVuSans-Oblique.ttf")))
        family = "DejaVu"
        cjk = _cjk_font_path()
        if cjk is not None:  # glyphs DejaVu lacks (Chinese, Japanese, Korean) come from this one
            pdf.add_font("CJK", "", str(cjk))
            pdf.set_fallback_fonts(["CJK"], exact_match=False)
        else:
            logger.warning("no CJK font installed (apt-get install fonts-droid-fallback): CJK text is dropped from PDF exports")
    else:
        logger.warning("DejaVu font not found; PDF export falls back to Latin-1 Helvetica")
        family = "Helvetica"

    def text(value: str) -> str:
        return value if family == "DejaVu" else value.encode("latin-1", "replace").decode("latin-1")

    def para(value: str, size: float, style: str = "", indent: float = 0.0) -> None:
        pdf.set_font(family, style, size)
        pdf.set_x(pdf.l_margin + indent)
        pdf.multi_cell(0, size * 0.5, text(value), new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    pdf.add_page()
    para(str(transcript.get("title") or "Conversation"), 16, "B")
    for line in _header_lines(transcript):
        para(line, 9)
    for message in transcript.get("messages", []):
        pdf.ln(3)
        if message["role"] == "user":
            para("Question", 12, "B")
            para(message["text"], 11)
        elif message["role"] == "assistant":
            para("Answer", 12, "B")
            para(message["text"], 11)
            for label, note in note_lines(message.get("notes")):
                para(f"{label}: {note}", 9, "B", indent=4)
            for i, citation in enumerate(message.get("citations") or [], 1):
                para(f"[{i}] {citation_label(citation)}", 9, "B", indent=4)
                para(" ".join(str(citation.get("text", "")).split()), 9, "I", indent=8)
            timing = _timing_line(message.get("timings"))
            if timing:
                para(f"{message.get('engine', '')}: {timing}", 8, "I")
    return bytes(pdf.output())
