"""Pure functions that turn service results into what the UI components show (no Gradio here)."""

from __future__ import annotations

import html
from typing import Any

from app.export import note_lines

STATUS_LABELS = {
    "queued": "queued",
    "pending": "waiting",
    "extracting": "reading text",
    "encoding": "encoding",
    "ready": "ready",
    "needs_password": "needs password",
    "no_text_layer": "no text layer",
    "failed": "failed",
    "rejected": "rejected",
}
DONE_OK = {"ready"}
DONE_BAD = {"needs_password", "no_text_layer", "failed", "rejected"}
LIBRARY_HEADERS = ["id", "name", "status", "pages", "tokens", "note"]


def library_rows(docs: list[dict[str, Any]]) -> list[list[Any]]:
    return [[d["id"], d["name"], d["status"], d["pages"], d["tokens"], d.get("error") or ""] for d in docs]


def document_choices(docs: list[dict[str, Any]], ready_only: bool) -> list[tuple[str, int]]:
    out = []
    for d in docs:
        if ready_only and d["status"] != "ready":
            continue
        label = d["name"] if d["status"] == "ready" else f"{d['name']} ({d['status']})"
        out.append((f"{label} · #{d['id']}", d["id"]))
    return out


def conversation_choices(convs: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(f"{c['title'] or 'Untitled'} · #{c['id']}", c["id"]) for c in convs]


def progress_html(files: list[dict[str, Any]]) -> str:
    """One row per uploaded file: name, a progress bar, the status and any error."""
    if not files:
        return "<div class='upload-progress'><em>No uploads yet.</em></div>"
    rows = []
    for f in files:
        status = f["status"]
        fraction = 1.0 if status in DONE_OK | DONE_BAD else float(f.get("fraction", 0.0))
        css = "ok" if status in DONE_OK else "bad" if status in DONE_BAD else "busy"
        note = html.escape(f.get("error") or "")
        rows.append(
            f"<tr class='upload-file {css}' data-status='{html.escape(status)}'>"
            f"<td class='file-name'>{html.escape(f['name'])}</td>"
            f"<td><progress max='100' value='{round(100 * fraction)}'></progress></td>"
            f"<td class='file-status'>{html.escape(STATUS_LABELS.get(status, status))}</td>"
            f"<td class='file-note'>{note}</td></tr>"
        )
    return (
        "<table class='upload-progress'><thead><tr><th>File</th><th>Progress</th><th>Status</th>"
        "<th>Details</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def sources_markdown(citations: list[dict[str, Any]]) -> str:
    if not citations:
        return ""
    lines = ["", "", "**Sources**"]
    for i, c in enumerate(citations, 1):
        quote = " ".join(str(c.get("text", "")).split())
        if len(quote) > 300:
            quote = quote[:299] + "…"
        lines.append(f"{i}. *{c.get('name', c.get('document'))}, p. {c['page']}*: “{quote}”")
    return "\n".join(lines)


def timing_markdown(engine: str, timings: dict[str, Any]) -> str:
    if not timings:
        return ""
    return (
        f"{engine} · retrieval {timings.get('retrieval_s', 0):.2f} s · first token "
        f"{timings.get('ttft_s', 0):.2f} s · total {timings.get('total_s', 0):.2f} s · "
        f"{timings.get('new_tokens', 0)} tokens at {timings.get('tokens_per_s', 0):.1f}/s"
    )


def assistant_content(text: str, citations: list[dict[str, Any]]) -> str:
    return (text or "(empty answer)") + sources_markdown(citations)


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Stored conversation messages -> Chatbot messages, each answer followed by its sources."""
    out = []
    for m in messages:
        if m["role"] == "user":
            out.append({"role": "user", "content": m["text"]})
        elif m["role"] == "assistant":
            notes = notes_markdown(m.get("notes") or {}).strip()
            text = m["text"] + (f"\n\n{notes}" if notes else "")  # the warning stays under its answer
            out.append({"role": "assistant", "content": assistant_content(text, m.get("citations") or [])})
    return out


def citation_choices(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Distinct cited pages of a conversation, newest answer first: value 'document_id:page'."""
    seen, out = set(), []
    for m in reversed(messages):
        for c in m.get("citations") or []:
            key = f"{c['document']}:{c['page']}"
            if key not in seen:
                seen.add(key)
                out.append((f"{c.get('name', c['document'])}, p. {c['page']}", key))
    return out


def parse_citation_key(key: str) -> tuple[int, int]:
    doc, _, page = str(key).partition(":")
    return int(doc), int(page)


def notes_markdown(notes: dict[str, Any]) -> str:
    """Warnings an engine attached to an answer (untrained weights, truncated document)."""
    lines = [f"**{label}:** {text}" for label, text in note_lines(notes)]
    return "\n\n".join(lines) + ("\n\n" if lines else "")


def default_engine_markdown(engine: str) -> str:
    """Why new questions use the engine they use (shown under the engine choice)."""
    from app.config import DEFAULT_ENGINE, DEFAULT_ENGINE_REASON

    if engine != DEFAULT_ENGINE:
        return f"Default engine: **{html.escape(engine)}**, set by this server's configuration (SHAREDLLM_ENGINE)."
    return f"Default engine: **{DEFAULT_ENGINE}**: {html.escape(DEFAULT_ENGINE_REASON, quote=False)}."


def export_link_html(url: str) -> str:
    """The download link of an export (app/ui/access.py serves it to its owner only)."""
    name = url.rsplit("/", 1)[-1]
    href = url.lstrip("/")  # relative to the page, so the app also works under a proxy's path prefix
    return (f"<a class='export-link' href=\"{html.escape(href)}\" download=\"{html.escape(name)}\">"
            f"Download {html.escape(name)}</a>")


def queued_markdown(questions: list[str]) -> str:
    """The questions waiting for the answer in progress (they are answered in this order)."""
    if not questions:
        return ""
    items = "\n".join(f"{i}. {html.escape(' '.join(q.split())[:200])}" for i, q in enumerate(questions, 1))
    return f"**Queued, answered next:**\n\n{items}"
