"""Answering engines behind one interface (DESIGN section 5).

An engine turns (question, documents, earlier turns) into the model's input: chat messages and,
for `sharedllm`, a cross-attention memory. After generation it turns what the model reports into
page citations. The QA service does the rest (ownership, persistence, timings), identically for all
engines, so they are compared on the same work.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.services.documents import DocumentContext
from app.services.lexical import QUOTE_CHARS, best_passages, lexical_blocks, lexical_windows
from app.services.prompt_layout import (
    SYSTEM_PROMPT,
    around_documents,
    document_stream,
    homer_stream,
    with_documents_first,
)
from model.homer import LEXICAL_BLOCK
from model.prompts import SHAREDLLM_SYSTEM_PROMPT

logger = logging.getLogger(__name__)

PASSAGE_CHARS = 600
HISTORY_BUDGET_TURNS = 6  # earlier turns the prompt leaves room for (3 question/answer pairs)


@dataclass
class Prepared:
    messages: list[dict[str, str]]
    memory: Any | None
    retrieval_s: float
    used: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (doc index, chunk) in the prompt
    notes: dict[str, Any] = field(default_factory=dict)
    # the text the first user message starts with whose K/V may be persisted and reused (`full`'s
    # documents): the prompt is tokenized in two pieces cut after it (LoadedModel.prompt_ids)
    cache_prefix: str | None = None
    question: str = ""  # what was asked (citation search of engines without attention attribution)
    # engines that assemble the prompt's token ids themselves (`actqkv`: the documents' final window
    # then the question) give them here, with the persisted K/V of their first `prefix.length` tokens
    prompt_ids: list[int] | None = None
    prefix: Any | None = None


class Engine(Protocol):
    """An answering engine. A new one is a class with these members, added to `ENGINES` below: the
    settings, the CLI, the UI and the benchmarks all take the list from there. Optional members:
    `state_kind` (a per-document state the QA service builds first: app/services/document_states.py)
    and `waiting` (what the chat says until the first token, when not "Thinking…")."""

    name: str
    summary: str  # one line for the Settings tab
    needs_tree: bool

    def prepare(
        self, lm: Any, question: str, docs: list[DocumentContext], history: list[dict[str, str]],
        progress: Callable[[int, int], None] | None = None,
    ) -> Prepared: ...  # progress(done, total): work before the first token that takes long (homer's merges)

    def citations(
        self, lm: Any, docs: list[DocumentContext], prepared: Prepared, result: Any, k: int
    ) -> list[dict[str, Any]]: ...


def citation(doc: DocumentContext, page: int, text: str) -> dict[str, Any]:
    text = " ".join(text.split())
    if len(text) > PASSAGE_CHARS:
        text = text[: PASSAGE_CHARS - 1] + "…"
    return {"document": doc.id, "name": doc.name, "page": page, "text": text}


MIN_PASSAGE_TOKENS = 64


def _passage(lm: Any, doc: DocumentContext, token_start: int, token_end: int) -> str:
    """The document text around a token range, widened to at least MIN_PASSAGE_TOKENS within its page
    and trimmed to whole words: decoded from the stored token ids when available."""
    page = doc.page_of(token_start, token_end)
    if doc.token_ids is None:
        return page.text if page else ""
    lo, hi = (page.token_start, page.token_end) if page else (0, len(doc.token_ids))
    missing = MIN_PASSAGE_TOKENS - (token_end - token_start)
    if missing > 0:
        token_start = max(lo, token_start - missing // 2)
        token_end = min(hi, token_start + MIN_PASSAGE_TOKENS)
        token_start = max(lo, min(token_start, token_end - MIN_PASSAGE_TOKENS))
    text = lm.tokenizer.decode(doc.token_ids[token_start:token_end], skip_special_tokens=True)
    if token_start > lo and " " in text:  # do not start mid-word
        text = text[text.index(" ") + 1 :]
    if token_end < hi and " " in text:
        text = text[: text.rindex(" ")]
    return text.strip()


class SharedLLMEngine:
    """The method: query-aware tree retrieval + cross-attention; citations from attention mass."""

    name = "sharedllm"
    summary = "the method (tree retrieval + cross-attention)"
    needs_tree = True

    def prepare(self, lm, question, docs, history, progress=None):
        t0 = time.perf_counter()
        memory = lm.build_memory([d.tree for d in docs], question=question)
        retrieval_s = time.perf_counter() - t0
        # the words the cross-attention was trained with (model/prompts.py), not the prompt-engines' ones
        messages = [
            {"role": "system", "content": SHAREDLLM_SYSTEM_PROMPT},
            *history,
            {"role": "user", "content": question},
        ]
        return Prepared(messages, memory, retrieval_s)

    def citations(self, lm, docs, prepared, result, k):
        return attention_citations(lm, docs, result, k)


def attention_citations(lm: Any, docs: list[DocumentContext], result: Any, k: int) -> list[dict[str, Any]]:
    """Pages ranked by the attention mass the answer put on their memory positions, each with the
    passage around its most attended span (`sharedllm`: cross-attention; `actqkv`: retrieved blocks
    and the local window)."""
    mass: dict[tuple[int, int], float] = defaultdict(float)
    best_span: dict[tuple[int, int], tuple[float, int, int]] = {}
    for att in result.attribution or []:
        doc = docs[att.doc_index]
        page = doc.page_of(att.token_start, att.token_end)
        if page is None:
            continue
        key = (att.doc_index, page.number)
        mass[key] += att.mass
        if key not in best_span or att.mass > best_span[key][0]:
            best_span[key] = (att.mass, att.token_start, att.token_end)
    ranked = sorted(mass, key=mass.get, reverse=True)[:k]
    out = []
    for doc_index, page in ranked:
        _, start, end = best_span[(doc_index, page)]
        doc = docs[doc_index]
        out.append(citation(doc, page, _passage(lm, doc, start, end)))
    return out


def _window(lm: Any) -> int:
    """The base model's context window in tokens."""
    return int(lm.model.base.config.max_position)


