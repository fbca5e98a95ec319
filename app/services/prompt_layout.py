"""The text around the documents in the prompt engines' prompts, and the token streams built from it.

`with_documents_first` is the chat layout of `full`, `actqkv` and `homer` (documents in the first user
message, the question after them); `around_documents` cuts its rendered template where the documents
go, so `actqkv` and `homer` can encode a document's stream once, before any question
(`document_stream`, `homer_stream`), and recognise a stored stream without tokenizing
(`stream_digest`, `actqkv_layout`). Kept apart from the engines (app/services/engines.py) because the
stored states (app/services/document_states.py) depend on exactly this text.
"""

from __future__ import annotations

import hashlib
from typing import Any

from app.services.documents import DocumentContext

SYSTEM_PROMPT = (
    "You are a careful assistant answering questions about the user's documents. "
    "Answer briefly and only from the documents; if they do not contain the answer, say so."
)


def with_documents_first(context: str, question: str, history: list[dict[str, str]]) -> list[dict[str, str]]:
    """The prompt layout of the prompt engines: system prompt, then the documents at the start of the
    first user message, the question after them, earlier turns as ordinary chat turns.

    Measured (docs/benchmarks.md, "Prompt layout"): the document inside the user message reads better
    than the document before the chat template. Keeping the documents in the *first* user message
    makes the prompt's prefix the same every turn, so `full` persists its K/V once per document."""
    turns = history or []
    if turns and turns[0]["role"] == "user":
        first = {"role": "user", "content": f"{context}\n\nQuestion: {turns[0]['content']}"}
        return [{"role": "system", "content": SYSTEM_PROMPT}, first, *turns[1:],
                {"role": "user", "content": f"Question: {question}"}]
    return [{"role": "system", "content": SYSTEM_PROMPT}, *turns,
            {"role": "user", "content": f"{context}\n\nQuestion: {question}"}]


# bump when the text around the documents in `actqkv`'s stream changes (it is part of the stored state)
ACTQKV_LAYOUT_VERSION = 1
_DOCUMENTS_MARK = "\x00documents\x00"


def around_documents(lm: Any, question: str, history: list[dict[str, str]]) -> tuple[str, str]:
    """The chat-templated prompt of `with_documents_first`, cut where the documents go: the header
    before them (system prompt, first user turn's start) and the rest (question, earlier turns)."""
    messages = with_documents_first(_DOCUMENTS_MARK, question, history)
    text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    head, tail = text.split(_DOCUMENTS_MARK)
    return head, tail


def actqkv_layout(lm: Any) -> str:
    """What the stored stream's text around the document depends on (part of its fingerprint)."""
    head, _ = around_documents(lm, "?", [])
    return f"v{ACTQKV_LAYOUT_VERSION}:{hashlib.sha256(head.encode()).hexdigest()[:16]}"


def document_stream(lm: Any, doc: DocumentContext) -> tuple[list[int], int]:
    """The token stream `actqkv` encodes for one document, and where the document's tokens start:
    the prompt's header, a "Document: name" line, then the document tokenized page by page exactly as
    ingestion did (so stream positions map to pages)."""
    from app.ingestion import tokenize_pages

    head, _ = around_documents(lm, "?", [])
    head_ids = lm.tokenize(head + f"Document: {doc.name}\n")
    ids = doc.token_ids if doc.token_ids is not None else tokenize_pages(lm.tokenizer, [p.text for p in doc.pages]).token_ids
    return head_ids + list(ids), len(head_ids)


def homer_stream(lm: Any, doc: DocumentContext) -> tuple[list[int], list[int], int]:
    """What `homer` encodes for one document: the prompt's header (the prefix of every chunk), the
    context stream ("Document: name" line, then the document's tokens as ingestion made them), and
    where in that stream the document's tokens start."""
    from app.ingestion import tokenize_pages

    head, _ = around_documents(lm, "?", [])
    name_ids = lm.tokenize(f"Document: {doc.name}\n")
    ids = doc.token_ids if doc.token_ids is not None else tokenize_pages(lm.tokenizer, [p.text for p in doc.pages]).token_ids
    return lm.tokenize(head), name_ids + list(ids), len(name_ids)


def stream_digest(lm: Any, doc: DocumentContext) -> str:
    """What `document_stream` depends on, hashed without tokenizing (checked before a stored state is
    used: hashing the page texts costs milliseconds, tokenizing a 128K-token document seconds)."""
    head, _ = around_documents(lm, "?", [])
    digest = hashlib.sha256(f"{head}\x00{doc.name}\x00".encode())
    for page in doc.pages:
        digest.update(f"{page.token_start}:{page.token_end}:".encode())
        digest.update(page.text.encode())
        digest.update(b"\x00")
    return digest.hexdigest()
