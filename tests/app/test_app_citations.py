"""`full` cites the passage that matches its answer (BM25 over page windows), not a whole page."""

from __future__ import annotations

from types import SimpleNamespace

from app.services.documents import DocumentContext, PageSpan
from app.services.engines import FullContextEngine, Prepared
from app.services.lexical import page_sentences

FILLER = "The parties shall cooperate in good faith on all matters described in this agreement. " * 12
PAGES = [
    FILLER + "Either party may terminate the agreement with ninety days written notice to the other party.",
    FILLER + "The annual fee is 12,500 euros, payable in advance each January by bank transfer.",
    FILLER + "The agreement is governed by the laws of Belgium; disputes go to the courts of Ghent.",
]


def _doc() -> DocumentContext:
    return DocumentContext(7, "contract.pdf", [PageSpan(n, 0, 0, t) for n, t in enumerate(PAGES, 1)], [])


def _cite(answer: str, question: str, k: int = 2):
    prepared = Prepared(messages=[], memory=None, retrieval_s=0.0, question=question)
    return FullContextEngine().citations(None, [_doc()], prepared, SimpleNamespace(text=answer), k)


def test_the_passage_holding_the_answer_is_cited_first():
    cites = _cite("12,500 euros, paid in January.", "What is the annual fee?")
    assert cites[0]["page"] == 2 and "12,500 euros" in cites[0]["text"]
    assert len(cites[0]["text"]) <= 300 and cites[0]["document"] == 7
    short = _cite("Ghent", "Which courts hear disputes?", k=1)  # a one-word answer: the question helps
    assert [c["page"] for c in short] == [3] and "courts of Ghent" in short[0]["text"]


def test_no_answer_no_citation_and_at_most_one_passage_per_page():
    assert _cite("", "What is the fee?") == []
    cites = _cite("agreement party notice fee courts", "?", k=3)
    assert len({c["page"] for c in cites}) == len(cites) <= 3


def test_sentences_cover_each_page_in_order_without_crossing_pages():
    sentences = page_sentences(_doc())
    assert [n for n, _ in sentences] == [1, 2, 3]
    for n, found in sentences:
        assert " ".join(found) == " ".join(PAGES[n - 1].split())
        assert found[-1] == " ".join(PAGES[n - 1].split()).rsplit(". ", 1)[-1]


def test_rag_cites_the_matching_page_inside_a_chunk_that_spans_pages():
    from app.services.engines import RagEngine

    doc = _doc()
    chunk = {"index": 0, "page_start": 1, "page_end": 3, "text": " ".join(PAGES)}
    prepared = Prepared(messages=[], memory=None, retrieval_s=0.0, used=[(0, chunk)],
                        question="What is the annual fee?")
    cites = RagEngine().citations(None, [doc], prepared, SimpleNamespace(text="12,500 euros"), 2)
    assert cites[0]["page"] == 2 and "12,500 euros" in cites[0]["text"]
    outside = {"index": 0, "page_start": 3, "page_end": 3, "text": PAGES[2]}  # only pages of used chunks
    prepared.used = [(0, outside)]
    assert [c["page"] for c in RagEngine().citations(None, [doc], prepared, SimpleNamespace(text="12,500 euros"),
                                                     2)] == [3]


def test_rag_cites_the_page_and_sentence_of_the_matched_text(ctx, tmp_path):
    """Issue 14, defect 8: rag quoted a chunk's first page and first characters; the quote did not hold
    the answer, and a date on p. 3 was cited as p. 2. The document is made by the real ingestion."""
    from app_testkit import write_pdf

    from app.services.engines import RagEngine
    from app.ui import render

    filler = "The supplier keeps records of every maintenance visit and reports them each quarter. " * 9
    pages = [
        filler,
        filler + "The schedule of the service is set out below.",
        "Schedule. " + filler + "The service starts on 3 March 2025 and runs for two years.",
    ]
    owner = ctx.auth.local_user().id
    info = ctx.ingestion.ingest_path(owner, write_pdf(tmp_path / "schedule.pdf", pages))
    assert info["status"] == "ready"
    [doc] = ctx.documents.load_for_qa(owner, [info["id"]], None)
    rag = RagEngine()
    prepared = rag.prepare(ctx.model(), "When does the service start?", [doc], [])
    assert any(c["page_start"] < 3 <= c["page_end"] for _, c in prepared.used)  # a chunk across pages 2-3
    for answer in ("On 3 March 2025.", "xq zzv"):  # a right answer; gibberish, cited by the question alone
        cites = rag.citations(ctx.model(), [doc], prepared, SimpleNamespace(text=answer), 2)
        assert cites[0]["page"] == 3, (answer, cites)
        shown = render.sources_markdown(cites[:1])  # what the chat shows under the answer
        assert "The service starts on 3 March 2025" in shown, shown
        assert len(cites[0]["text"]) <= 300