class FullContextEngine:
    """Baseline: the document text in the prompt, head and tail kept when it does not fit; its
    document prefix is persisted once and reused by follow-up questions (app/services/prompt_cache.py)."""

    name = "full"
    summary = "document in the prompt"
    needs_tree = False

    def prepare(self, lm, question, docs, history, progress=None):
        t0 = time.perf_counter()
        budget = max(256, _window(lm) - 512 - 64 * HISTORY_BUDGET_TURNS)  # room for the answer and the chat
        per_doc = budget // max(1, len(docs))
        parts, truncated = [], False
        for doc in docs:
            ids = doc.token_ids if doc.token_ids is not None else lm.tokenize(doc.text)
            if len(ids) > per_doc:
                truncated = True
                head, tail = ids[: per_doc // 2], ids[-(per_doc - per_doc // 2) :]
                text = lm.tokenizer.decode(head) + "\n[...]\n" + lm.tokenizer.decode(tail)
            else:
                text = doc.text
            parts.append(f"Document: {doc.name}\n{text}")
        context = "\n\n".join(parts)
        messages = with_documents_first(context, question, history)
        return Prepared(messages, None, time.perf_counter() - t0, notes={"truncated": truncated},
                        cache_prefix=context, question=question)

    def citations(self, lm, docs, prepared, result, k):
        """No attention attribution without a memory: the passages that best match the answer (and the
        question, which short answers like a number need to be located), by BM25 over page windows."""
        if not result.text.strip():
            return []
        return [citation(doc, page, text) for doc, page, text in
                best_passages(docs, f"{result.text} {prepared.question}", k)]


class RagEngine:
    """Baseline: BM25 over stored chunk texts, top-k chunks in the prompt; cites the chunks' pages."""

    name = "rag"
    summary = "BM25 chunks in the prompt"
    needs_tree = False
    top_k = 4

    def prepare(self, lm, question, docs, history, progress=None):
        import bm25s

        t0 = time.perf_counter()
        corpus = [(i, c) for i, d in enumerate(docs) for c in d.chunks if c["text"].strip()]
        used: list[tuple[int, dict[str, Any]]] = []
        if corpus:
            retriever = bm25s.BM25()
            retriever.index(
                bm25s.tokenize([c["text"] for _, c in corpus], show_progress=False), show_progress=False
            )
            k = min(self.top_k, len(corpus))
            results, _ = retriever.retrieve(
                bm25s.tokenize([question], show_progress=False), k=k, show_progress=False
            )
            used = [corpus[int(j)] for j in results[0]]  # best first (citations keep this order)
        in_order = sorted(used, key=lambda u: (u[0], u[1]["index"]))  # the prompt reads in document order
        context = "\n\n".join(f"[{docs[i].name}, page {c['page_start']}]\n{c['text']}" for i, c in in_order)
        messages = [  # retrieved per question, so nothing to cache: passages right before the question
            {"role": "system", "content": SYSTEM_PROMPT},
            *history,
            {"role": "user", "content": f"{context}\n\nQuestion: {question}"},
        ]
        return Prepared(messages, None, time.perf_counter() - t0, used=used, question=question)

    def citations(self, lm, docs, prepared, result, k):
        """The sentences of the retrieved chunks' pages that best match the answer and the question,
        with the page they are on (a 512-token chunk spans pages: its first page and first characters
        are often not where the answer is); by the question alone when the answer matches nothing."""
        pages = {(docs[i].id, n) for i, c in prepared.used for n in range(c["page_start"], c["page_end"] + 1)}
        for query in (f"{result.text} {prepared.question}", prepared.question):
            if query.strip() and pages:
                found = best_passages(docs, query, k, pages)
                if found:
                    return [citation(doc, page, text) for doc, page, text in found]
        return [citation(docs[i], c["page_start"], c["text"][:QUOTE_CHARS]) for i, c in prepared.used[:k]]


class ActQKVEngine:
    """Training-free: the whole documents, read from persisted block K/V by block retrieval in every
    layer (ActQKV / InfLLM, model/actqkv.py); citations from the attention mass on their blocks."""

    name = "actqkv"
    summary = "whole documents read from persisted block K/V (training-free)"
    needs_tree = False
    state_kind = "actqkv"  # the QA service loads or builds each document's state first

    def prepare(self, lm, question, docs, history, progress=None):
        t0 = time.perf_counter()
        states = [doc.extra.get("actqkv") or lm.encode_blocks(*document_stream(lm, doc)) for doc in docs]
        memory = lm.block_memory(states, lexical_blocks(lm, states, question, states[0].config.lexical_blocks))
        _, tail = around_documents(lm, question, history)
        prompt_ids = memory.local_ids() + lm.tokenize(tail)
        messages = with_documents_first(f"[{len(docs)} document(s) in block memory]", question, history)
        return Prepared(messages, memory, time.perf_counter() - t0, question=question, prompt_ids=prompt_ids,
                        prefix=memory.local_prefix())

    def citations(self, lm, docs, prepared, result, k):
        return attention_citations(lm, docs, result, k)


class HomerEngine:
    """Training-free: the whole documents merged per question into one cache of about a chunk's
    length (HOMER, model/homer.py), from their persisted leaves; citations from the attention mass
    on the context tokens the merge kept."""

    name = "homer"
    summary = "whole documents merged per question into one cache (HOMER, training-free)"
    needs_tree = False
    state_kind = "homer"
    # what the chat says until the first token: past the window the merge takes minutes on a CPU
    waiting = "Merging the documents for this question (HOMER; minutes past the model's window on a CPU)…"

    def prepare(self, lm, question, docs, history, progress=None):
        t0 = time.perf_counter()
        states = [doc.extra.get("homer") or lm.encode_homer(*homer_stream(lm, doc)) for doc in docs]
        _, tail = around_documents(lm, question, history)
        kept = lexical_windows(lm, [st.token_ids for st in states], LEXICAL_BLOCK, question,
                               lm.homer_config().lexical_blocks)
        result, memory = lm.homer_prefix(states, lm.tokenize(tail), progress, kept)
        messages = with_documents_first(f"[{len(docs)} document(s) merged by HOMER]", question, history)
        notes = {"homer_input_tokens": result.input_tokens, "homer_cache_tokens": result.prefix.length + 1}
        if result.leaves_computed:
            notes["homer_leaves_computed"] = result.leaves_computed
        return Prepared(messages, memory, time.perf_counter() - t0, question=question, prompt_ids=result.prompt_ids,
                        prefix=result.prefix, notes=notes)

    def citations(self, lm, docs, prepared, result, k):
        return attention_citations(lm, docs, result, k)


# The one registry of engines (name -> engine): add a new engine's instance here.
ENGINES: dict[str, Engine] = {e.name: e for e in (SharedLLMEngine(), ActQKVEngine(), HomerEngine(),
                                                  FullContextEngine(), RagEngine())}


def get_engine(name: str) -> Engine:
    from app.services.errors import BadRequest

    if name not in ENGINES:
        raise BadRequest(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    return ENGINES[name]
