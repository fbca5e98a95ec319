"""BM25 text matching over the documents' own text: the passages `full` and `rag` cite (best
sentences per page, quoted with their neighbours), the blocks `actqkv` reads first
(`lexical_blocks`) and the spans `homer` never drops (`lexical_windows`). One term normalisation
(`_terms`) serves them all."""

from __future__ import annotations

import hashlib
import re
import threading
from array import array
from collections import OrderedDict
from typing import Any

from app.services.documents import DocumentContext

_WORD = re.compile(r"[A-Za-z0-9]+")


QUOTE_CHARS = 280  # a cited quote: the matched sentence, widened by its neighbours up to this length
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9(\"'])")


def page_sentences(doc: DocumentContext) -> list[tuple[int, list[str]]]:
    """(page number, its sentences in order) for every page; a sentence never crosses a page."""
    out = []
    for page in doc.pages:
        text = " ".join(page.text.split())
        sentences = [t for t in _SENTENCE_END.split(text) if t.strip()]
        out.append((page.number, sentences))
    return out


def _quote(sentences: list[str], i: int, chars: int = QUOTE_CHARS) -> str:
    """Sentence i, with the sentences after (then before) it while the quote stays within `chars`."""
    lo = hi = i
    text = sentences[i]
    while True:
        if hi + 1 < len(sentences) and len(text) + 1 + len(sentences[hi + 1]) <= chars:
            hi += 1
        elif lo > 0 and len(text) + 1 + len(sentences[lo - 1]) <= chars:
            lo -= 1
        else:
            break
        text = " ".join(sentences[lo : hi + 1])
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _terms(text: str) -> str:
    """Lower-case words with common English suffixes cut ("starts", "started" -> "start"), so BM25
    matches a question's words to the document's inflections."""
    out = []
    for word in _WORD.findall(text.lower()):
        for suffix in ("ing", "ed", "es", "s"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.isdigit():
                word = word[: -len(suffix)]
                break
        out.append(word)
    return " ".join(out)


def lexical_blocks(lm, states, query: str, n: int) -> list[tuple[int, int]]:
    """Up to `n` (document, block) pairs of ActQKV states whose text best matches `query` by BM25, best
    first (`lexical_windows` over the states' streams and block size)."""
    if not states:
        return []
    return lexical_windows(lm, [st.token_ids for st in states], states[0].config.block_size, query, n)


def lexical_windows(lm, streams: list[list[int]], block: int, query: str, n: int) -> list[tuple[int, int]]:
    """Up to `n` (document, block) pairs of token streams cut in blocks of `block` tokens whose text
    best matches `query` by BM25, best first: windows of two consecutive blocks are ranked (a word or
    a sentence cut by a block boundary lies whole in one), each window giving both its blocks. Each
    stream's index is built once and kept for its later questions (`_window_index`)."""
    if n <= 0 or not _WORD.search(query):
        return []
    import bm25s

    terms = bm25s.tokenize([_terms(query)], show_progress=False)
    ranked = []  # (score, document, window)
    n_blocks = [-(-len(ids) // block) for ids in streams]
    for d, ids in enumerate(streams):
        if not n_blocks[d]:
            continue
        retriever = _window_index(lm, ids, block)
        hits, scores = retriever.retrieve(terms, k=min(n_blocks[d], n), show_progress=False)
        ranked += [(float(score), d, int(j)) for j, score in zip(hits[0], scores[0], strict=True) if score > 0]
    out: list[tuple[int, int]] = []
    for _, d, j in sorted(ranked, key=lambda r: -r[0]):
        for pair in ((d, j), (d, j + 1)) if j + 1 < n_blocks[d] else ((d, j),):
            if pair not in out and len(out) < n:
                out.append(pair)
        if len(out) >= n:
            break
    return out


_BLOCK_INDEXES: OrderedDict[bytes, Any] = OrderedDict()  # a document stream's digest -> its BM25 index
_BLOCK_INDEXES_KEPT = 16
_BLOCK_INDEXES_LOCK = threading.Lock()


def _window_index(lm, ids: list[int], block: int):
    """BM25 over a stream's two-block windows (a 128K-token document: 0.35 s to build; then kept)."""
    import bm25s

    key = hashlib.blake2b(array("q", ids).tobytes() + block.to_bytes(4, "little"), digest_size=16).digest()
    with _BLOCK_INDEXES_LOCK:
        if key in _BLOCK_INDEXES:
            _BLOCK_INDEXES.move_to_end(key)
            return _BLOCK_INDEXES[key]
    n = -(-len(ids) // block)
    blocks = [lm.tokenizer.decode(ids[j * block:(j + 1) * block], skip_special_tokens=True) for j in range(n)]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([_terms(blocks[j] + (blocks[j + 1] if j + 1 < n else "")) for j in range(n)],
                                   show_progress=False), show_progress=False)
    with _BLOCK_INDEXES_LOCK:
        _BLOCK_INDEXES[key] = retriever
        while len(_BLOCK_INDEXES) > _BLOCK_INDEXES_KEPT:
            _BLOCK_INDEXES.popitem(last=False)
    return retriever


def best_passages(
    docs: list[DocumentContext], query: str, k: int, pages: set[tuple[int, int]] | None = None
) -> list[tuple[DocumentContext, int, str]]:
    """The sentences that best match `query` by BM25 (of the (document id, page) `pages` only, when
    given), at most one per page, best first, each quoted with its neighbours (`_quote`)."""
    import bm25s

    corpus = [
        (doc, n, sentences, i)
        for doc in docs
        for n, sentences in page_sentences(doc)
        if pages is None or (doc.id, n) in pages
        for i in range(len(sentences))
    ]
    if not corpus or not _WORD.search(query):
        return []
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([_terms(c[2][c[3]]) for c in corpus], show_progress=False),
                    show_progress=False)
    hits, scores = retriever.retrieve(bm25s.tokenize([_terms(query)], show_progress=False), k=min(len(corpus), 8 * k),
                                      show_progress=False)
    out, seen = [], set()
    for j, score in zip(hits[0], scores[0], strict=True):
        doc, page, sentences, i = corpus[int(j)]
        if score <= 0 or (doc.id, page) in seen:
            continue
        seen.add((doc.id, page))
        out.append((doc, page, _quote(sentences, i)))
        if len(out) == k:
            break
    return out
